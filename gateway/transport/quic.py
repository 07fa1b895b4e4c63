"""QUIC via aioquic: one client-opened bidirectional stream per device session.

aioquic has no keepalive of its own: the session's heartbeat, sent as QUIC PING frames
(docs/protocol.md §6.4), keeps the connection inside the idle timeout. Connection
migration (a phone whose address changes) is aioquic's, unchanged.
The same listener answers ALPN "h3" with a liveness check only (see h3health): such a
connection is handed to H3Health and never reaches the device code.

Memory and scale: what aioquic keeps for a connection's whole life, and its teardown that
scans every connection, are fixed by touches of its internals, all in gateway/internals.py
(release_handshake_state, release_closed_connection, forget_ids_only, set_retry, ...);
this module uses only what that one exports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from aioquic.asyncio.server import QuicServer
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import stream_is_client_initiated, stream_is_unidirectional
from aioquic.quic.retry import QuicRetryTokenHandler

from gateway import faults
from gateway.core.metrics import Metrics
from gateway.internals import (
    ContainedProtocol,
    datagram_transport_of,
    forget_ids_only,
    known_connection,
    peer_address,
    release_closed_connection,
    release_handshake_state,
    set_retry,
    stream_backlog,
)
from gateway.protocol import ALPN
from gateway.transport import h3health
from gateway.transport.initials import InitialQueue, initial_token, new_connection_id

log = logging.getLogger("lpgw.quic")

ERROR_STREAM_REFUSED = 0x10  # application error code for a second stream
INITIAL_RTT = 0.333  # seconds, before the first measurement
WORK_SLICE = 0.002  # seconds of packet handling between reads of the socket
BACKLOG_LIMIT = 4096  # datagrams of known connections waiting (~6 MiB at most)
# seconds a handshake may take before it is dropped (a phone on a bad link takes 1-2 s;
# aioquic alone would keep an unanswered one until its idle timeout, ~45 s)
HALF_OPEN_TIMEOUT = 10.0


def server_configuration(cert: str, key: str, idle_timeout: float,
                         max_frame: int) -> QuicConfiguration:
    config = QuicConfiguration(is_client=False, alpn_protocols=[ALPN, h3health.ALPN],
                               idle_timeout=idle_timeout)
    # RFC 9002 §6.2.2's initial RTT (aioquic's default is 100 ms): until a phone first
    # answers, the gateway resends its handshake flight after 2 x this. In a storm phones
    # answer late because they are many, not because packets were lost, and each early
    # resend is work for both sides: measured, 10,000 phones at once with 100 ms took
    # 54.3 s, with 333 ms 46.6 s (docs/performance.md).
    config.initial_rtt = INITIAL_RTT
    config.load_cert_chain(cert, key)
    # room for one frame in flight plus a little, per stream and connection. The windows
    # bound what a peer can make us buffer (out-of-order data); an idle connection holds no
    # buffer of that size, aioquic's stream buffers grow with the data only.
    config.max_stream_data = max(4 * max_frame, 65536)
    config.max_data = config.max_stream_data * 2
    return config


class QuicDeviceProtocol(ContainedProtocol):
    """A device over QUIC, bridged to a GatewayLink once the handshake is done."""

    def __init__(self, *args, make_link: Callable, metrics: Metrics, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._make_link = make_link
        self._metrics = metrics
        self._stream_id: int | None = None
        self._link = None
        self._closing = False
        self._h3: h3health.H3Health | None = None
        self._in_event = False

    def quic_event_received(self, event: events.QuicEvent) -> None:
        # aioquic transmits once after handling a packet's or a timer's events: what the
        # link writes meanwhile (a welcome and the pushes waiting for it) leaves together
        self._in_event = True
        try:
            self._event(event)
        except Exception as exc:  # this connection's failure: it alone ends
            self._abandon("quic_event", exc)
        finally:
            self._in_event = False

    def timer_failed(self, exc: Exception) -> None:
        """aioquic's timer raised: this connection alone ends (see ContainedProtocol)."""
        self._abandon("quic_timer", exc)

    def _abandon(self, where: str, exc: Exception) -> None:
        """End this one connection after a failure, however broken its state: say
        CONNECTION_CLOSE if aioquic still can, then forget it at once (its own timer may
        be what failed, so the closing period is not waited for)."""
        faults.record(self._metrics, where, exc, f"quic peer {self._peer_safe()}")
        link, self._link = self._link, None
        if link is not None:
            link.connection_lost("internal error")
        try:
            self._close("internal error")
        except Exception as again:
            faults.record(self._metrics, where, again, f"quic peer {self._peer_safe()}")
        with contextlib.suppress(Exception):
            self.forget_now()
        self._closing = True
        self._release_now()

    def _peer_safe(self) -> str:
        try:
            return self._peer()
        except Exception:
            return "?"

    def _event(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.ConnectionTerminated):
            # once aioquic's protocol has finished with this event (its transmit() below)
            asyncio.get_running_loop().call_soon(self._release)
        if self._h3 is not None:
            self._h3.quic_event_received(event)
        elif isinstance(event, events.HandshakeCompleted):
            release_handshake_state(self.connection)
            if event.alpn_protocol == h3health.ALPN:
                self._h3 = h3health.H3Health(self.connection, self.transmit, self._peer())
                return
            self._link = self._make_link("quic", self._peer(), self._write, self._close,
                                         ping=self._ping)
        elif isinstance(event, events.PingAcknowledged):
            if self._link is not None:
                self._link.ping_acknowledged(event.uid)
        elif isinstance(event, events.StreamDataReceived):
            self._stream_data(event)
        elif isinstance(event, events.ConnectionTerminated):
            if self._link is not None:
                self._link.connection_lost(f"QUIC closed: {event.reason_phrase or 'no reason'}")
        elif (isinstance(event, events.StreamReset) and event.stream_id == self._stream_id
              and self._link is not None):
            self._link.connection_lost("device reset its stream")

    def _stream_data(self, event: events.StreamDataReceived) -> None:
        sid = event.stream_id
        if self._stream_id is None and stream_is_client_initiated(sid) \
                and not stream_is_unidirectional(sid):
            self._stream_id = sid
        if sid != self._stream_id:
            self._metrics.protocol_errors.labels("extra_stream").inc()
            self.connection.stop_stream(sid, ERROR_STREAM_REFUSED)
            if not stream_is_unidirectional(sid):
                self.connection.reset_stream(sid, ERROR_STREAM_REFUSED)
            return
        if self._link is None:
            return
        if event.data:
            self._link.data_received(event.data)
        if event.end_stream:
            self._link.connection_lost("device ended its stream")
            self._close("stream ended")

    def _write(self, data: bytes) -> int | None:
        """Queue `data` on the device's stream; returns the bytes it holds unacknowledged."""
        if self._stream_id is None or self._closing:
            return None
        self.connection.send_stream_data(self._stream_id, data)
        if not self._in_event:  # a push from the API or SIP, a bye: send it now
            self.transmit()
        return stream_backlog(self.connection, self._stream_id)

    def _ping(self, nonce: int) -> None:
        """The heartbeat as a QUIC PING frame: the phone's QUIC stack acknowledges it, so
        a heartbeat is one packet each way (a `ping` frame on the stream was a packet, its
        `pong` and our acknowledgement of that: measured, half the gateway's CPU)."""
        if not self._closing:
            self.connection.send_ping(nonce)
            self.transmit()

    def _close(self, reason: str = "bye") -> None:
        """End the stream (after the bye) and the connection; `reason` is the close phrase."""
        if self._closing:
            return
        self._closing = True
        if self._stream_id is not None:
            with contextlib.suppress(ValueError, AssertionError):
                self.connection.send_stream_data(self._stream_id, b"", end_stream=True)
        self.transmit()  # the bye leaves before CONNECTION_CLOSE
        self.connection.close(error_code=0, reason_phrase=reason)
        self.transmit()

    def _release(self) -> None:
        """Let go of everything once the connection has ended, so that reference counting
        frees it at once (see release_closed_connection). The server's handlers are
        partials holding this protocol, and a health check's H3Health holds its transmit:
        cycles of their own."""
        self._closing = True
        self._release_now()
        release_closed_connection(self.connection)

    @property
    def handshake_done(self) -> bool:
        return self._link is not None or self._h3 is not None or self._closing

    def give_up(self, reason: str) -> None:
        """Drop a handshake that did not finish in time: CONNECTION_CLOSE, and forget it at
        once (its closing period is not waited for: memory is what this is about)."""
        with contextlib.suppress(Exception):
            self._close(reason)
        with contextlib.suppress(Exception):
            self.forget_now()
        self._release_now()

    def _release_now(self) -> None:
        self._link = self._h3 = None
        self.unbind_server()

    def _peer(self) -> str:
        addr = peer_address(self.connection)
        return f"{addr[0]}:{addr[1]}" if addr else "?"


