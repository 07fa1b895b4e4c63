"""QUIC via aioquic: one client-opened bidirectional stream per device session.

aioquic has no keepalive of its own; the session's pings keep the connection inside the
idle timeout. Connection migration (a phone whose address changes) is aioquic's, unchanged.
The same listener answers ALPN "h3" with a liveness check only (see h3health): such a
connection is handed to H3Health and never reaches the device code.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

from aioquic.asyncio import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import stream_is_client_initiated, stream_is_unidirectional

from gateway.core.metrics import Metrics
from gateway.protocol import ALPN
from gateway.transport import h3health

log = logging.getLogger("lpgw.quic")

ERROR_STREAM_REFUSED = 0x10  # application error code for a second stream


def server_configuration(cert: str, key: str, idle_timeout: float,
                         max_frame: int) -> QuicConfiguration:
    config = QuicConfiguration(is_client=False, alpn_protocols=[ALPN, h3health.ALPN],
                               idle_timeout=idle_timeout)
    config.load_cert_chain(cert, key)
    # room for one frame in flight plus a little, per stream and connection
    config.max_stream_data = max(4 * max_frame, 65536)
    config.max_data = config.max_stream_data * 2
    return config


class QuicDeviceProtocol(QuicConnectionProtocol):
    """A device over QUIC, bridged to a GatewayLink once the handshake is done."""

    def __init__(self, *args, make_link: Callable, metrics: Metrics, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._make_link = make_link
        self._metrics = metrics
        self._stream_id: int | None = None
        self._link = None
        self._closing = False
        self._h3: h3health.H3Health | None = None

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if self._h3 is not None:
            self._h3.quic_event_received(event)
        elif isinstance(event, events.HandshakeCompleted):
            if event.alpn_protocol == h3health.ALPN:
                self._h3 = h3health.H3Health(self._quic, self.transmit, self._peer())
                return
            self._link = self._make_link("quic", self._peer(), self._write, self._close)
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
            self._quic.stop_stream(sid, ERROR_STREAM_REFUSED)
            if not stream_is_unidirectional(sid):
                self._quic.reset_stream(sid, ERROR_STREAM_REFUSED)
            return
        if self._link is None:
            return
        if event.data:
            self._link.data_received(event.data)
        if event.end_stream:
            self._link.connection_lost("device ended its stream")
            self._close("stream ended")

    def _write(self, data: bytes) -> None:
        if self._stream_id is None or self._closing:
            return
        self._quic.send_stream_data(self._stream_id, data)
        self.transmit()

    def _close(self, reason: str = "bye") -> None:
        """End the stream (after the bye) and the connection; `reason` is the close phrase."""
        if self._closing:
            return
        self._closing = True
        if self._stream_id is not None:
            with contextlib.suppress(ValueError, AssertionError):
                self._quic.send_stream_data(self._stream_id, b"", end_stream=True)
        self.transmit()  # the bye leaves before CONNECTION_CLOSE
        self._quic.close(error_code=0, reason_phrase=reason)
        self.transmit()

    def _peer(self) -> str:
        addr = self._quic._network_paths[0].addr if self._quic._network_paths else None
        return f"{addr[0]}:{addr[1]}" if addr else "?"
