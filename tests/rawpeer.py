"""Raw peers that say exactly the bytes a test wants, over TLS and QUIC.

TLS uses asyncio's own ssl client (not the gateway's MemoryBIO code); QUIC uses aioquic.
"""

from __future__ import annotations

import asyncio
import ssl
import uuid

from aioquic.asyncio import QuicConnectionProtocol, connect
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration

from gateway.protocol.frames import FrameDecoder, decode_body, encode_frame


def hello(**over) -> dict:
    d = {"type": "hello", "version": 1, "install_id": str(uuid.uuid4()),
         "topic": "com.example.app", "push_types": ["alert"]}
    d.update(over)
    return d


class RawPeer:
    def __init__(self) -> None:
        self.incoming: asyncio.Queue[bytes | dict | None] = asyncio.Queue()
        self._decoder = FrameDecoder(1 << 20)
        self._pending: list[dict] = []
        self.close_reason: str | None = None  # QUIC's CONNECTION_CLOSE reason phrase

    async def send(self, message: dict) -> None:
        await self.send_bytes(encode_frame(message))

    async def read(self, timeout: float = 5.0) -> dict | None:
        """The next frame from the gateway, or None once it closed the connection."""
        async with asyncio.timeout(timeout):
            while not self._pending:
                data = await self.incoming.get()
                if data is None:
                    self.incoming.put_nowait(None)
                    return None
                if isinstance(data, dict):  # a QUIC PING, shown where it came
                    self._pending.append(data)
                    continue
                self._pending.extend(decode_body(b) for b in self._decoder.feed(data))
            return self._pending.pop(0)

    async def read_until_closed(self, timeout: float = 5.0) -> list[dict]:
        frames = []
        while (frame := await self.read(timeout)) is not None:
            frames.append(frame)
        return frames


class RawTls(RawPeer):
    @classmethod
    async def open(cls, port: int, alpn: list[str] | None = None,
                   host: str = "127.0.0.1") -> RawTls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols(alpn or ["lpgw/1"])
        self = cls()
        self.reader, self.writer = await asyncio.open_connection(host, port, ssl=ctx)
        self._pump = asyncio.create_task(self._read_loop())
        return self

    async def _read_loop(self) -> None:
        try:
            while data := await self.reader.read(65536):
                self.incoming.put_nowait(data)
        except (ConnectionError, ssl.SSLError):
            pass
        self.incoming.put_nowait(None)

    async def send_bytes(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def mute(self) -> None:
        """Answer nothing: this peer never answers pings anyway."""

    async def close(self) -> None:
        self._pump.cancel()
        self.writer.close()


class _Proto(QuicConnectionProtocol):
    peer: RawQuic

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamDataReceived):
            self.peer.incoming.put_nowait(event.data)
            if event.end_stream:
                self.peer.incoming.put_nowait(None)
        elif isinstance(event, events.ConnectionTerminated):
            self.peer.close_reason = event.reason_phrase
            self.peer.incoming.put_nowait(None)


class _Muted:
    """A datagram transport that drops what is sent through it."""

    def __init__(self, transport) -> None:
        self._transport = transport

    def sendto(self, data, addr=None) -> None:
        pass

    def __getattr__(self, name):
        return getattr(self._transport, name)


class RawQuic(RawPeer):
    @classmethod
    async def open(cls, port: int, alpn: list[str] | None = None) -> RawQuic:
        self = cls()
        config = QuicConfiguration(is_client=True, alpn_protocols=alpn or ["lpgw/1"],
                                   verify_mode=ssl.CERT_NONE)
        self._cm = connect("127.0.0.1", port, configuration=config, create_protocol=_Proto)
        self.protocol = await self._cm.__aenter__()
        self.protocol.peer = self
        self.stream_id = self.protocol._quic.get_next_available_stream_id()
        self._show_pings()
        return self

    def _show_pings(self) -> None:
        """Put each QUIC PING frame the gateway sends (its heartbeat over QUIC) into the
        frames read as {"type": "ping", "quic": True}. aioquic acknowledges it by itself and
        has no event for it, so this wraps its PING handler (tests only)."""
        handlers = self.protocol._quic._QuicConnection__frame_handlers
        original, epochs = handlers[0x01]

        def on_ping(context, frame_type, buf):
            self.incoming.put_nowait({"type": "ping", "quic": True})
            return original(context, frame_type, buf)

        handlers[0x01] = (on_ping, epochs)

    def mute(self) -> None:
        """Send nothing any more, acknowledgements included: a phone gone out of range.
        aioquic goes on running (its timers end the connection in the end)."""
        self.protocol._transport = _Muted(self.protocol._transport)

    async def send_bytes(self, data: bytes) -> None:
        self.protocol._quic.send_stream_data(self.stream_id, data)
        self.protocol.transmit()

    async def close(self) -> None:
        self.protocol.close()


async def open_raw(transport: str, port: int, alpn: list[str] | None = None) -> RawPeer:
    return await (RawQuic if transport == "quic" else RawTls).open(port, alpn)
