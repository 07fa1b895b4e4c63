"""SIP over UDP and TCP: sockets and the clock for the sans-IO SIP bridge.

Every input is handled inside `faults.contained`: a failure costs the one datagram, TCP
message, response or timer tick it came from (counted in
lpgw_internal_errors_total{where}, logged at most once a minute per where), and the
listeners and the bridge's timer go on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import re
import socket
import time
from pathlib import Path

from gateway import faults
from gateway.config import SipConfig
from gateway.core.calls import Calls, CallSettings
from gateway.core.clock import ClockWatch
from gateway.core.delivery import Delivery, Rejected
from gateway.core.metrics import Metrics
from gateway.core.storage import Storage
from gateway.sip.bridge import (
    SIP_STATUS,
    AwaitKeeps,
    CallPushed,
    Ringing,
    Route,
    SipBridge,
    SipOutput,
    UserRouter,
)
from gateway.sip.message import SipError, StreamFramer
from gateway.sip.register import Account, PbxLink
from gateway.sip.transaction import Peer, Send
from gateway.sip.trust import (
    DigestPolicy,
    SourcePolicy,
    read_credentials,
    source_policy,
)
from gateway.transport.pump import Keeper, Pump

log = logging.getLogger("lpgw.sip")

MAX_TCP_CONNECTIONS = 256
TCP_IDLE = 300.0
TIMER_RETRY = 1.0  # seconds before the timer runs again after a tick that failed


class SipTransport:
    """Owns the UDP socket, the TCP listener and connections, and the bridge's timer."""

    def __init__(self, bridge: SipBridge, metrics: Metrics, pump: Pump,
                 keeper: Keeper | None = None) -> None:
        self.bridge = bridge
        self.metrics = metrics
        self.pump = pump
        self.keeper = keeper  # in a site of gateways: where pushes are kept
        pump.bridge, pump.calls, pump.sip = bridge, bridge.calls, self
        self._loop = asyncio.get_running_loop()
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp_server: asyncio.AbstractServer | None = None
        self._conns: dict[int, _SipStream] = {}
        self._ids = itertools.count(1)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._clock: ClockWatch | None = None
        self._out: dict[tuple[str, int], _SipStream] = {}
        self._pending: dict[tuple[str, int], list[bytes]] = {}
        self._tasks: set[asyncio.Task] = set()
        self.invite_latencies: collections.deque[float] = collections.deque(maxlen=10000)
        self.ringing_latencies: collections.deque[float] = collections.deque(maxlen=10000)
        self._started = 0.0
        self.port = 0

    async def start(self, host: str, port: int, udp: bool = True, tcp: bool = True) -> None:
        bind = None if host in ("::", "") else host
        if tcp:
            self._tcp_server = await self._loop.create_server(
                lambda: _SipStream(self), bind, port, reuse_address=True)
            port = port or self._tcp_server.sockets[0].getsockname()[1]
        if udp:
            self._udp, _ = await self._loop.create_datagram_endpoint(
                lambda: _SipDatagrams(self), local_addr=(host or "::", port))
            port = port or self._udp.get_extra_info("sockname")[1]
        self.port = port

    async def stop(self) -> None:
        """Close everything; each step runs even when another fails (SIGTERM drains)."""
        timer, self._timer = self._timer, None
        udp, self._udp = self._udp, None
        server, self._tcp_server = self._tcp_server, None
        steps = [timer.cancel if timer else None, udp.close if udp else None,
                 server.close if server else None,
                 *(conn.transport.close for conn in list(self._conns.values())),
                 *(task.cancel for task in list(self._tasks))]
        for step in steps:
            if step is not None:
                with faults.contained(self.metrics, "sip_stop"):
                    step()

    # --- in ---------------------------------------------------------------------------

    def received(self, data: bytes, peer: Peer, stream: bool) -> None:
        """One datagram or TCP message; whatever fails in it stays with it."""
        self._started = time.perf_counter()
        with faults.contained(self.metrics, "sip_message", f"{peer.transport}:{peer.host}"):
            self.bridge.receive(data, peer, self._now(), stream=stream)
        # the phones' frames first, then the 100 Trying and whatever else the bridge said
        self.pump.run()
        # and on disk before anything else; a full disk is counted and logged by the store
        with faults.contained(self.metrics, "sip_commit"), contextlib.suppress(Rejected):
            self.bridge.delivery.commit(time.time())
        self.pump.run()  # what the commit released (pushes grouped with the call's)
        self._arm()

    # --- out --------------------------------------------------------------------------

    def carry_out(self, outputs: list[SipOutput]) -> None:
        """What the bridge returned, in order (the pump hands it over after each input):
        messages to send, each on its own so one that fails does not keep the others
        from going, and the two moments a call is timed by."""
        for out in outputs:
            if isinstance(out, Send):
                with faults.contained(self.metrics, "sip_send",
                                      f"{out.peer.transport}:{out.peer.host}:{out.peer.port}"):
                    self._send_one(out)
            elif isinstance(out, CallPushed):  # its frames are written: what a phone waits
                elapsed = time.perf_counter() - self._started
                self.metrics.sip_invite_to_push.observe(elapsed)
                self.invite_latencies.append(elapsed)
            elif isinstance(out, Ringing):
                self.metrics.sip_invite_to_ringing.observe(out.seconds)
                self.ringing_latencies.append(out.seconds)
            elif isinstance(out, AwaitKeeps):
                task = self._loop.create_task(self._await_keeps(out))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        self._arm()  # a new transaction, or one ended: its timers

    async def _await_keeps(self, held: AwaitKeeps) -> None:
        """A request's answer, once the site has kept (or could not keep) its pushes."""
        if self.keeper is None:
            results = []
        else:
            results = await asyncio.gather(*(self.keeper.claim(t) for t in held.tickets))
        kept = sum(1 for r in results if r.failure is None)
        failure = next((r.failure for r in results if r.failure is not None), None)
        with faults.contained(self.metrics, "sip_kept"):
            self.bridge.kept(held.key, kept, failure or "no site to keep it", self._now())
        self.pump.run()
        self._arm()

    def _send_one(self, s: Send) -> None:
        if s.peer.transport == "udp":
            if not 0 < s.peer.port < 65536:
                # asyncio's loop closes the whole socket on such an address, uvloop sends
                # to the port modulo 65536: neither may happen (the bridge never asks)
                self.metrics.sip_errors.labels("bad_destination").inc()
            elif self._udp is not None and not self._udp.is_closing():
                self._udp.sendto(s.data, (self._udp_host(s.peer.host), s.peer.port))
        elif s.peer.conn == 0:
            self._outbound(s.peer, s.data)
        else:
            conn = self._conns.get(s.peer.conn)
            if conn is not None and not conn.transport.is_closing():
                conn.transport.write(s.data)
            else:
                self.metrics.sip_errors.labels("tcp_gone").inc()

    def _outbound(self, peer: Peer, data: bytes) -> None:
        """A request of ours over TCP (to the PBX): one kept connection per destination."""
        key = (peer.host, peer.port)
        conn = self._out.get(key)
        if conn is not None and not conn.transport.is_closing():
            conn.transport.write(data)
            return
        pending = self._pending.setdefault(key, [])
        pending.append(data)
        if len(pending) == 1:
            task = asyncio.ensure_future(self._connect(key))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _connect(self, key: tuple[str, int]) -> None:
        try:
            _, conn = await asyncio.wait_for(self._loop.create_connection(
                lambda: _SipStream(self), key[0], key[1]), 5)
        except (OSError, TimeoutError) as exc:
            log.info("cannot reach %s:%s over TCP: %s", *key, exc)
            self._pending.pop(key, None)
            return
        except Exception as exc:  # a task's exception would only be logged at its GC
            faults.record(self.metrics, "sip_connect", exc, f"{key[0]}:{key[1]}")
            self._pending.pop(key, None)
            return
        self._out[key] = conn
        for data in self._pending.pop(key, []):
            conn.transport.write(data)

    def kick(self) -> None:
        """Run the bridge's timers now (after the PBX link is set up)."""
        self._arm()

    def _udp_host(self, host: str) -> str:
        """An IPv4 host on a dual-stack socket is written as ::ffff:a.b.c.d."""
        sock = self._udp.get_extra_info("socket") if self._udp is not None else None
        if sock is not None and sock.family == socket.AF_INET6 and ":" not in host:
            return f"::ffff:{host}"
        return host

    def _now(self) -> float:
        """The wall clock, after telling the bridge if it stepped since the last reading:
        SIP's timers are intervals (ring windows, retransmissions, registrations)."""
        wall, mono = time.time(), time.monotonic()
        if self._clock is None:
            self._clock = ClockWatch(wall, mono)
            return wall
        step = self._clock.observe(wall, mono)
        if step is not None:
            log.info("SIP timers follow a wall-clock step of %+.0f s", step.delta)
            with faults.contained(self.metrics, "sip_clock"):
                self.bridge.clock_stepped(step.delta)
        return wall

    def _arm(self, not_before: float | None = None) -> None:
        """(Re)schedule the bridge's next timer; always leaves one armed when one is due."""
        if self._udp is None and self._tcp_server is None:
            return  # stopped
        at = None
        with faults.contained(self.metrics, "sip_timer", "next") as outcome:
            self._now()  # a step is applied before the next deadline is read
            at = self.bridge.next_timer()
        if outcome.failed:
            at = time.time() + TIMER_RETRY
        if at is not None and not_before is not None:
            at = max(at, not_before)
        if at == self._timer_at and self._timer is not None:
            return  # armed for that already (after each message, and after its sends)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = at
        if at is not None:
            self._timer = self._loop.call_at(self._loop.time() + max(0.0, at - time.time()),
                                             self._fire)

    def _fire(self) -> None:
        """One timer tick. After a failure the timer is armed again, but not sooner than
        TIMER_RETRY: what failed may still be due, and must not spin the loop."""
        self._timer = self._timer_at = None
        now = self._now()
        ok = False
        with faults.contained(self.metrics, "sip_timer", "tick"):
            ok = self.bridge.handle_timer(now) is not False
        self.pump.run()  # retransmissions, ended calls' pushes and their answers
        self._arm(None if ok else now + TIMER_RETRY)