# --- the listener ------------------------------------------------------------------------

class DeviceQuicServer(QuicServer):
    """aioquic's server, reading its socket often and starting new connections last.

    Reading is cheap and work is not: a turn of the loop reads at most 32 datagrams
    (uvloop), and if the packets it read then take 30 ms to handle, a storm's datagrams
    overflow the socket buffer meanwhile; the kernel drops whatever comes, the second
    flights of handshakes already paid for included, and those phones wait out their
    retransmission backoff (measured: the gateway idle half of a 5,000-phone storm while
    its socket dropped 13,000 datagrams). So a read only sorts datagrams: packets of known
    connections into a backlog, Initials of unknown ones into an InitialQueue (most
    recently heard first, bounded). Work runs in slices of WORK_SLICE between reads:
    the backlog first, in arrival order, and only when it is empty one new connection.
    """

    def __init__(self, *args, metrics: Metrics | None = None, retry_above: int = 64,
                 half_open_limit: int = 256, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._metrics = metrics
        self._runs_on = asyncio.get_running_loop()
        self._initials = InitialQueue()
        self._backlog: deque[tuple[bytes, Any]] = deque()
        self._working = False
        self.retry_above = retry_above
        self.half_open_limit = half_open_limit
        # aioquic's Retry (tokens: AES-GCM under a key made here, bound to the address and
        # the ids, good 30 s); handed to QuicServer per Initial, see _start
        self._tokens = QuicRetryTokenHandler()
        self._half_open: dict[QuicDeviceProtocol, float] = {}  # -> when it started
        self._sweep: asyncio.TimerHandle | None = None

    def datagram_received(self, data: bytes, addr) -> None:  # type: ignore[override]
        cid = new_connection_id(data)
        if cid is None or known_connection(self, cid) is not None:
            if len(self._backlog) < BACKLOG_LIMIT:
                self._backlog.append((data, addr))
            elif self._metrics is not None:
                self._metrics.quic_backlog_dropped.inc()
        else:
            dropped = self._initials.offer(cid, data, addr)
            if dropped and self._metrics is not None:
                self._metrics.quic_initials_dropped.inc(dropped)
        if not self._working:
            self._working = True
            self._runs_on.call_soon(self._work)

    def _work(self) -> None:
        transport = datagram_transport_of(self)
        if transport is None or transport.is_closing():
            self._working = False  # the listener is gone: what waits is never handled
            return
        backlog = self._backlog
        until = time.perf_counter() + WORK_SLICE
        try:
            while backlog:
                self._handle(*backlog.popleft())
                if time.perf_counter() >= until:
                    break
            else:
                for data, addr in self._initials.take() or ():
                    self._start(data, addr)
        finally:  # whatever happened, the next slice comes: one failure must not stop QUIC
            if backlog or len(self._initials):
                self._runs_on.call_soon(self._work)
            else:
                self._working = False

    def _start(self, data: bytes, addr: Any) -> None:
        """An Initial of a connection not known yet. Past `retry_above` handshakes under
        way it gets a Retry (aioquic's, stateless: a source that cannot receive at its
        address costs nothing more); past `half_open_limit` it is dropped (the phone
        retries). An Initial that answers a Retry is always checked against its token.

        Retry is set per Initial (internals.set_retry): retry=True would ask every phone
        for an extra round trip, even when nothing is wrong."""
        cid = new_connection_id(data)
        if cid is None or known_connection(self, cid) is not None:
            self._handle(data, addr)
            return
        now = time.monotonic()
        self._expire_half_open(now)
        token = initial_token(data)
        half_open = len(self._half_open)
        if half_open >= self.half_open_limit and token:
            self._count("quic_half_open_refused")
            return
        retry = bool(token) or half_open >= min(self.retry_above, self.half_open_limit)
        set_retry(self, self._tokens if retry else None)
        try:
            self._handle(data, addr)
        finally:
            set_retry(self, None)
        protocol = known_connection(self, cid)
        if not isinstance(protocol, QuicDeviceProtocol):  # None: refused, or a Retry sent
            if retry and not token:
                self._count("quic_retries")
            elif token:
                self._count("quic_tokens_refused")
            return
        self._half_open[protocol] = now
        if self._metrics is not None:
            self._metrics.quic_half_open.set(len(self._half_open))
        if self._sweep is None:
            self._sweep = self._runs_on.call_later(HALF_OPEN_TIMEOUT / 2, self._swept)

    def _swept(self) -> None:
        self._sweep = None
        with faults.contained(self._metrics, "quic_half_open"):
            self._expire_half_open(time.monotonic())
        if self._half_open:
            self._sweep = self._runs_on.call_later(HALF_OPEN_TIMEOUT / 2, self._swept)

    def _expire_half_open(self, now: float) -> None:
        """Forget handshakes that finished; drop those older than HALF_OPEN_TIMEOUT."""
        for protocol, started in list(self._half_open.items()):
            done = getattr(protocol, "handshake_done", True)
            if done or now - started > HALF_OPEN_TIMEOUT:
                del self._half_open[protocol]
                if not done:
                    self._count("quic_half_open_expired")
                    protocol.give_up("handshake timeout")
        if self._metrics is not None:
            self._metrics.quic_half_open.set(len(self._half_open))

    def _count(self, name: str) -> None:
        if self._metrics is not None:
            getattr(self._metrics, name).inc()

    def _handle(self, data: bytes, addr: Any) -> None:
        """One datagram through aioquic; a failure costs that datagram only (the
        connection's own events are contained in QuicDeviceProtocol)."""
        try:
            super().datagram_received(data, addr)
        except Exception as exc:
            faults.record(self._metrics, "quic_datagram", exc, f"from {_address(addr)}")


def _address(addr: Any) -> str:
    try:
        return f"{addr[0]}:{addr[1]}"
    except Exception:
        return "?"


async def serve(host: str, port: int, *, configuration: QuicConfiguration,
                create_protocol: Callable, metrics: Metrics | None = None,
                receive_buffer: int = 0, retry_above: int = 64,
                half_open_limit: int = 256) -> QuicServer:
    """aioquic's server, fitted for thousands of phones (DeviceQuicServer, forget_ids_only).

    `receive_buffer`: bytes of kernel socket buffer to ask for (0: the kernel's default).
    """
    _, server = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: DeviceQuicServer(configuration=configuration, create_protocol=create_protocol,
                                 metrics=metrics, retry_above=retry_above,
                                 half_open_limit=half_open_limit),
        local_addr=(host, port))
    forget_ids_only(server)
    if receive_buffer:
        transport = datagram_transport_of(server)
        if transport is not None:
            set_receive_buffer(transport.get_extra_info("socket"), receive_buffer)
    return server


SO_RCVBUFFORCE = 33  # Linux only (Python doesn't name it): past rmem_max, with CAP_NET_ADMIN


def set_receive_buffer(sock, wanted: int) -> int:
    """Ask for `wanted` bytes of receive buffer; returns (and logs, if short) what was granted.

    Linux caps SO_RCVBUF at net.core.rmem_max (208 KiB unless raised) without an error;
    a process with CAP_NET_ADMIN may go past it. getsockopt reports twice the usable size
    (the kernel's bookkeeping share), so granted = reported / 2.
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, wanted)
    granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2
    if granted < wanted and sys.platform == "linux":
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, wanted)
            granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2
    if granted < wanted:
        log.warning("QUIC receive buffer: asked for %d bytes, the kernel gave %d; raise "
                    "net.core.rmem_max (sysctl) to at least %d", wanted, granted, wanted)
    else:
        log.info("QUIC receive buffer: %d bytes", granted)
    return granted
