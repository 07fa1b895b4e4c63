"""The API's transport: TLS 1.3, then HTTP/2 (ALPN h2 or prior knowledge) or HTTP/1.1.

Built on the h2 and h11 state machines (sans-IO, like the rest of lpgw) and the same
MemoryBIO TLS shell the devices use, so an idle provider connection stays small and request
handling lives in the Router, not here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import h11
import hpack

from gateway import faults
from gateway.api.apns import MAX_BODY
from gateway.api.errors import ApiError
from gateway.api.limits import ApiLimits, ConnectionGate, TokenBucket
from gateway.api.router import Request, Response, Router, error_response, internal_error
from gateway.core.delivery import Rejected
from gateway.core.events import Kept
from gateway.core.metrics import Metrics
from gateway.transport.pump import Keeper, Pump
from gateway.transport.tls import TlsStream

log = logging.getLogger("lpgw.http")

# a fresh value each response: entering it in the HPACK table would only evict useful ones
UNIQUE_PER_RESPONSE = frozenset({"apns-id"})
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
ALPN = ("h2", "http/1.1")
MAX_HEADERS = 16384
# HTTP/2 bytes handed to h2 at once: it parses all it is given before we see any event,
# and 256 KiB of HEADERS+RST_STREAM pairs is ~8,000 streams (~100 ms of Python) past the
# point where the connection should have been told to calm down
H2_SLICE = 8192
GOAWAY_GRACE = 1.0  # seconds between a GOAWAY for abuse and the close
BODY_CAP = MAX_BODY + 1024  # /v1 bodies are tiny; anything past a push's limit is refused
TOO_LARGE = f"payload over the limit (4096 bytes, {MAX_BODY} for voip)"


@dataclass
class _Pending:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytearray = field(default_factory=bytearray)
    refused: bool = False
    started: float = 0.0  # monotonic: a body unfinished after request_timeout is refused
    size: int = 0  # bytes of it the connection holds (headers and body so far)

    @property
    def apns_id(self) -> str | None:
        for name, value in self.headers:
            if name.lower() == "apns-id":
                return value
        return None


def with_apns_id(headers: list[tuple[str, str]], apns_id: str | None) -> list[tuple[str, str]]:
    """Every answer to a request that carried apns-id carries it back exactly as sent, as
    APNs does: clients match answers by it (an early 413 without it left them waiting)."""
    if apns_id is None or any(name == "apns-id" for name, _ in headers):
        return headers
    return [("apns-id", apns_id), *headers]


def not_stored(message: str) -> ApiError:
    """Why a push whose group commit failed is refused: storage is full or failing. 503, as
    APNs answers when it cannot take a push now; not 500: nothing is wrong with the push."""
    return ApiError("ServiceUnavailable", message)


Committed = Callable[[ApiError | None], None]  # told why the push was not kept, or None


class GroupCommit:
    """One fsync for every push accepted in one turn of the event loop.

    The 200s wait for it: "accepted" still means "on disk", as with APNs, but a burst of
    pushes over one connection costs one disk flush instead of one each.
    """

    def __init__(self, router: Router, pump: Pump) -> None:
        self.router = router
        self.pump = pump
        self._waiting: list[Committed] = []
        self._loop = asyncio.get_running_loop()
        router.group_commit = True

    def after_commit(self, callback: Committed, ticket: int | None = None) -> None:
        if not self._waiting:
            self._loop.call_soon(self._commit)
        self._waiting.append(callback)

    def _commit(self) -> None:
        waiting, self._waiting = self._waiting, []
        delivery, metrics = self.router.delivery, self.router.metrics
        failure: str | None = None
        try:
            delivery.commit(time.time())
        except Rejected as exc:  # delivery's word: the group is not on disk (and it says why)
            failure = str(exc)
        except Exception as exc:  # the store's own error, or a bug: not stored either
            failure = f"the push was not stored ({str(exc)[:160] or type(exc).__name__}); " \
                      "send it again later"
            faults.record(metrics, "api_commit", exc, f"a group of {len(waiting)} pushes")
            del exc
            with faults.contained(metrics, "api_commit", "rollback"):
                delivery.rollback()
        with faults.contained(metrics, "api_commit", "sending"):
            self.pump.run()  # the group's pushes to the devices that are connected
        refused = not_stored(failure) if failure is not None else None
        for callback in waiting:  # every waiting stream is answered, whatever one does
            with faults.contained(metrics, "api_commit", "an answer"):
                callback(refused)


class SiteCommit:
    """In a site of gateways: a push's 200 waits until the site's quorum has kept it (the
    shell publishes it: cluster.relay); 503 with the reason when it could not."""

    def __init__(self, router: Router, keeper: Keeper, metrics: Metrics) -> None:
        self.keeper = keeper
        self.metrics = metrics
        router.group_commit = True

    def after_commit(self, callback: Committed, ticket: int | None = None) -> None:
        if ticket is None:  # nothing to keep (expired on arrival): answered now
            callback(None)
            return
        self.keeper.claim(ticket).add_done_callback(
            lambda kept: self._kept(kept, callback))

    def _kept(self, kept: asyncio.Future[Kept], callback: Committed) -> None:
        with faults.contained(self.metrics, "api_commit", "an answer"):
            result = kept.result()
            callback(None if result.failure is None else
                     ApiError(result.reason, result.failure, result.timestamp))


class HttpConnection:
    def __init__(self, stream: TlsStream, router: Router, metrics: Metrics,
                 limits: ApiLimits, pump: Pump,
                 committer: GroupCommit | SiteCommit | None = None) -> None:
        self.stream = stream
        self.pump = pump
        self.committer = committer
        self.router = router
        self.metrics = metrics
        self.limits = limits
        self._idle_timeout = limits.idle_timeout
        self._loop = asyncio.get_running_loop()
        self._idle: asyncio.TimerHandle | None = None
        # no request within handshake_timeout of the handshake: closed (a connection that
        # says nothing useful must not hold a descriptor for an hour)
        self._first: asyncio.TimerHandle | None = self._loop.call_later(
            limits.handshake_timeout, self._no_request)
        self._late: asyncio.TimerHandle | None = None  # the request_timeout check
        self._buffered = 0  # request bytes held: headers and bodies of unfinished requests
        self._resets = TokenBucket(limits.reset_rate, limits.reset_burst, time.monotonic())
        self._h1_since: float | None = None  # an HTTP/1.1 request begun, not yet whole
        self._h2: h2.connection.H2Connection | None = None
        self._h1: h11.Connection | None = None
        self._h1_request: _Pending | None = None
        self._streams: dict[int, _Pending] = {}
        self._ids: dict[int, str] = {}  # stream -> its request's apns-id, until answered
        self._unsent: dict[int, bytes] = {}
        self._head = b""
        self._closed = False
        stream.on_data = self.data_received
        stream.on_lost = self.lost
        alpn = stream.ssl.selected_alpn_protocol() if stream.ssl is not None else None
        if alpn == "h2":
            self._start_h2()
        elif alpn == "http/1.1":
            self._start_h1()
        self._touch()

    # --- dispatch ---------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        """Bytes from the client. A failure here costs this connection alone."""
        if self._closed:
            return
        try:
            self._received(data)
        except Exception as exc:
            where = "api_http2" if self._h2 is not None else "api_http1"
            faults.record(self.metrics, where, exc, f"api peer {self.stream.peer}")
            del exc
            self._abandon()

    def _received(self, data: bytes) -> None:
        self._touch()
        if self._h2 is None and self._h1 is None:  # no ALPN: the first bytes decide
            self._head += data
            if len(self._head) < len(PREFACE) and PREFACE.startswith(self._head):
                return
            data, self._head = self._head, b""
            if data.startswith(PREFACE):
                self._start_h2()
            else:
                self._start_h1()
        if self._h2 is not None:
            self._h2_data(data)
        else:
            self._h1_data(data)

    def lost(self, why: str) -> None:
        self._closed = True
        self._cancel_timers()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._cancel_timers()
            self.stream.close()

    def _cancel_timers(self) -> None:
        for timer in (self._idle, self._first, self._late):
            if timer is not None:
                timer.cancel()
        self._first = self._late = None

    def _requested(self) -> None:
        if self._first is not None:
            self._first.cancel()
            self._first = None

    def _no_request(self) -> None:
        self._first = None
        self.metrics.api_errors.labels("no_request").inc()
        faults.bounded(log, "api:no_request", "closing an API connection from %s: no request "
                       "within %.0f s (api.handshake_timeout)", self.stream.peer,
                       self.limits.handshake_timeout)
        if self._h1 is not None and self._h1.our_state is h11.IDLE and self._h1_since:
            with faults.contained(self.metrics, "api_timer", f"api peer {self.stream.peer}"):
                self._h1_send(Response.json(408, {"reason": "RequestTimeout",
                                                  "message": "no whole request in time"}),
                              close=True)
        self._idle_out()

    def _arm_late(self) -> None:
        if self._late is None and not self._closed:
            self._late = self._loop.call_later(self.limits.request_timeout, self._late_check)

    def _late_check(self) -> None:
        """Refuse requests whose body did not come within request_timeout (408)."""
        self._late = None
        with faults.contained(self.metrics, "api_timer", f"api peer {self.stream.peer}"):
            cutoff = time.monotonic() - self.limits.request_timeout
            if self._h2 is not None:
                late = [sid for sid, p in self._streams.items()
                        if not p.refused and p.started <= cutoff]
                for stream_id in late:
                    self._refuse(stream_id, 408, "RequestTimeout",
                                 "the request's body did not come in time")
                self._flush()
                if any(not p.refused for p in self._streams.values()):
                    self._arm_late()
            elif self._h1_since is not None:
                if self._h1_since <= cutoff:
                    self.metrics.api_errors.labels("RequestTimeout").inc()
                    if self._h1 is not None and self._h1.our_state in (h11.IDLE,
                                                                        h11.SEND_RESPONSE):
                        self._h1_send(Response.json(408, {
                            "reason": "RequestTimeout",
                            "message": "the request did not come whole in time"}), close=True)
                    self.close()
                else:
                    self._arm_late()

    def _touch(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self._idle = self._loop.call_later(self._idle_timeout, self._idle_out)

    def _idle_out(self) -> None:
        with faults.contained(self.metrics, "api_timer", f"api peer {self.stream.peer}"):
            if self._h2 is not None:
                self._h2.close_connection()
                self._flush()
        self.close()

    def _abandon(self) -> None:
        """Close this connection after an internal error: GOAWAY first if HTTP/2 can."""
        if self._h2 is not None:
            with contextlib.suppress(Exception):
                self._h2.close_connection(h2.errors.ErrorCodes.INTERNAL_ERROR)
                self._flush()
        self.close()

    def _answer(self, pending: _Pending, http2: bool) -> Response:
        self.metrics.api_requests.labels("2" if http2 else "1.1").inc()
        request = Request(pending.method, pending.path, pending.headers, bytes(pending.body),
                          http2=http2, mono=time.monotonic())
        try:
            return self.router.handle(request, time.time())
        finally:
            self.pump.run()  # what the request decided: a push sent now (not grouped)

    # --- HTTP/2 -----------------------------------------------------------------------

    def _start_h2(self) -> None:
        # what we send is built here from constants and checked values: validating and
        # normalising it again cost a few per cent of the API's CPU at 2,000 pushes/s
        # header_encoding=None: a value that is not UTF-8 is legal HTTP/2; decoded by h2 it
        # raised out of the state machine and cost every stream of the connection
        conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding=None, validate_outbound_headers=False,
            normalize_outbound_headers=False))
        conn.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.limits.max_concurrent_streams,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADERS,
        })
        conn.initiate_connection()
        self._h2 = conn
        self._flush()

    def _h2_data(self, data: bytes) -> None:
        for at in range(0, len(data), H2_SLICE):
            self._h2_slice(data[at:at + H2_SLICE] if len(data) > H2_SLICE else data)
            if self._closed:
                return

    @property
    def _http2(self) -> h2.connection.H2Connection:
        """The HTTP/2 connection, in the methods that run only once it is started."""
        if self._h2 is None:
            raise RuntimeError("HTTP/2 is not started on this connection")
        return self._h2

    @property
    def _http1(self) -> h11.Connection:
        """The HTTP/1.1 connection, in the methods that run only once it is started."""
        if self._h1 is None:
            raise RuntimeError("HTTP/1.1 is not started on this connection")
        return self._h1

    def _h2_slice(self, data: bytes) -> None:
        conn = self._http2
        try:
            events = conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            # TooManyStreamsError: a stream past our SETTINGS_MAX_CONCURRENT_STREAMS (h2
            # holds it from the first frame on, acknowledged or not); h2 has queued GOAWAY
            self.metrics.api_errors.labels(
                "too_many_streams" if isinstance(exc, h2.exceptions.TooManyStreamsError)
                else "http2_protocol_error").inc()
            log.info("closing an API connection from %s: %s", self.stream.peer, exc)
            self._flush()
            self.close()
            return
        for event in events:
            stream_id = getattr(event, "stream_id", 0)
            if not stream_id:  # the connection's own events: a failure is the connection's
                if self._h2_connection_event(event):
                    return
                continue
            try:  # (not `faults.contained`: a try costs nothing until it fails, per event)
                self._h2_stream_event(conn, event)
            except Exception as exc:
                self._h2_fail(stream_id, exc)
                del exc
            if self._closed:
                return
        self._flush()

    def _h2_connection_event(self, event: h2.events.Event) -> bool:
        """Handle an event of no stream; True when the connection has ended."""
        if isinstance(event, h2.events.WindowUpdated):
            self._pump()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._flush()
            self.close()
            return True
        return False

    def _h2_stream_event(self, conn: h2.connection.H2Connection, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._requested()
            headers = [(name.decode("utf-8", "replace"), value.decode("utf-8", "replace"))
                       for name, value in event.headers]
            pseudo = dict(h for h in headers if h[0].startswith(":"))
            pending = _Pending(pseudo.get(":method", ""), pseudo.get(":path", ""),
                               [h for h in headers if not h[0].startswith(":")],
                               started=time.monotonic(),
                               size=sum(len(n) + len(v) + 32 for n, v in headers))
            self._streams[event.stream_id] = pending
            self._buffered += pending.size
            if (apns_id := pending.apns_id) is not None:
                self._ids[event.stream_id] = apns_id
            if event.stream_ended:
                self._h2_request_done(event.stream_id)
            elif not self._over_budget(event.stream_id):
                self._arm_late()
        elif isinstance(event, h2.events.DataReceived):
            conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            data_for = self._streams.get(event.stream_id)
            if data_for is None or data_for.refused:
                return
            pending = data_for
            pending.body += event.data
            pending.size += len(event.data)
            self._buffered += len(event.data)
            if len(pending.body) > BODY_CAP:  # refuse now; never buffer more
                self._refuse(event.stream_id, 413, "PayloadTooLarge", TOO_LARGE)
            elif self._over_budget(event.stream_id):
                return
            elif event.stream_ended:
                self._h2_request_done(event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            self._h2_request_done(event.stream_id)
        elif isinstance(event, h2.events.StreamReset):
            self._forget(event.stream_id)
            if not self._resets.take(time.monotonic()):
                self._calm_down()
        elif isinstance(event, h2.events.WindowUpdated):
            self._pump()

    def _over_budget(self, stream_id: int) -> bool:
        """Past max_buffered_bytes held for this connection: this stream is refused (503)
        and its bytes let go; True if so."""
        if self._buffered <= self.limits.max_buffered_bytes:
            return False
        self._refuse(stream_id, 503, "TooMuchBuffered",
                     "this connection holds too many unfinished requests; finish them first")
        return True

    def _refuse(self, stream_id: int, status: int, reason: str, message: str) -> None:
        """Answer a request before its body is whole, let go of what it held, and ask
        the client to stop sending it (RST_STREAM NO_ERROR, RFC 9113 §8.1)."""
        pending = self._streams.get(stream_id)
        if pending is not None:
            pending.refused = True
            pending.body = bytearray()
            self._buffered -= pending.size
            pending.size = 0
        self.metrics.api_errors.labels(reason).inc()
        self._h2_send(stream_id, Response.json(status, {"reason": reason, "message": message}))
        with contextlib.suppress(h2.exceptions.StreamClosedError):
            self._http2.reset_stream(stream_id, h2.errors.ErrorCodes.NO_ERROR)

    def _calm_down(self) -> None:
        """Rapid reset (CVE-2023-44487): more stream resets than reset_rate/reset_burst
        allow. GOAWAY ENHANCE_YOUR_CALM and close this connection; the others go on."""
        self.metrics.api_errors.labels("rapid_reset").inc()
        faults.bounded(log, "api:rapid_reset", "closing an API connection from %s: more "
                       "stream resets than api.reset_rate allows (GOAWAY ENHANCE_YOUR_CALM)",
                       self.stream.peer)
        with contextlib.suppress(Exception):
            self._http2.close_connection(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
            self._flush()
        # what it sends now is not read; the socket closes a moment later, so that the
        # GOAWAY is not lost to the reset a close with unread data would cause
        self._closed = True
        self._cancel_timers()
        self._loop.call_later(GOAWAY_GRACE, self.stream.close)

    def _forget(self, stream_id: int) -> None:
        pending = self._streams.pop(stream_id, None)
        if pending is not None:
            self._buffered -= pending.size
        self._unsent.pop(stream_id, None)
        self._ids.pop(stream_id, None)

    def _h2_fail(self, stream_id: int, exc: Exception) -> None:
        """A bug while handling one stream: answer it 500 (or reset it), keep the rest."""
        faults.record(self.metrics, "api_http2_stream", exc,
                      f"api peer {self.stream.peer} stream {stream_id}")
        pending = self._streams.pop(stream_id, None)
        if pending is not None:
            self._buffered -= pending.size
        self._unsent.pop(stream_id, None)
        try:
            self._h2_send(stream_id, internal_error(self.metrics))
        except Exception:
            self._ids.pop(stream_id, None)
            try:
                self._http2.reset_stream(stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
            except h2.exceptions.StreamClosedError:
                pass
            except Exception:  # the state machine is unusable: this connection goes
                self._abandon()

    def _h2_request_done(self, stream_id: int) -> None:
        pending = self._streams.pop(stream_id, None)
        if pending is not None:
            self._buffered -= pending.size
        if pending is None or pending.refused:
            return
        response = self._answer(pending, http2=True)
        if response.after_commit and self.committer is not None:
            self.committer.after_commit(
                lambda failure: self._committed(stream_id, response, failure),
                response.ticket)
        else:
            self._h2_send(stream_id, response)

    def _committed(self, stream_id: int, response: Response,
                   failure: ApiError | None) -> None:
        if self._closed or self._h2 is None:
            return  # the client left; the push is stored all the same (unless failure)
        if failure is not None:
            response = error_response(failure, self.metrics)
        try:
            self._h2_send(stream_id, response)
        except Exception as exc:
            self._h2_fail(stream_id, exc)
            del exc
        self._flush()

    def _h2_send(self, stream_id: int, response: Response) -> None:
        fields = with_apns_id(response.headers, self._ids.pop(stream_id, None))
        headers = [(":status", str(response.status)),
                   *(hpack.NeverIndexedHeaderTuple(n, v) if n in UNIQUE_PER_RESPONSE else (n, v)
                     for n, v in fields),
                   ("content-length", str(len(response.body)))]
        try:
            self._http2.send_headers(stream_id, headers, end_stream=not response.body)
        except h2.exceptions.StreamClosedError:
            return
        if response.body:
            self._unsent[stream_id] = response.body
            self._pump()

    def _pump(self) -> None:
        """Send what flow control allows now; the rest on WINDOW_UPDATE."""
        conn = self._http2
        for stream_id in list(self._unsent):
            data = self._unsent[stream_id]
            try:
                while data:
                    room = min(conn.local_flow_control_window(stream_id),
                               conn.max_outbound_frame_size)
                    if room <= 0:
                        break
                    chunk, data = data[:room], data[room:]
                    conn.send_data(stream_id, chunk, end_stream=not data)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                data = b""
            if data:
                self._unsent[stream_id] = data
            else:
                del self._unsent[stream_id]
        self._flush()

    def _flush(self) -> None:
        if self._h2 is not None:
            data = self._h2.data_to_send()
            if data:
                self.stream.write(data)

    # --- HTTP/1.1 ---------------------------------------------------------------------

    def _start_h1(self) -> None:
        self._h1 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADERS)

    def _h1_data(self, data: bytes) -> None:
        conn = self._http1
        if self._h1_since is None and data:
            self._h1_since = time.monotonic()  # a request has begun: request_timeout runs
            self._arm_late()
        conn.receive_data(data)
        while not self._closed:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                self.metrics.api_errors.labels("http1_protocol_error").inc()
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    self._h1_send(Response.json(400, {"reason": "BadRequest",
                                                      "message": str(exc)}), close=True)
                self.close()
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self._requested()
                self._h1_request = _Pending(
                    event.method.decode("latin-1"), event.target.decode("latin-1"),
                    [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers])
            elif isinstance(event, h11.Data) and self._h1_request is not None:
                self._h1_request.body += event.data
                if len(self._h1_request.body) > BODY_CAP:
                    self.metrics.api_errors.labels("PayloadTooLarge").inc()
                    self._h1_send(Response.json(413, {"reason": "PayloadTooLarge",
                                                      "message": TOO_LARGE}), close=True)
                    self.close()
                    return
            elif isinstance(event, h11.EndOfMessage) and self._h1_request is not None:
                try:
                    response = self._answer(self._h1_request, http2=False)
                except Exception as exc:  # answer this one, then close: a bug may leave a mess
                    faults.record(self.metrics, "api_http1", exc, f"api peer {self.stream.peer}")
                    del exc
                    self._h1_send(internal_error(self.metrics), close=True)
                    self.close()
                    return
                self._h1_send(response)
                self._h1_request = None
                self._h1_since = None
                if conn.our_state is h11.MUST_CLOSE:
                    self.close()
                    return
                conn.start_next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                self.close()
                return

    def _h1_send(self, response: Response, close: bool = False) -> None:
        conn = self._http1
        request = self._h1_request
        fields = with_apns_id(response.headers, request.apns_id if request else None)
        # bytes: a header is echoed as it came (decoded as latin-1), not re-encoded as ASCII
        headers = [(n.encode("latin-1"), v.encode("latin-1", "replace")) for n, v in fields]
        headers.append((b"content-length", str(len(response.body)).encode()))
        if close:
            headers.append((b"connection", b"close"))
        out = conn.send(h11.Response(status_code=response.status, headers=headers))
        if response.body:
            out += conn.send(h11.Data(data=response.body))
        out += conn.send(h11.EndOfMessage())
        self.stream.write(out)


class ApiFactory:
    """Protocol factory for loop.create_server; `limits` may be replaced (a reload)."""

    def __init__(self, ctx, router: Router, metrics: Metrics, limits: ApiLimits,
                 pump: Pump, keeper: Keeper | None = None) -> None:
        """`keeper`: in a site of gateways, where pushes are kept (else one fsync per loop
        turn in this gateway's SQLite file)."""
        self.ctx = ctx
        self.router = router
        self.metrics = metrics
        self.pump = pump
        self.gate = ConnectionGate(limits)
        self.committer: GroupCommit | SiteCommit = (
            GroupCommit(router, pump) if keeper is None else SiteCommit(router, keeper, metrics))

    @property
    def limits(self) -> ApiLimits:
        return self.gate.limits

    @limits.setter
    def limits(self, limits: ApiLimits) -> None:
        self.gate.limits = limits  # new connections; open ones keep theirs

    def __call__(self) -> TlsStream:
        made = _ApiStream(self, self.ctx, True, self.limits.handshake_timeout, self._open,
                          self._tls_failed, alpn=(*ALPN, None))
        made.metrics = self.metrics  # its own failures are counted too
        return made

    def _open(self, stream: TlsStream) -> None:
        HttpConnection(stream, self.router, self.metrics, self.limits, self.pump,
                       self.committer)

    def _tls_failed(self, why: str) -> None:
        self.metrics.api_errors.labels("tls_handshake").inc()
        faults.bounded(log, "api:tls", "api tls: %s", why)


class _ApiStream(TlsStream):
    """A TlsStream counted against the API's connection caps: one past them is closed
    before its handshake costs anything."""

    def __init__(self, factory: ApiFactory, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._factory = factory
        self._source: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        name = transport.get_extra_info("peername")
        source = str(name[0]) if name else "?"
        why = self._factory.gate.admit(source)
        metrics = self._factory.metrics
        if why is not None:
            metrics.api_connections_refused.labels(why).inc()
            faults.bounded(log, f"api:{why}", "refused an API connection from %s: api.%s "
                           "reached", source, why)
            transport.abort()  # type: ignore[attr-defined]
            return
        self._source = source
        metrics.api_connections.set(self._factory.gate.open)
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._source is None:
            return  # refused in connection_made: nothing was opened
        self._factory.gate.release(self._source)
        self._factory.metrics.api_connections.set(self._factory.gate.open)
        self._source = None
        super().connection_lost(exc)
