"""TLS 1.3 over TCP with ssl.MemoryBIO, so an idle device costs kilobytes, not 256 KiB.

asyncio's own SSL transport keeps a 256 KiB read buffer per connection (CPython #109534);
driving the SSLObject ourselves keeps buffers only while bytes are in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable

from gateway import faults
from gateway.core.metrics import Metrics
from gateway.protocol import ALPN
from gateway.protocol.messages import ByeReason

log = logging.getLogger("lpgw.tls")

READ_CHUNK = 16384
# a closed connection whose peer does not take what is left is cut after this long: the
# bytes it holds would otherwise stay with the socket for as long as the peer keeps quiet
CLOSE_GRACE = 10.0


def server_context(cert: str, key: str, alpn: tuple[str, ...] = (ALPN,),
                   session_tickets: bool = True) -> ssl.SSLContext:
    """TLS 1.3 only. Without `session_tickets` no NewSessionTicket follows the handshake:
    the device protocol never resumes (a phone pins the key on every full handshake), and
    OpenSSL's default two tickets are ~15% of the server's handshake CPU in a storm."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(list(alpn))
    if not session_tickets:
        ctx.num_tickets = 0
    return ctx


class TlsStream(asyncio.Protocol):
    """Bytes <-> TLS records over one TCP connection; `on_open` is called after the handshake."""

    def __init__(self, ctx: ssl.SSLContext, server_side: bool, handshake_timeout: float,
                 on_open: Callable[[TlsStream], None], on_error: Callable[[str], None],
                 server_hostname: str | None = None,
                 alpn: tuple[str | None, ...] = (ALPN,)) -> None:
        self._ctx = ctx
        self._alpn = alpn
        self._server_side = server_side
        self._server_hostname = server_hostname
        self._timeout = handshake_timeout
        self._on_open = on_open
        self._on_error = on_error
        self.on_data: Callable[[bytes], None] = lambda data: None
        self.on_lost: Callable[[str], None] = lambda why: None
        self.transport: asyncio.Transport | None = None
        self.ssl: ssl.SSLObject | None = None
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._open = False
        self._closed = False
        self._timer: asyncio.TimerHandle | None = None
        self._cut: asyncio.TimerHandle | None = None
        # what goes into the failure counter: the API's connections share this class
        self.metrics: Metrics | None = None

    @property
    def peer(self) -> str:
        name = self.transport.get_extra_info("peername") if self.transport else None
        return f"{name[0]}:{name[1]}" if name else "?"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.ssl = self._ctx.wrap_bio(self._incoming, self._outgoing,
                                      server_side=self._server_side,
                                      server_hostname=self._server_hostname)
        self._timer = asyncio.get_running_loop().call_later(self._timeout, self._handshake_late)
        if not self._server_side:
            self._handshake()

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        try:
            self._incoming.write(data)
            if not self._open:
                self._handshake()
                if not self._open:
                    return
            self._read()
        except Exception as exc:  # this connection's failure: it alone is closed
            faults.record(self.metrics, "tls_input", exc, f"tls peer {self.peer}")
            self.close(abort=True)
            self._lost("internal error")

    def eof_received(self) -> bool:
        self._lost("peer closed the connection")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._cut is not None:
            self._cut.cancel()
            self._cut = None
        self._lost(f"connection lost: {exc}" if exc else "connection closed")

    def write(self, data: bytes) -> int | None:
        """Encrypt and send; returns the bytes the socket's transport holds unsent."""
        if self._closed or self.ssl is None:
            return None
        self.ssl.write(data)
        self._flush()
        return self.transport.get_write_buffer_size() if self.transport is not None else None

    def close(self, abort: bool = False) -> None:
        """Send close_notify after what is queued, then close the socket; with `abort`
        (the peer does not read) drop what is queued and close at once."""
        if self._closed:
            return
        self._closed = True
        if self._open and self.ssl is not None and not abort:
            with contextlib.suppress(ssl.SSLError):
                self.ssl.unwrap()
            self._flush()
        self._cancel_timer()
        transport = self.transport
        if transport is None:
            return
        if abort:
            transport.abort()
        elif not transport.is_closing():
            transport.close()
            if transport.get_write_buffer_size():
                self._cut = asyncio.get_running_loop().call_later(CLOSE_GRACE, transport.abort)

    # internals

    def _handshake(self) -> None:
        assert self.ssl is not None
        try:
            self.ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, OSError) as exc:
            self._flush()
            self._fail(f"TLS handshake failed: {getattr(exc, 'reason', None) or exc}")
            return
        self._flush()
        self._cancel_timer()
        if self.ssl.selected_alpn_protocol() not in self._alpn:
            self._fail(f"peer did not negotiate ALPN {' or '.join(map(str, self._alpn))}")
            return
        self._open = True
        self._on_open(self)

    def _read(self) -> None:
        assert self.ssl is not None
        while not self._closed:
            try:
                chunk = self.ssl.read(READ_CHUNK)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self._lost("peer sent close_notify")
                return
            except ssl.SSLError as exc:
                self._fail(f"TLS error: {exc.reason or exc}")
                return
            if not chunk:
                break
            self.on_data(chunk)
            if not self._incoming.pending and not self.ssl.pending():
                break  # nothing left: spare the SSLWantReadError a further read would raise
        self._flush()

    def _flush(self) -> None:
        data = self._outgoing.read()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _fail(self, why: str) -> None:
        self._on_error(why)
        self.close()
        self._lost(why)

    def _lost(self, why: str) -> None:
        self._cancel_timer()
        if not self._closed:
            self._closed = True
            if self.transport is not None:
                self.transport.close()
        callback, self.on_lost = self.on_lost, lambda why: None
        self.on_data = lambda data: None  # the link holds us: no cycle left behind
        callback(why)

    def _handshake_late(self) -> None:
        self._timer = None
        if not self._open:
            self._fail("TLS handshake did not finish in time")

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def serve_factory(ctx: ssl.SSLContext, make_link, metrics: Metrics,
                  handshake_timeout: float) -> Callable[[], TlsStream]:
    """Protocol factory for loop.create_server: each stream becomes a GatewayLink."""

    def on_error(why: str) -> None:
        metrics.protocol_errors.labels("tls_handshake").inc()
        log.info("tls: %s", why)

    def on_open(stream: TlsStream) -> None:
        link = make_link("tls", stream.peer, stream.write,
                         lambda reason: stream.close(abort=reason == ByeReason.SLOW_READER))
        stream.on_data = link.data_received
        stream.on_lost = link.connection_lost

    def stream() -> TlsStream:
        made = TlsStream(ctx, True, handshake_timeout, on_open, on_error)
        made.metrics = metrics
        return made

    return stream