class _SipDatagrams(asyncio.DatagramProtocol):
    def __init__(self, owner: SipTransport) -> None:
        self.owner = owner

    def datagram_received(self, data: bytes, addr) -> None:
        self.owner.received(data, Peer("udp", _host(addr[0]), addr[1]), stream=False)


class _SipStream(asyncio.Protocol):
    # set by connection_made, which asyncio calls before anything else
    transport: asyncio.Transport
    peer: Peer

    def __init__(self, owner: SipTransport) -> None:
        self.owner = owner
        self.framer = StreamFramer()
        self.id = next(owner._ids)
        self._idle: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        if len(self.owner._conns) >= MAX_TCP_CONNECTIONS:
            self.owner.metrics.sip_errors.labels("tcp_limit").inc()
            transport.close()
            return
        host, port = transport.get_extra_info("peername")[:2]
        self.peer = Peer("tcp", _host(host), port, self.id)
        self.owner._conns[self.id] = self
        self._touch()

    def data_received(self, data: bytes) -> None:
        """Bytes of one connection: a stream that cannot be framed closes that one."""
        self._touch()
        messages: list[bytes] | None = None
        with faults.contained(self.owner.metrics, "sip_tcp", f"{self.peer.host}") as outcome:
            try:
                messages = self.framer.feed(data)
            except SipError as exc:
                self.owner.metrics.sip_errors.labels("tcp_framing").inc()
                log.info("closing SIP/TCP from %s:%s: %s", self.peer.host, self.peer.port,
                         exc)
        if messages is None or outcome.failed:
            self.transport.close()
            return
        for message in messages:
            self.owner.received(message, self.peer, stream=True)

    def connection_lost(self, exc) -> None:
        self.owner._conns.pop(self.id, None)
        if self._idle is not None:
            self._idle.cancel()

    def _touch(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self._idle = asyncio.get_running_loop().call_later(TCP_IDLE, self.transport.close)


def _host(host: str) -> str:
    return host.removeprefix("::ffff:")


def routes(cfg: SipConfig) -> list[tuple[re.Pattern, str, tuple[str, ...]]]:
    return [(re.compile(r.match), r.user, tuple(r.topics)) for r in cfg.routes]


def trust(cfg: SipConfig, pbx_address: str | None, name: str,
          digest: DigestPolicy | None = None) -> tuple[SourcePolicy, DigestPolicy | None]:
    """Who may send requests (sip.trusted, else loopback and the PBX's address) and the
    inbound digest policy; a reload keeps `digest`'s nonce key, so a challenge answered
    across it still counts."""
    sources = source_policy(cfg.trusted, (pbx_address,) if pbx_address else (),
                            cfg.untrusted_reply)
    auth = cfg.inbound_auth
    if not auth.enabled:
        return sources, None
    realm = auth.realm or cfg.domain or name
    credentials = read_credentials(Path(auth.credentials_file).read_text())
    key = {"key": digest.key} if digest is not None else {}
    return sources, DigestPolicy(realm, credentials, **key)


def _route(cfg: SipConfig) -> tuple[str, str]:
    """The PBX's address, and ours as the PBX sees it (the source of a socket routed toward
    it). A name is resolved here, once per start or reload: uvloop's sendto takes
    addresses only (every REGISTER and OPTIONS to `pbx.ward3.example` over UDP raised), and
    a lookup per datagram would block the loop. The family is the SIP socket's when it is
    bound to one (an IPv4 socket cannot reach an IPv6 address)."""
    family = socket.AF_UNSPEC
    if cfg.host not in ("", "::"):
        family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    family, _, _, _, addr = socket.getaddrinfo(cfg.pbx_host, cfg.pbx_port, family,
                                               socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect(addr)  # no packet is sent: this only asks the routing table
        return str(addr[0]), probe.getsockname()[0]


def pbx_link(cfg: SipConfig, port: int, now: float) -> PbxLink | None:
    if not cfg.pbx_host:
        return None
    accounts = [Account(user=r.user, auth_user=r.auth_user, expires=r.expires,
                        domain=cfg.domain or cfg.pbx_host,
                        password=Path(r.password_file).read_text().strip())
                for r in cfg.register]
    pbx_address, ours = _route(cfg)
    return PbxLink(accounts, Peer(cfg.pbx_transport, pbx_address, cfg.pbx_port), (ours, port),
                   cfg.keepalive_interval, now)


async def start_sip(cfg: SipConfig, delivery: Delivery, storage: Storage, metrics: Metrics,
                    name: str, pump: Pump, keeper: Keeper | None = None) -> SipTransport:
    """The SIP bridge as configured, listening."""
    router = UserRouter([Route(*r) for r in routes(cfg)],
                        {b.user: list(b.tokens) for b in cfg.static_bindings}, storage,
                        tuple(cfg.topics))
    calls = Calls(delivery, CallSettings(cfg.ring_window, cfg.reach_timeout),
                  end_status=SIP_STATUS)
    bridge = SipBridge(calls, delivery, router, metrics, server_name=name)
    transport = SipTransport(bridge, metrics, pump, keeper)
    # before the first request can come
    bridge.sources, bridge.digest = trust(cfg, _route(cfg)[0] if cfg.pbx_host else None, name)
    await transport.start(cfg.host, cfg.port, cfg.udp, cfg.tcp)
    bridge.pbx = pbx_link(cfg, transport.port, time.time())
    transport.kick()
    return transport
