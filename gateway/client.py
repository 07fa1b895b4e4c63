"""The reference device: what an iOS extension does, in Python, over QUIC or TLS.

Tests, benchmarks and the self-test drive it. It runs the same sans-IO protocol module as
the gateway, pins the gateway by key hash before saying hello, acks, and reconnects with
backoff and jitter.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import ssl
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aioquic.asyncio import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.certs import pin_of_der
from gateway.endpoints import Endpoint, normalize_pin
from gateway.internals import connection_of, datagram_transport_of, peer_certificate
from gateway.protocol import ALPN, VERSIONS
from gateway.protocol.messages import ByeReason, Hello
from gateway.protocol.session import (
    Closed,
    DeviceSession,
    ErrorReceived,
    PushReceived,
    Welcomed,
)
from gateway.transport.tls import TlsStream

# a gateway that says one of these does not want this device back soon
FINAL_REASONS = {ByeReason.REPLACED, ByeReason.UNREGISTERED, ByeReason.UNAUTHORIZED,
                 ByeReason.UNSUPPORTED_VERSION, "pin_mismatch"}
# after these, the next attempt goes to another gateway of the site if there is one: this
# one could not be reached, went silent, lost the connection, or is stopping or full
MOVE_ON = {"connect_failed", "lost", ByeReason.HEARTBEAT_TIMEOUT, ByeReason.HELLO_TIMEOUT,
           ByeReason.SHUTDOWN, ByeReason.UNAVAILABLE, ByeReason.DEVICE_LIMIT}


class PinMismatch(Exception):
    pass


@dataclass
class DeviceOptions:
    host: str
    port: int
    pin: str
    transport: str = "quic"
    install_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    topic: str = "com.example.lpgw"
    push_types: tuple[str, ...] = ("alert", "voip", "background", "pushtotalk")
    assertion: str | None = None
    ack: bool = True
    reconnect: bool = True
    auto_call: str | None = None  # ringing | decline | busy for incoming-call pushes
    state_file: Path | None = None
    connect_timeout: float = 10.0
    backoff_min: float = 0.5
    backoff_max: float = 30.0
    # discovery: before each attempt, where the gateway is now and the pin it advertises;
    # called with an address that just failed (to try another), raises LookupError if none
    locate: Callable[[Endpoint | None], Awaitable[tuple[str, int, str]]] | None = None
    remember_pin: bool = False  # keep the pin in state_file (trust on first use)


class _QuicClient(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.on_data: Callable[[bytes], None] = lambda data: None
        self.on_lost: Callable[[str], None] = lambda why: None
        self.on_heard: Callable[[], None] = lambda: None

    def datagram_received(self, data: bytes | str, addr) -> None:
        self.on_heard()  # the gateway's heartbeat is a QUIC PING: no frame will show it
        super().datagram_received(data, addr)

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamDataReceived):
            if event.data:
                self.on_data(event.data)
            if event.end_stream:
                self.on_lost("gateway ended the stream")
        elif isinstance(event, events.ConnectionTerminated):
            self.on_lost(f"QUIC closed: {event.reason_phrase or event.error_code}")


def _close_socket(protocol: QuicConnectionProtocol) -> None:
    transport = datagram_transport_of(protocol)
    if transport is not None:
        transport.close()


class DeviceClient:
    def __init__(self, options: DeviceOptions, emit: Callable[[dict[str, Any]], None]) -> None:
        self.o = options
        self.emit = emit
        self.session: DeviceSession | None = None
        self.last_ack = 0
        self.gateway_id: str | None = None
        self.seen: list[str] = []
        self.token: str | None = None
        self._load_state()
        self._write: Callable[[bytes], None] = lambda data: None
        self._close: Callable[[], None] = lambda: None
        self._ended: asyncio.Future | None = None
        self._quic: _QuicClient | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._stopping = False
        self._ack_to = 0
        self._runner: asyncio.Task | None = None

    # --- lifecycle -------------------------------------------------------------------

    async def run(self) -> str:
        """Connect and stay connected; returns the reason it gave up ("stopped" after
        `stop`, at once even while it waits to reconnect or is connecting)."""
        self._runner = asyncio.current_task()
        try:
            return await self._run()
        except asyncio.CancelledError:
            if not self._stopping or self._runner is None:
                raise
            self._runner.uncancel()  # our own cancel (stop): an answer, not an error
            return "stopped"
        finally:
            self._runner = None

    async def _run(self) -> str:
        delay = self.o.backoff_min
        avoid: Endpoint | None = None
        while True:
            loop = asyncio.get_running_loop()
            started = loop.time()
            try:
                if self.o.locate is not None:
                    await self._locate(avoid)
                reason = await self.connect_once()
            except PinMismatch as exc:
                self.emit({"event": "disconnected", "reason": "pin_mismatch", "message": str(exc)})
                return "pin_mismatch"
            except LookupError as exc:
                reason = "not_found"
                self.emit({"event": "discover_failed", "message": str(exc)})
            except (OSError, TimeoutError, ConnectionError, ssl.SSLError) as exc:
                reason = "connect_failed"
                self.emit({"event": "connect_failed", "message": str(exc) or type(exc).__name__})
            # a gateway that could not be reached, or went silent: try another of the site
            avoid = ((self.o.host, self.o.port) if reason in MOVE_ON else None)
            if self._stopping or reason in FINAL_REASONS or not self.o.reconnect:
                return reason
            if loop.time() - started > 10 or self.token is not None:
                delay = self.o.backoff_min
            wait = delay * random.uniform(0.8, 1.2)
            self.emit({"event": "reconnecting", "in": round(wait, 3)})
            await asyncio.sleep(wait)
            delay = min(delay * 2, self.o.backoff_max)
            self.token = None

    def stop(self) -> None:
        self._stopping = True
        if self.session is not None and self.session.closed is None:
            self.session.close(ByeReason.CLIENT)
            self._flush()
        elif self._runner is not None and not self._runner.done():
            self._runner.cancel()  # waiting to reconnect, or connecting: nobody to tell
        self._close()
        self._finish("stopped")

    def trust(self, advertised_pin: str) -> None:
        """Trust on first use: adopt the pin discovery found, and keep it in the state file.

        From then on it is checked like a configured pin: against every advertisement
        (_locate) and against the key in every handshake (_check_pin).
        """
        self.o.pin = advertised_pin
        self.o.remember_pin = True
        self._save_state()
        self.emit({"event": "trusted", "pin": f"sha256/{normalize_pin(advertised_pin)}"})

    async def _locate(self, avoid: Endpoint | None) -> None:
        """Ask discovery where the gateway is now; refuse one advertising another key."""
        if self.o.locate is None:
            raise LookupError("no discovery to ask")
        host, port, pin = await self.o.locate(avoid)
        if normalize_pin(pin) != normalize_pin(self.o.pin):
            raise PinMismatch(f"the gateway advertises pin sha256/{normalize_pin(pin)}, not "
                              f"the expected sha256/{normalize_pin(self.o.pin)}")
        if (host, port) != (self.o.host, self.o.port):
            self.o.host, self.o.port = host, port
            self.emit({"event": "located", "host": host, "port": port})

    async def connect_once(self) -> str:
        loop = asyncio.get_running_loop()
        self._ended = loop.create_future()
        if self.o.transport == "quic":
            await asyncio.wait_for(self._open_quic(), self.o.connect_timeout)
        else:
            await asyncio.wait_for(self._open_tls(), self.o.connect_timeout)
        self.session = DeviceSession(
            Hello(version=VERSIONS[-1], install_id=self.o.install_id, topic=self.o.topic,
                  push_types=self.o.push_types, assertion=self.o.assertion,
                  last_ack=self.last_ack, gateway_id=self.gateway_id, client="lpgw-device"),
            loop.time())
        self.session.remember_ids(self.seen)
        self._flush()
        self._arm()
        return await self._ended

    # --- transports ------------------------------------------------------------------

    async def _open_tls(self) -> None:
        loop = asyncio.get_running_loop()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the pin below is the check
        ctx.set_alpn_protocols([ALPN])
        opened: asyncio.Future = loop.create_future()

        def on_open(stream: TlsStream) -> None:
            if not opened.done():
                opened.set_result(stream)

        def on_error(why: str) -> None:
            if not opened.done():
                opened.set_exception(ConnectionError(why))

        _, stream = await loop.create_connection(
            lambda: TlsStream(ctx, False, self.o.connect_timeout, on_open, on_error),
            self.o.host, self.o.port)
        stream = await opened
        self._check_pin(stream.ssl.getpeercert(binary_form=True), stream.close)
        stream.on_data = self._on_data
        stream.on_lost = self._on_lost

        def close() -> None:
            stream.on_data = lambda data: None  # a dead connection must not speak into
            stream.on_lost = lambda why: None   # the session of the next one
            stream.close()

        self._write = stream.write
        self._close = close
        self.emit({"event": "connected", "transport": "tls",
                   "peer": f"{self.o.host}:{self.o.port}"})

    async def _open_quic(self) -> None:
        loop = asyncio.get_running_loop()
        config = QuicConfiguration(is_client=True, alpn_protocols=[ALPN],
                                   verify_mode=ssl.CERT_NONE, idle_timeout=60.0)
        info = (await loop.getaddrinfo(self.o.host, self.o.port, type=socket.SOCK_DGRAM))[0][4]
        addr = ("::ffff:" + str(info[0]), info[1], 0, 0) if len(info) == 2 else info
        conn = QuicConnection(configuration=config)
        _, protocol = await loop.create_datagram_endpoint(
            lambda: _QuicClient(conn), sock=_udp_socket())
        protocol.connect(addr)
        try:
            await protocol.wait_connected()
        except ConnectionError:
            _close_socket(protocol)
            raise ConnectionError("QUIC handshake failed") from None
        except BaseException:  # the connect timeout: nothing may keep retransmitting
            conn.close()
            _close_socket(protocol)
            raise
        peer = peer_certificate(conn.tls)
        self._quic = protocol
        stream_id = conn.get_next_available_stream_id()

        def close() -> None:
            protocol.on_data = lambda data: None  # late events of this connection (its
            protocol.on_lost = lambda why: None   # close completes later) are not the next's
            protocol.on_heard = lambda: None
            conn.close(error_code=0, reason_phrase="bye")
            protocol.transmit()
            _close_socket(protocol)

        self._check_pin(peer.public_bytes(Encoding.DER) if peer else b"", close)

        def write(data: bytes) -> None:
            conn.send_stream_data(stream_id, data)
            protocol.transmit()

        protocol.on_data = self._on_data
        protocol.on_lost = self._on_lost
        protocol.on_heard = self._on_heard
        self._write = write
        self._close = close
        self.emit({"event": "connected", "transport": "quic",
                   "peer": f"{self.o.host}:{self.o.port}"})

    async def migrate(self) -> None:
        """Move the QUIC connection to a new local port, as a phone changing network does."""
        if self._quic is None:
            raise RuntimeError("migrate needs a QUIC connection")
        protocol = self._quic
        old = datagram_transport_of(protocol)
        await asyncio.get_running_loop().create_datagram_endpoint(lambda: protocol,
                                                                  sock=_udp_socket())
        if old is not None:
            old.close()
        protocol.change_connection_id()
        connection_of(protocol).send_ping(0)
        protocol.transmit()
        moved = datagram_transport_of(protocol)
        self.emit({"event": "migrated",
                   "local": moved.get_extra_info("sockname")[1] if moved else None})

    def _check_pin(self, der: bytes, close: Callable[[], None]) -> None:
        got = pin_of_der(der) if der else ""
        if got != normalize_pin(self.o.pin):
            close()
            raise PinMismatch(f"gateway key pin sha256/{got} is not the expected "
                              f"sha256/{normalize_pin(self.o.pin)}")

    # --- protocol --------------------------------------------------------------------

    def _on_heard(self) -> None:
        if self.session is not None:
            self.session.heard(asyncio.get_running_loop().time())

    def _on_data(self, data: bytes) -> None:
        if self.session is None:
            return
        loop = asyncio.get_running_loop()
        self._ack_to = 0
        for event in self.session.receive_data(data, loop.time()):
            self._event(event)
        if self._ack_to and self.session is not None:
            self.ack(self._ack_to)  # one cumulative ack for everything in this read
        self._flush()
        self._arm()

    def _event(self, event: Any) -> None:
        if isinstance(event, Welcomed):
            w = event.welcome
            self.token = w.token
            if self.gateway_id != w.gateway_id:
                self.gateway_id, self.last_ack = w.gateway_id, 0
            self.emit({"event": "welcome", "token": w.token, "gateway_id": w.gateway_id,
                       "user": w.user, "heartbeat": w.heartbeat})
        elif isinstance(event, PushReceived):
            p = event.push
            self.emit({"event": "push", "seq": p.seq, "id": p.id, "push_type": p.push_type,
                       "priority": p.priority, "expiration": p.expiration,
                       "collapse_id": p.collapse_id, "payload": p.payload,
                       "duplicate": event.duplicate})
            call = p.payload.get("call") if isinstance(p.payload, dict) else None
            if (self.o.auto_call and self.session is not None and isinstance(call, dict)
                    and isinstance(call.get("id"), str)):
                self.session.call(self.o.auto_call, call["id"])
            if self.o.ack:
                self._ack_to = max(self._ack_to, p.seq)
        elif isinstance(event, ErrorReceived):
            self.emit({"event": "error", "code": event.error.code,
                       "message": event.error.message})
        elif isinstance(event, Closed):
            self.emit({"event": "disconnected", "reason": event.reason, "code": event.code,
                       "message": event.message})
            self._close()
            self._finish(event.reason)

    def ack(self, seq: int) -> None:
        if self.session is not None:
            self.session.ack(seq)
            self.last_ack = self.session.last_ack
            self._flush()
            self._save_state()

    def call(self, action: str, call_id: str) -> None:
        if self.session is not None:
            self.session.call(action, call_id)
            self._flush()

    def unregister(self) -> None:
        if self.session is not None:
            self.session.unregister()
            self._flush()

    def _on_lost(self, why: str) -> None:
        if self._ended is not None and not self._ended.done():
            self.emit({"event": "disconnected", "reason": "lost", "message": why})
            self._finish("lost")

    def _finish(self, reason: str) -> None:
        self._close()
        self._close = lambda: None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._quic = None
        if self.session is not None:
            self.seen = self.session.seen_ids
        self._save_state()
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(reason)

    def _flush(self) -> None:
        if self.session is not None:
            data = self.session.data_to_send()
            if data:
                self._write(data)

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        at = self.session.next_timer() if self.session else None
        if at is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.session is not None:
            for event in self.session.handle_timer(asyncio.get_running_loop().time()):
                self._event(event)
            self._arm()

    # --- state -----------------------------------------------------------------------

    def _load_state(self) -> None:
        path = self.o.state_file
        if path is None or not path.exists():
            self._save_state()
            return
        state = json.loads(path.read_text())
        self.o.install_id = state.get("install_id", self.o.install_id)
        self.gateway_id = state.get("gateway_id")
        self.last_ack = int(state.get("last_ack", 0))
        self.seen = list(state.get("seen", []))[-1024:]
        if state.get("pin") and not self.o.pin:
            self.o.pin, self.o.remember_pin = state["pin"], True

    def _save_state(self) -> None:
        path = self.o.state_file
        if path is None:
            return
        if self.session is not None:
            self.seen = self.session.seen_ids
        state = {"install_id": self.o.install_id, "gateway_id": self.gateway_id,
                 "last_ack": self.last_ack, "seen": self.seen[-1024:]}
        if self.o.remember_pin:
            state["pin"] = self.o.pin
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(path)


def _udp_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", 0))
    return sock
