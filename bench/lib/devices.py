"""Simulated devices, in the load generator's worker processes: lpgw/1 over TLS and QUIC
(the gateway's own DeviceSession, TlsStream and pin check) and MQTT over TLS, thousands to
an asyncio loop (see loadgen.py for why these are lighter than gateway.client)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import random
import resource
import signal
import socket
import ssl
import time
from multiprocessing.connection import Connection
from typing import Any

from aioquic.quic import events as qevents
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from cryptography.hazmat.primitives.serialization import Encoding

from gateway import internals
from gateway.certs import pin_of_der
from gateway.client import FINAL_REASONS as FINAL
from gateway.core.metrics import Metrics
from gateway.protocol import ALPN, VERSIONS
from gateway.protocol.messages import ByeReason, Hello
from gateway.protocol.session import Closed, DeviceSession, PushReceived, Welcomed
from gateway.service import watch_garbage_collector
from gateway.transport.link import ignore
from gateway.transport.tls import TlsStream
from lib import host
from lib.host import raise_nofile
from lib.mqtt import (
    DISCONNECT,
    PINGREQ,
    MqttDecoder,
    client_context,
    mqtt_connect,
    mqtt_stamp,
    mqtt_subscribe,
)
from lib.payloads import STAMP, TOPIC

# --- devices (in the workers) -------------------------------------------------------------

IDLE, CONNECTING, WELCOMED, FINAL_STATE = 0, 1, 2, 3


class BenchSession(DeviceSession):
    """DeviceSession that counts the pongs it sends (one per gateway heartbeat)."""

    pongs = 0  # per process: each worker is one

    def _send(self, message: dict[str, Any]) -> None:
        if message.get("type") == "pong":
            BenchSession.pongs += 1
        super()._send(message)


class QuicClientProtocol(asyncio.DatagramProtocol):
    """One device's UDP socket: datagrams into its QuicConnection, timers, out again."""

    __slots__ = ("dev", "loop", "quic", "stream_id", "timer", "timer_at", "transport")
    heard = 0  # per process: datagrams welcomed devices received (idle: the gateway's PINGs)

    def __init__(self, dev: Device, quic: QuicConnection) -> None:
        self.dev = dev
        self.quic = quic
        self.transport: asyncio.DatagramTransport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at: float | None = None
        self.loop = asyncio.get_running_loop()
        self.stream_id: int | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.dev is None:
            return
        self.quic.receive_datagram(data, addr, now=self.loop.time())
        if self.dev.state == WELCOMED:
            QuicClientProtocol.heard += 1
        self.process()

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors: aioquic retransmits or times out on its own

    def process(self) -> None:
        event = self.quic.next_event()
        while event is not None and self.dev is not None:
            if isinstance(event, qevents.HandshakeCompleted):
                self.dev.quic_open(self)
            elif isinstance(event, qevents.StreamDataReceived):
                if event.data:
                    self.dev.on_data(event.data)
                if event.end_stream:
                    self.dev.on_lost("gateway ended the stream")
            elif isinstance(event, qevents.ConnectionTerminated):
                self.dev.on_lost(f"QUIC closed: {event.reason_phrase or event.error_code}")
            event = self.quic.next_event()
        self.transmit()

    def transmit(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        for data, addr in self.quic.datagrams_to_send(now=self.loop.time()):
            self.transport.sendto(data, addr)
        at = self.quic.get_timer()
        if self.timer is not None and self.timer_at != at:
            self.timer.cancel()
            self.timer = None
        if self.timer is None and at is not None:
            self.timer = self.loop.call_at(at, self.on_timer)
        self.timer_at = at

    def on_timer(self) -> None:
        self.timer = None
        if self.dev is None:
            return
        now = max(self.timer_at or 0.0, self.loop.time())
        self.timer_at = None
        self.quic.handle_timer(now=now)
        self.process()

    def write(self, data: bytes) -> None:
        if self.stream_id is not None:
            self.quic.send_stream_data(self.stream_id, data)
            self.transmit()

    def close(self) -> None:
        self.dev = None
        if self.transport is None or self.transport.is_closing():
            return
        with contextlib.suppress(Exception):
            self.quic.close(error_code=0, reason_phrase="bye")
            self.transmit()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.transport.close()


class Device:
    """One simulated phone: connect, hello (or MQTT CONNECT), answer, ack, count."""

    __slots__ = (
        "assertion",
        "attempts",
        "drops",
        "final",
        "gateway_id",
        "i",
        "ident",
        "last_ack",
        "mqtt",
        "mqtt_decoder",
        "pings",
        "prepared",
        "pushes",
        "retry",
        "seen",
        "session",
        "state",
        "stream",
        "subscribed",
        "t_attempt",
        "t_delivered",
        "t_push",
        "t_start",
        "t_welcome",
        "task",
        "token",
        "w",
        "want_pushes",
    )

    def __init__(self, w: Worker, i: int, ident: str) -> None:
        self.w = w
        self.i = i
        self.ident = ident
        self.assertion: str | None = None  # a user assertion (JWT) for its hello, if any
        self.state = IDLE
        self.attempts = 0
        self.t_start = 0.0
        self.t_attempt = 0.0
        self.t_welcome = 0.0
        self.t_delivered = 0.0
        self.session: DeviceSession | None = None
        self.stream: Any = None  # TlsStream or QuicClientProtocol
        self.token: str | None = None
        self.last_ack = 0
        self.gateway_id: str | None = None
        self.seen: list[str] = []
        self.pushes = 0
        self.want_pushes = 0
        self.t_push = 0.0
        self.final: str | None = None
        self.retry: asyncio.TimerHandle | None = None
        self.drops = 0
        self.mqtt = w.kind == "mqtt"
        self.mqtt_decoder: MqttDecoder | None = None
        self.pings = 0
        self.subscribed = False
        self.task: asyncio.Task | None = None
        self.prepared: tuple[QuicClientProtocol, list[tuple[bytes, Any]]] | None = None

    # connecting

    def start(self) -> None:
        """Begin connecting (the scheduled start of this device in this round)."""
        self.t_start = self.w.loop.time()
        self.attempt()

    def attempt(self) -> None:
        self.retry = None
        if self.state in (WELCOMED, FINAL_STATE) or self.w.stopping:
            self.drop_prepared()
            return
        prepared, self.prepared = self.prepared, None
        self.state = CONNECTING
        self.attempts += 1
        self.t_attempt = self.w.loop.time()
        self.w.inflight += 1
        if prepared is None:
            self.task = self.w.loop.create_task(self.open())
            return
        proto, first_flight = prepared
        self.stream = proto
        for data, addr in first_flight:
            proto.transport.sendto(data, addr)
        proto.transmit()  # nothing more to send yet: arms its retransmission timer

    async def prepare(self, at: float) -> None:
        """Build this phone's first QUIC flight now, for sending at `at` (loop time).

        A storm of real phones is thousands of CPUs each building its own ClientHello
        (~0.6 ms of Python here: key share, Initial keys, packet; ~1.2 ms with its socket).
        One load-generator core building 10,000 of them in the storm's first second kept
        the gateway waiting (40% busy for ~9 s, measured), so the harness does it before
        the storm. aioquic is given `at` as the time, so its timers and RTT samples are as
        if built then.
        """
        proto = await self.quic_endpoint()
        proto.quic.connect((self.w.host, self.w.port), now=at)
        self.prepared = (proto, proto.quic.datagrams_to_send(now=at))

    async def quic_endpoint(self) -> QuicClientProtocol:
        """A fresh UDP socket on this worker's source address with a new QuicConnection."""
        w = self.w
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.bind((w.src, 0))
        quic = QuicConnection(configuration=w.qconfig)
        _, proto = await w.loop.create_datagram_endpoint(
            lambda: QuicClientProtocol(self, quic), sock=sock)
        return proto

    async def open(self) -> None:
        w = self.w
        try:
            if w.transport == "quic":
                proto = await self.quic_endpoint()
                self.stream = proto
                proto.quic.connect((w.host, w.port), now=w.loop.time())
                proto.transmit()
            else:
                def factory() -> TlsStream:
                    s = TlsStream(w.ctx, False, w.connect_timeout, self.tls_open, self.on_error,
                                  alpn=w.alpn)
                    s.on_lost = self.on_lost
                    self.stream = s
                    return s
                await w.loop.create_connection(factory, w.host, w.port,
                                               local_addr=(w.src, 0))
        except OSError as exc:
            self.failed(f"connect: {exc.strerror or exc}")

    def check_pin(self, der: bytes) -> bool:
        w = self.w
        if der and der == w.good_der:
            return True
        if der and pin_of_der(der) == w.pin:
            w.good_der = der
            return True
        self.final = "pin_mismatch"
        self.give_up()
        return False

    def tls_open(self, stream: TlsStream) -> None:
        if self.state != CONNECTING or stream is not self.stream:
            stream.close()
            return
        if not self.check_pin(stream.ssl.getpeercert(binary_form=True)):
            return
        stream.on_data = self.on_data
        self.opened()

    def quic_open(self, proto: QuicClientProtocol) -> None:
        if self.state != CONNECTING or proto is not self.stream:
            proto.close()
            return
        peer = internals.peer_certificate(proto.quic.tls)
        if not self.check_pin(peer.public_bytes(Encoding.DER) if peer is not None else b""):
            return
        proto.stream_id = proto.quic.get_next_available_stream_id()
        self.opened()

    def opened(self) -> None:
        """Transport up and the pin checked: say hello (or CONNECT)."""
        w = self.w
        if self.mqtt:
            self.mqtt_decoder = MqttDecoder()
            self.stream.write(mqtt_connect(self.ident, int(w.heartbeat * 1.5) + 1, w.clean))
            return
        self.session = BenchSession(
            Hello(version=VERSIONS[-1], install_id=self.ident, topic=TOPIC,
                  push_types=("alert", "voip", "background"), assertion=self.assertion,
                  last_ack=self.last_ack, gateway_id=self.gateway_id, client="lpgw-bench"),
            w.loop.time(), welcome_timeout=w.connect_timeout)
        if self.seen:
            self.session.remember_ids(self.seen)
        self.flush()

    def on_error(self, why: str) -> None:
        self.w.count("handshake_errors")

    def failed(self, why: str) -> None:
        """This attempt failed before the device was welcomed: retry with backoff."""
        if self.state != CONNECTING:
            return
        self.w.inflight -= 1
        self.w.count("attempt_failures")
        self.w.last_error = why
        self.drop_stream()
        self.state = IDLE
        w = self.w
        if w.stopping or w.loop.time() > w.deadline or self.attempts >= w.max_attempts:
            self.final = self.final or f"gave up after {self.attempts} attempts: {why}"
            self.state = FINAL_STATE
            return
        delay = min(w.backoff * 2 ** (self.attempts - 1), 8.0) * random.uniform(0.8, 1.2)
        self.retry = w.loop.call_later(delay, self.attempt)

    def give_up(self) -> None:
        if self.state == CONNECTING:
            self.w.inflight -= 1
        self.drop_stream()
        self.state = FINAL_STATE

    def drop_prepared(self) -> None:
        """A first flight built but never sent: its socket goes too."""
        prepared, self.prepared = self.prepared, None
        if prepared is not None:
            prepared[0].close()

    def drop_stream(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()  # a TCP connect still pending
        self.task = None
        self.drop_prepared()
        stream, self.stream = self.stream, None
        if isinstance(stream, TlsStream):
            stream.on_lost = stream.on_data = ignore  # no late callbacks from this one
        if stream is not None:
            stream.close()
        if self.session is not None:
            self.seen = self.session.seen_ids
            self.session = None

    def on_lost(self, why: str) -> None:
        if self.state == CONNECTING:
            self.failed(why)
        elif self.state == WELCOMED:
            self.drop_stream()
            self.state = IDLE
            self.w.count("drops")
            self.drops += 1
            if self.w.reconnect and not self.w.stopping:
                self.retry = self.w.loop.call_later(random.uniform(0.2, 1.0), self.attempt)

    def welcomed(self) -> None:
        self.state = WELCOMED
        self.t_welcome = self.w.loop.time()
        self.w.inflight -= 1
        self.w.welcomed += 1
        self.w.maybe_done()

    # talking

    def flush(self) -> None:
        if self.session is not None and self.stream is not None:
            data = self.session.data_to_send()
            if data:
                self.stream.write(data)

    def on_data(self, data: bytes) -> None:
        if self.mqtt:
            self.on_mqtt(data)
            return
        if self.session is None:
            return
        ack = 0
        for event in self.session.receive_data(data, self.w.loop.time()):
            if isinstance(event, Welcomed):
                self.token = event.welcome.token
                if event.welcome.user:
                    self.w.count("welcomed_as_user")
                if self.gateway_id != event.welcome.gateway_id:
                    self.gateway_id, self.last_ack = event.welcome.gateway_id, 0
                if self.state == CONNECTING:
                    self.welcomed()
            elif isinstance(event, PushReceived):
                ack = max(ack, event.push.seq)
                if not event.duplicate:
                    self.got_push(event.push.payload.get(STAMP))
                else:
                    self.w.count("duplicates")
            elif isinstance(event, Closed):
                self.closed_by_gateway(event.reason)
                return
        if ack and self.session is not None:
            self.session.ack(ack)
            self.last_ack = self.session.last_ack
        self.flush()

    def got_push(self, stamp: Any = None) -> None:
        if isinstance(stamp, int):
            self.w.latencies.append((time.monotonic_ns() - stamp) / 1e6)
        self.pushes += 1
        self.t_push = self.w.loop.time()
        self.w.pushes += 1
        if self.want_pushes and self.pushes >= self.want_pushes and not self.t_delivered:
            self.t_delivered = self.t_push
            self.w.delivered_devices += 1
            self.w.maybe_done()

    def closed_by_gateway(self, reason: str) -> None:
        self.w.count(f"bye_{reason}")
        if reason in FINAL:
            self.final = reason
            self.give_up()
        else:
            self.on_lost(f"bye {reason}")

    def on_mqtt(self, data: bytes) -> None:
        assert self.mqtt_decoder is not None
        try:
            packets = self.mqtt_decoder.feed(data)
        except ValueError as exc:
            self.on_lost(str(exc))
            return
        for first, body in packets:
            kind = first >> 4
            if kind == 2:  # CONNACK
                if body[1] != 0:
                    self.final = f"connack_{body[1]}"
                    self.give_up()
                    return
                if self.w.subscribe and not self.subscribed:
                    self.stream.write(mqtt_subscribe(f"bench/{self.ident}"))
                elif self.state == CONNECTING:
                    self.welcomed()
            elif kind == 9:  # SUBACK
                self.subscribed = True
                if self.state == CONNECTING:
                    self.welcomed()
            elif kind == 3:  # PUBLISH
                qos = (first >> 1) & 3
                tlen = int.from_bytes(body[:2], "big")
                if qos:
                    pid = body[2 + tlen:4 + tlen]
                    self.stream.write(b"\x40\x02" + pid)
                if first & 0x08:  # DUP: the broker re-sent it
                    self.w.count("duplicates")
                else:
                    self.got_push(mqtt_stamp(body[2 + tlen + (2 if qos else 0):]))
            elif kind == 13:  # PINGRESP
                self.pings += 1
                self.w.pings += 1

    def ping(self) -> None:
        """MQTT keepalive: the client pings (lpgw: the gateway pings and we answer)."""
        if self.mqtt and self.state == WELCOMED and self.stream is not None:
            self.stream.write(PINGREQ)

    def close(self) -> None:
        if self.retry is not None:
            self.retry.cancel()
            self.retry = None
        if self.state == CONNECTING:
            self.w.inflight -= 1
        if self.stream is not None:
            if self.mqtt and self.state == WELCOMED:
                self.stream.write(DISCONNECT)
            elif self.session is not None and self.session.closed is None:
                self.session.close(ByeReason.CLIENT)
                self.flush()
        self.drop_stream()
        if self.state != FINAL_STATE:
            self.state = IDLE


class Worker:
    """One process: an asyncio loop, its devices, and a pipe to the harness."""

    def __init__(self, conn: Connection, wid: int) -> None:
        self.conn = conn
        self.wid = wid
        self.src = f"127.0.0.{2 + wid}"
        self.devices: list[Device] = []
        self.counts: dict[str, int] = {}
        self.inflight = 0
        self.welcomed = 0
        self.pushes = 0
        self.pings = 0
        self.latencies: list[float] = []  # ms, publisher write -> device read (STAMP)
        self.delivered_devices = 0
        self.stopping = False
        self.reconnect = True
        self.deadline = 0.0
        self.max_attempts = 20
        self.backoff = 0.5
        self.last_error = ""
        self.good_der: bytes | None = None
        self.waiter: asyncio.Future | None = None
        self.target_welcomed = 0
        self.target_delivered = 0
        self.ping_task: asyncio.Task | None = None
        self.subscribe = False
        self.clean = True
        # a full pass over thousands of simulated phones stops them all at once, which a
        # real phone (one connection, its own CPU) never sees: counted, so that such a stall
        # is not taken for the server's (the gateway's own timing, on this worker)
        self.gc = Metrics()
        watch_garbage_collector(self.gc)

    def count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    async def main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.done = self.loop.create_future()
        self.loop.add_reader(self.conn.fileno(), self.on_command)
        await self.done
        for d in self.devices:
            d.close()
        await asyncio.sleep(0.1)

    def on_command(self) -> None:
        try:
            msg = self.conn.recv()
        except (EOFError, OSError):
            self.loop.remove_reader(self.conn.fileno())
            if not self.done.done():
                self.done.set_result(None)
            return
        self.loop.create_task(self.run_command(msg))

    async def run_command(self, msg: dict) -> None:
        op = msg["op"]
        try:
            reply = await getattr(self, "cmd_" + op)(**msg.get("args", {}))
        except Exception as exc:  # report, don't die: the harness decides
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        self.conn.send({"op": op, "wid": self.wid, **(reply or {})})

    async def cmd_setup(self, kind: str, transport: str, host: str, port: int, pin: str,
                        idents: list[str], heartbeat: float, connect_timeout: float = 20.0,
                        assertions: list[str | None] | None = None) -> dict:
        self.kind, self.transport, self.host, self.port = kind, transport, host, port
        self.pin = pin.removeprefix("sha256/")
        self.heartbeat = heartbeat
        self.connect_timeout = connect_timeout
        self.alpn: tuple[str | None, ...] = (ALPN,) if kind == "lpgw" else (None,)
        self.ctx = client_context(ALPN if kind == "lpgw" else None)  # the pin is the check
        self.qconfig = QuicConfiguration(is_client=True, alpn_protocols=[ALPN],
                                         verify_mode=ssl.CERT_NONE, idle_timeout=60.0)
        if transport == "quic":
            internals.offer_one_key_share()
        self.devices = [Device(self, i, ident) for i, ident in enumerate(idents)]
        for d, assertion in zip(self.devices, assertions or (), strict=False):
            d.assertion = assertion
        if kind == "mqtt":
            self.ping_task = self.loop.create_task(self.mqtt_pinger())
        return {"devices": len(self.devices)}

    async def mqtt_pinger(self) -> None:
        """Every device sends PINGREQ once per heartbeat, spread over the interval."""
        tick = 0
        slots = max(1, int(self.heartbeat * 10))
        while True:
            await asyncio.sleep(0.1)
            tick += 1
            for d in self.devices[tick % slots::slots]:
                d.ping()

    def maybe_done(self) -> None:
        if self.waiter is not None and not self.waiter.done() \
                and self.welcomed >= self.target_welcomed \
                and self.delivered_devices >= self.target_delivered:
            self.waiter.set_result(None)

    async def cmd_connect(self, first: int, count: int, start_at: float, spread: float,
                          concurrency: int, deadline: float, expect_pushes: int = 0,
                          subscribe: bool = False, clean: bool = True,
                          max_attempts: int = 20, prepare: bool = False) -> dict:
        """Connect devices [first, first+count): start times spread over `spread` seconds
        from `start_at` (monotonic), at most `concurrency` handshakes in flight (0: no cap);
        return when all are welcomed (and got `expect_pushes` each) or at `deadline`."""
        loop = self.loop
        gc.unfreeze()  # what went before may be garbage now
        targets = self.devices[first:first + count]
        self.deadline, self.max_attempts = deadline, max_attempts
        self.subscribe, self.clean, self.stopping = subscribe, clean, False
        self.welcomed = sum(1 for d in self.devices if d.state == WELCOMED)
        self.target_welcomed = self.welcomed + sum(1 for d in targets if d.state != WELCOMED)
        self.delivered_devices = 0
        self.target_delivered = len(targets) if expect_pushes else 0
        for d in targets:
            d.pushes, d.t_delivered, d.want_pushes = 0, 0.0, expect_pushes
            d.attempts, d.t_welcome, d.final = 0, 0.0, None
            if d.state == FINAL_STATE:
                d.state = IDLE
        cpu0 = time.process_time()
        self.waiter = loop.create_future()
        self.maybe_done()
        pending = [d for d in targets if d.state != WELCOMED]
        pump: asyncio.Task | None = None
        if concurrency:
            async def feed() -> None:
                for d in pending:
                    while self.inflight >= concurrency:
                        await asyncio.sleep(0.005)
                    d.start()
            await asyncio.sleep(max(0.0, start_at - loop.time()))
            pump = loop.create_task(feed())
        else:
            step = spread / max(1, len(pending))
            if prepare and self.transport == "quic":
                for k, d in enumerate(pending):
                    await d.prepare(start_at + k * step)
                late = sum(1 for k in range(len(pending)) if start_at + k * step < loop.time())
                if late:  # built after their start time: the harness asked too little time
                    self.counts["prepared_late"] = self.counts.get("prepared_late", 0) + late
            for k, d in enumerate(pending):
                loop.call_at(start_at + k * step, d.start)
        sweeper = loop.create_task(self.sweep(targets))
        try:
            await asyncio.wait_for(self.waiter, max(0.1, deadline - loop.time()))
        except TimeoutError:
            pass
        finally:
            sweeper.cancel()
            if pump is not None:
                pump.cancel()
        self.stopping = True  # no more retries from this round
        for d in targets:
            if d.retry is not None:
                d.retry.cancel()
                d.retry = None
        # the phones held now stay: no later pass of this worker's collector need visit
        # them (a full pass over 10,000 of them stalled every one for ~1 s).
        # Once the reply has gone: the harness times this command (a ramp's seconds).
        loop.call_soon(self.freeze)
        return self.report(targets, start_at, time.process_time() - cpu0)

    def freeze(self) -> None:
        gc.collect()
        gc.freeze()

    async def sweep(self, targets: list[Device]) -> None:
        """Abort attempts that take longer than connect_timeout (then they retry)."""
        while True:
            await asyncio.sleep(0.5)
            limit = self.loop.time() - self.connect_timeout
            for d in targets:
                if d.state == CONNECTING and d.t_attempt < limit:
                    self.count("attempt_timeouts")
                    d.failed("no welcome within the connect timeout")

    def report(self, targets: list[Device], start_at: float, cpu: float) -> dict:
        welcome = [d.t_welcome - start_at for d in targets if d.t_welcome]
        latency = [d.t_welcome - d.t_start for d in targets if d.t_welcome]
        delivered = [d.t_delivered - start_at for d in targets if d.t_delivered]
        return {
            "devices": len(targets),
            "welcomed": len(welcome),
            "welcome_at": welcome,
            "welcome_latency": latency,
            "delivered_at": delivered,
            "pushes": sum(d.pushes for d in targets),
            "attempts": sum(d.attempts for d in targets),
            "retried": sum(1 for d in targets if d.attempts > 1),
            "final": [d.final for d in targets if d.final],
            "not_welcomed": sum(1 for d in targets if not d.t_welcome),
            "tokens": [d.token if not d.mqtt else f"bench/{d.ident}" for d in targets],
            "counts": dict(self.counts),
            "last_error": self.last_error,
            "cpu_seconds": round(cpu, 3),
        }

    async def cmd_stats(self) -> dict:
        rusage = resource.getrusage(resource.RUSAGE_SELF)
        return {"connected": sum(1 for d in self.devices if d.state == WELCOMED),
                "pings": self.pings + BenchSession.pongs + QuicClientProtocol.heard,
                "pushes": self.pushes, "counts": dict(self.counts),
                "cpu_seconds": round(rusage.ru_utime + rusage.ru_stime, 3),
                "maxrss_kib": rusage.ru_maxrss,
                "gc_full_passes": int(self.gc.value("lpgw_gc_pause_seconds_count",
                                                    generation="2")),
                "gc_full_seconds": self.gc.value("lpgw_gc_pause_seconds_sum", generation="2")}

    async def cmd_latencies(self) -> dict:
        """The push latencies measured since the last call (and forget them)."""
        out, self.latencies = self.latencies, []
        return {"latencies": out}

    async def cmd_close(self, timeout: float = 10.0) -> dict:
        gc.unfreeze()
        self.stopping = True
        for d in self.devices:
            d.close()
        await asyncio.sleep(0.2)
        return {"closed": len(self.devices)}

    async def cmd_exit(self) -> dict:
        self.done.set_result(None)
        return {}


def worker_entry(conn: Connection, wid: int) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise_nofile()
    if host.CPUS is not None:
        os.sched_setaffinity(0, host.CPUS["clients"])
    with contextlib.suppress(KeyboardInterrupt):
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the harness stops us
        asyncio.run(Worker(conn, wid).main())


