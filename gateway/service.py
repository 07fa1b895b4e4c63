"""Wiring and lifecycle: state, certificate, store, core, listeners, control socket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from aioquic.asyncio import serve as quic_serve

from gateway import __version__, certs
from gateway.api import server as http_server
from gateway.api.provider_auth import ProviderAuth, ProviderKey
from gateway.api.router import RateLimiter, Router
from gateway.config import Config, hs256_secret
from gateway.core.assertions import AssertionPolicy
from gateway.core.delivery import Delivery, DeliverySettings
from gateway.core.metrics import Metrics
from gateway.net.discovery import Identity, NetworkService
from gateway.protocol.messages import CALL_ACTIONS
from gateway.protocol.session import SessionSettings
from gateway.store import Store
from gateway.transport import quic, tls
from gateway.transport.control import ControlServer
from gateway.transport.link import GatewayLink, LinkContext

log = logging.getLogger("lpgw")


@dataclass
class Listening:
    host: str
    port: int
    transports: list[str] = field(default_factory=list)


class Gateway:
    """One running gateway. `start()` binds everything or raises; `stop()` undoes it."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.store: Store | None = None
        self.delivery: Delivery | None = None
        self.listening: Listening | None = None
        self.pin = ""
        self.gateway_id = ""
        self.started_at = 0.0
        self._tcp: asyncio.AbstractServer | None = None
        self._quic = None
        self._control: ControlServer | None = None
        self._api: asyncio.AbstractServer | None = None
        self.api_port: int | None = None
        self.router: Router | None = None
        self._sweeper: asyncio.Task | None = None
        self.network: NetworkService | None = None

    async def start(self) -> None:
        c = self.config
        state = c.state_path
        state.mkdir(parents=True, exist_ok=True, mode=0o750)
        if certs.ensure_self_signed(c.cert_path, c.key_path, c.name):
            log.info("made a self-signed P-256 certificate at %s", c.cert_path)
        self.pin = certs.spki_pin(certs.load_cert(c.cert_path))
        self.store = Store(c.store_path, c.store.synchronous)
        secret = self.store.get_or_create_meta("token_secret", lambda: os.urandom(32))
        self.gateway_id = self.store.get_or_create_meta(
            "gateway_id", lambda: uuid.uuid4().hex[:16].encode()).decode()
        policy = AssertionPolicy(
            hs256_secret=hs256_secret(c),
            es256_public_key=(Path(c.assertions.es256_public_key_file).read_text()
                              if c.assertions.es256_public_key_file else None),
            audience=c.assertions.audience or None, issuer=c.assertions.issuer or None,
            required=c.assertions.required)
        d = c.delivery
        self.delivery = Delivery(self.store, secret, self.gateway_id,
                                 DeliverySettings(queue_limit=d.queue_limit,
                                                  default_ttl=d.default_ttl,
                                                  forget_after=d.unregistered_after_days * 86400),
                                 policy, self.metrics)
        p = c.protocol
        self.link_context = LinkContext(
            delivery=self.delivery, metrics=self.metrics, gateway_id=self.gateway_id,
            settings=SessionSettings(max_frame=p.max_frame, heartbeat=p.heartbeat,
                                     heartbeat_misses=p.heartbeat_misses,
                                     hello_timeout=p.hello_timeout, frame_rate=p.frame_rate,
                                     frame_burst=p.frame_burst))
        try:
            await self._listen()
            if c.api.enabled:
                await self._serve_api()
            self._control = ControlServer(c.control_path, self.delivery, self.status)
            await self._control.start()
            if c.discovery.enabled:
                await self._advertise()
        except BaseException:
            await self.stop()
            raise
        self._sweeper = asyncio.create_task(self._sweep())
        self.started_at = time.time()
        self._write_runtime()

    def make_link(self, transport: str, peer: str, write, close) -> GatewayLink:
        return GatewayLink(self.link_context, transport, peer, write, close)

    async def _listen(self) -> None:
        c = self.config
        host = c.listen.host
        port = c.listen.port or _free_port(host)
        transports = []
        if c.listen.tls:
            factory = tls.serve_factory(tls.server_context(str(c.cert_path), str(c.key_path)),
                                        self.make_link, self.metrics, c.protocol.hello_timeout)
            # host None: asyncio binds IPv4 and IPv6 apart (it sets IPV6_V6ONLY on "::")
            self._tcp = await asyncio.get_running_loop().create_server(
                factory, None if host in ("::", "") else host, port, reuse_address=True)
            transports.append("tls")
        if c.listen.quic:
            p = c.protocol
            idle = p.heartbeat * (p.heartbeat_misses + 1) + 5
            qconf = quic.server_configuration(str(c.cert_path), str(c.key_path), idle,
                                              p.max_frame)

            def protocol(*args, **kwargs):
                return quic.QuicDeviceProtocol(*args, make_link=self.make_link,
                                               metrics=self.metrics, **kwargs)

            self._quic = await quic_serve(host or "::", port, configuration=qconf,
                                          create_protocol=protocol)
            transports.append("quic")
        self.listening = Listening(host or "::", port, transports)

    async def _advertise(self) -> None:
        """Bonjour for the bound listeners; a failure here costs discovery, not the gateway."""
        c = self.config
        identity = Identity(instance=c.discovery.instance or c.name, gateway_id=self.gateway_id,
                            pin=f"sha256/{self.pin}", port=self.listening.port,
                            transports=tuple(self.listening.transports))
        self.network = NetworkService(c.discovery, identity, self.listening.host)
        try:
            await self.network.start()
        except Exception as exc:
            log.error("discovery is off: %s", exc)
            self.network.error = str(exc)

    async def _serve_api(self) -> None:
        a = self.config.api
        keys = [ProviderKey(p.team_id, p.key_id,
                            certs.load_public_key(Path(p.key_file).read_bytes()), p.topics)
                for p in a.providers]
        admin = Path(a.admin_token_file).read_text().strip() if a.admin_token_file else None
        self.router = Router(self.delivery, ProviderAuth(keys, admin), self.metrics, self.status,
                             RateLimiter(a.rate_limit, a.rate_burst), a.metrics_need_auth)
        cert = a.cert or str(self.config.cert_path)
        key = a.key or str(self.config.key_path)
        factory = http_server.serve_factory(
            tls.server_context(cert, key, http_server.ALPN), self.router, self.metrics,
            self.config.protocol.hello_timeout, a.idle_timeout)
        self._api = await asyncio.get_running_loop().create_server(
            factory, None if a.host in ("::", "") else a.host, a.port, reuse_address=True)
        self.api_port = self._api.sockets[0].getsockname()[1]
        if not keys:
            log.warning("the API has no provider keys configured: every push will get 403")

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.config.delivery.expire_interval)
            try:
                self.delivery.expire(time.time())
            except Exception:
                log.exception("expiry sweep failed")

    def status(self) -> dict:
        connected = self.delivery.connected() if self.delivery else {}
        by_transport: dict[str, int] = {"quic": 0, "tls": 0}
        for transport in connected.values():
            by_transport[transport] = by_transport.get(transport, 0) + 1
        m = self.metrics
        return {
            "version": __version__,
            "gateway_id": self.gateway_id,
            "name": self.config.name,
            "pin": f"sha256/{self.pin}",
            "listen": {"host": self.listening.host, "port": self.listening.port,
                       "transports": self.listening.transports} if self.listening else None,
            "api": {"port": self.api_port} if self.api_port else None,
            "network": (self.network.status() if self.network
                        else {"advertising": False, "reason": "discovery is disabled"}),
            "uptime": round(time.time() - self.started_at, 1) if self.started_at else 0,
            "devices": {"connected": by_transport,
                        "known": self.store.count_devices() if self.store else 0},
            "pushes": {"delivered": m.value("lpgw_pushes_delivered_total"),
                       "expired": m.value("lpgw_pushes_expired_total")},
            "heartbeat_timeouts": m.value("lpgw_heartbeat_timeouts_total"),
            "call_actions": {a: m.value("lpgw_call_actions_total", action=a)
                             for a in CALL_ACTIONS},
        }

    def _write_runtime(self) -> None:
        """Where this run listens, for tools and tests (the state dir is private)."""
        path = self.config.state_path / "runtime.json"
        path.write_text(json.dumps({"pid": os.getpid(), "gateway_id": self.gateway_id,
                                    "port": self.listening.port, "api_port": self.api_port,
                                    "pin": f"sha256/{self.pin}",
                                    "control": str(self.config.control_path)}))

    async def stop(self) -> None:
        if self.network is not None:  # goodbyes first: phones stop trying before we close
            network, self.network = self.network, None
            try:
                await network.stop()
            except Exception:
                log.exception("stopping discovery failed")
        if self.router is not None:
            self.router.draining = True  # providers get 503 Shutdown from here on
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self.delivery is not None:
            self.delivery.shutdown()
            await asyncio.sleep(0.05)  # let the byes leave
        if self._control is not None:
            await self._control.stop()
            self._control = None
        if self._tcp is not None:
            self._tcp.close()
            self._tcp = None
        if self._api is not None:
            self._api.close()
            self._api = None
        if self._quic is not None:
            self._quic.close()
            self._quic = None
        if self.store is not None:
            self.store.close()
            self.store = None


