"""ALPN "h3" on the device port: `GET /healthz` over HTTP/3, and nothing else.

An operator proves the UDP path to the gateway (a hospital firewall, a ship's VLAN) with any
HTTP/3 client, e.g. `curl --http3-only -k https://GATEWAY:PORT/healthz`. The answer reveals
liveness only: no gateway id, no version, no pin. Such a connection never reaches the device
code and is no device; it is closed after IDLE_TIMEOUT seconds without a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from aioquic.h3.connection import ErrorCode, H3Connection
from aioquic.h3.events import HeadersReceived
from aioquic.quic import events
from aioquic.quic.connection import QuicConnection

log = logging.getLogger("lpgw.h3health")

ALPN = "h3"
PATH = b"/healthz"
IDLE_TIMEOUT = 5.0  # seconds without a request before the gateway closes the connection


def answer(method: bytes, path: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """(status, extra headers, body) for one request; the query string is ignored."""
    if path.split(b"?", 1)[0] != PATH:
        return 404, [], b""
    if method != b"GET":
        return 405, [(b"allow", b"GET")], b""
    return 200, [(b"content-type", b"text/plain"), (b"cache-control", b"no-store")], b"ok\n"


class H3Health:
    """The HTTP/3 side of one QUIC connection; the caller feeds it every QUIC event."""

    def __init__(self, quic: QuicConnection, transmit: Callable[[], None], peer: str,
                 idle_timeout: float | None = None) -> None:
        self._quic = quic
        self._transmit = transmit
        self._peer = peer
        self._idle = IDLE_TIMEOUT if idle_timeout is None else idle_timeout
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._h3 = H3Connection(quic)  # opens the control and QPACK streams
        self._touch()

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.ConnectionTerminated):
            self._stop_timer()
            return
        try:
            for h3_event in self._h3.handle_event(event):
                if isinstance(h3_event, HeadersReceived):
                    self._respond(h3_event)
        except Exception:  # never let a peer's input escape into the event loop
            log.debug("h3 health check from %s failed", self._peer, exc_info=True)
            self.close(ErrorCode.H3_INTERNAL_ERROR, "internal error")

    def close(self, error_code: int = ErrorCode.H3_NO_ERROR, reason: str = "idle") -> None:
        self._stop_timer()
        self._quic.close(error_code=error_code, reason_phrase=reason)
        self._transmit()

    def _respond(self, event: HeadersReceived) -> None:
        pseudo = {k: v for k, v in event.headers if k.startswith(b":")}
        status, extra, body = answer(pseudo.get(b":method", b""), pseudo.get(b":path", b""))
        log.debug("h3 %s %s from %s: %d", pseudo.get(b":method"), pseudo.get(b":path"),
                  self._peer, status)
        sid = event.stream_id
        headers = [(b":status", str(status).encode()),
                   (b"content-length", str(len(body)).encode()), *extra]
        self._h3.send_headers(sid, headers, end_stream=not body)
        if body:
            self._h3.send_data(sid, body, end_stream=True)
        if not event.stream_ended:  # answered already: the rest of the request is not wanted
            with contextlib.suppress(ValueError):
                self._quic.stop_stream(sid, ErrorCode.H3_NO_ERROR)
        self._touch()

    def _touch(self) -> None:
        self._stop_timer()
        self._timer = self._loop.call_later(self._idle, self.close)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
