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

from gateway.core.metrics import Metrics
from gateway.protocol import ALPN

log = logging.getLogger("lpgw.tls")

READ_CHUNK = 16384


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
        self._incoming.write(data)
        if not self._open:
            self._handshake()
            if not self._open:
                return
        self._read()

    def eof_received(self) -> bool:
        self._lost("peer closed the connection")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(f"connection lost: {exc}" if exc else "connection closed")

    def write(self, data: bytes) -> None:
        if self._closed or self.ssl is None:
            return
        self.ssl.write(data)
        self._flush()

    def close(self) -> None:
        """Send close_notify after what is queued, then close the socket."""
        if self._closed:
            return
        self._closed = True
        if self._open and self.ssl is not None:
            with contextlib.suppress(ssl.SSLError):
                self.ssl.unwrap()
        self._flush()
        self._cancel_timer()
        if self.transport is not None:
            self.transport.close()

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
        link = make_link("tls", stream.peer, stream.write, lambda reason: stream.close())
        stream.on_data = link.data_received
        stream.on_lost = link.connection_lost

    return lambda: TlsStream(ctx, True, handshake_timeout, on_open, on_error)