def _free_port(host: str) -> int:
    """One port number free on TCP and UDP alike, for `port: 0`."""
    family = socket.AF_INET6 if ":" in (host or "::") else socket.AF_INET
    for _ in range(50):
        with socket.socket(family, socket.SOCK_STREAM) as t:
            t.bind((host or "::", 0))
            port = t.getsockname()[1]
            with socket.socket(family, socket.SOCK_DGRAM) as u:
                try:
                    u.bind((host or "::", port))
                except OSError:
                    continue
            return port
    raise OSError("no free port found for both TCP and UDP")


async def run(config: Config) -> None:
    """`lpgw run`: start, say where we are, serve until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):  # before start: a stop during start is clean
        loop.add_signal_handler(sig, stop.set)
    gateway = Gateway(config)
    await gateway.start()
    listening = gateway.listening
    for transport in listening.transports:
        proto = "udp" if transport == "quic" else "tcp"
        print(f"lpgw: listening {transport} on {proto} [{listening.host}]:{listening.port}",
              flush=True)
    if gateway.api_port:
        print(f"lpgw: provider API (APNs-compatible, HTTP/2) on tcp "
              f"[{config.api.host}]:{gateway.api_port}", flush=True)
    print(f"lpgw: gateway {gateway.gateway_id} pin sha256/{gateway.pin}", flush=True)
    print(f"lpgw: state in {config.state_path}", flush=True)
    try:
        await stop.wait()
        log.info("stopping")
    finally:
        with contextlib.suppress(Exception):
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        await gateway.stop()
