"""Wiring and lifecycle: start, reload (SIGHUP), drain and stop (SIGTERM), systemd notify."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import gc
import inspect
import itertools
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aioquic.asyncio.server import QuicServer
from aioquic.quic.configuration import QuicConfiguration

from gateway import __version__, certs, config, faults, internals, logs
from gateway.api import server as http_server
from gateway.api.limits import ApiLimits, descriptor_split
from gateway.api.provider_auth import ProviderAuth, ProviderKey
from gateway.api.router import RateLimiter, Router
from gateway.cluster import SiteUnavailable
from gateway.config import Config, hs256_secret
from gateway.core.assertions import AssertionPolicy
from gateway.core.calls import CallSettings
from gateway.core.delivery import Delivery, DeliverySettings, Rejected
from gateway.core.installs import InstallPolicy
from gateway.core.metrics import Metrics
from gateway.core.site import SiteView
from gateway.gauges import SelfTestResult, State, StateCollector, clock_synchronised
from gateway.net.discovery import Identity, NetworkService
from gateway.notify import Notifier
from gateway.protocol.messages import CALL_ACTIONS, PUSH_TYPES
from gateway.protocol.session import SessionSettings
from gateway.records import StorageFailed
from gateway.sip.bridge import Route
from gateway.sip.register import RegState
from gateway.sip.transaction import TxState
from gateway.store import SECRET_FILE, Store, StoreError, token_secret
from gateway.transport import quic, tls
from gateway.transport.control import ControlServer
from gateway.transport.link import GatewayLink, LinkContext
from gateway.transport.pump import Pump
from gateway.transport.sip import SipTransport, pbx_link, routes, start_sip
from gateway.transport.sip import trust as sip_trust
from gateway.transport.timers import TimerWheel, tick_for

if TYPE_CHECKING:
    from gateway.cluster.devices import SiteDevices
    from gateway.cluster.presence import Presence
    from gateway.cluster.relay import SiteRelay
    from gateway.cluster.remote import RemoteControl
    from gateway.cluster.site import Site

log = logging.getLogger("lpgw")


def _not_after(cert_path: Path) -> float:
    """When the certificate expires (Unix time); 0 when it cannot be read."""
    try:
        return certs.load_cert(cert_path).not_valid_after_utc.timestamp()
    except (OSError, ValueError):
        return 0.0

DRAIN_SECONDS = 5.0  # at most this long for devices to take their last pushes and go
STATUS_EVERY = 10.0
SAMPLE_EVERY = 10.0  # seconds between samples of the push counters (the console's chart)
STORAGE_CHECK_EVERY = 2.0  # while the store fails: how soon a freed disk is noticed
STORAGE_HEADROOM = 1 << 20  # free bytes before that check tries a write
# a reconnect storm after a Wi-Fi outage: 10,000 phones at once overflow the default of 100,
# and refused SYNs come back only after the kernel's 1 s, 3 s, 7 s... retries
LISTEN_BACKLOG = 4096
# what only a restart can change (sockets, files opened once)
RESTART_KEYS = ("state_dir", "control_socket", "listen", "store", "api.enabled", "api.host",
                "api.port", "sip.enabled", "sip.host", "sip.port", "sip.udp", "sip.tcp",
                "cluster")  # a site is joined at start


@dataclass
class Listening:
    host: str
    port: int
    transports: list[str] = field(default_factory=list)


def assertion_policy(c: Config) -> AssertionPolicy:
    return AssertionPolicy(
        hs256_secret=hs256_secret(c),
        es256_public_key=(Path(c.assertions.es256_public_key_file).read_text()
                          if c.assertions.es256_public_key_file else None),
        audience=c.assertions.audience or None, issuer=c.assertions.issuer or None,
        required=c.assertions.required)


def delivery_settings(c: Config) -> DeliverySettings:
    d = c.delivery
    return DeliverySettings(queue_limit=d.queue_limit, default_ttl=d.default_ttl,
                            forget_after=d.unregistered_after_days * 86400,
                            installs=InstallPolicy(rate=d.new_device_rate,
                                                   burst=d.new_device_burst,
                                                   max_devices=d.max_devices,
                                                   exempt=d.new_device_exempt))


def api_limits(c: Config) -> ApiLimits:
    a = c.api
    return ApiLimits(handshake_timeout=a.handshake_timeout, request_timeout=a.request_timeout,
                     idle_timeout=a.idle_timeout, max_connections=a.max_connections,
                     max_connections_per_source=a.max_connections_per_source,
                     max_concurrent_streams=a.max_concurrent_streams,
                     max_buffered_bytes=a.max_buffered_bytes, reset_rate=a.reset_rate,
                     reset_burst=a.reset_burst)


def session_settings(c: Config) -> SessionSettings:
    p = c.protocol
    return SessionSettings(max_frame=p.max_frame, heartbeat=p.heartbeat,
                           heartbeat_misses=p.heartbeat_misses, hello_timeout=p.hello_timeout,
                           frame_rate=p.frame_rate, frame_burst=p.frame_burst,
                           send_buffer_limit=p.send_buffer_limit)


def provider_auth(c: Config) -> ProviderAuth:
    keys = [ProviderKey(p.team_id, p.key_id,
                        certs.load_public_key(Path(p.key_file).read_bytes()), p.topics)
            for p in c.api.providers]
    admin = (Path(c.api.admin_token_file).read_text().strip() if c.api.admin_token_file
             else None)
    if not keys:
        log.warning("the API has no provider keys configured: every push will get 403")
    return ProviderAuth(keys, admin)


@dataclass(frozen=True)
class Opened:
    """What a gateway holds before it binds anything: its state, opened and checked."""

    store: Store
    secret: bytes
    gateway_id: str
    pin: str


class Gateway:
    """One running gateway, made complete by `await Gateway.start(config)` (it binds
    everything or raises); `stop()` drains it. Optional parts (the API, SIP, discovery,
    each listener) are None only when the configuration turns them off."""

    def __init__(self, config: Config, notifier: Notifier, metrics: Metrics,
                 opened: Opened, site: Site | None = None) -> None:
        """Use `Gateway.start`: this only wires what `opened` holds (and, in a site of
        gateways, the site it joined: its token secret is the site's)."""
        c = config
        self.site = site
        self.presence: Presence | None = None
        self.config = config
        self.notifier = notifier
        self.metrics = metrics
        self.store = opened.store
        self.gateway_id = opened.gateway_id
        self.pin = opened.pin
        secret = site.token_secret if site is not None else opened.secret
        # in a site, the pushes' seqs are the site's: phones are welcomed with its id
        self.site_view = SiteView(f"site-{site.name}") if site is not None else None
        self.delivery = Delivery(self.store, secret, self.gateway_id,
                                 delivery_settings(c), assertion_policy(c), metrics,
                                 monotonic=time.monotonic, site=self.site_view)
        self.pump = Pump(self.delivery, metrics)
        self.relay: SiteRelay | None = None
        self.site_devices: SiteDevices | None = None
        self.link_context = LinkContext(
            delivery=self.delivery, metrics=metrics, gateway_id=self.delivery.welcome_id,
            settings=session_settings(c), pump=self.pump,
            timers=TimerWheel(asyncio.get_running_loop(), tick_for(c.protocol.heartbeat),
                              metrics=metrics))
        self.listening = Listening(c.listen.host or "::", 0, [])
        # read when /metrics is (gateway/gauges.py): the alerts' series
        self.state = State(__version__, c.state_path, _not_after(c.cert_path),
                           registrations=self._registrations, pbx_reachable=self._pbx_ok)
        metrics.exposed.register(StateCollector(self.state))
        self._selftest: asyncio.Task | None = None
        self.push_samples: collections.deque[tuple[float, int, int, int]] = \
            collections.deque(maxlen=int(3600 / SAMPLE_EVERY) + 1)
        self.started_at = 0.0
        self.last_reload: dict | None = None
        self._tcp: asyncio.AbstractServer | None = None
        self._tls_ctx: ssl.SSLContext | None = None
        self._quic: QuicServer | None = None
        self._quic_config: QuicConfiguration | None = None
        self._control: ControlServer | None = None
        self._remote: RemoteControl | None = None
        self._api: asyncio.AbstractServer | None = None
        self._api_ctx: ssl.SSLContext | None = None
        self._api_factory: http_server.ApiFactory | None = None
        self.api_port: int | None = None
        self.router: Router | None = None
        self.sip: SipTransport | None = None
        self.network: NetworkService | None = None
        self._tasks: list[asyncio.Task] = []
        self._store_closed = False

    # --- start ------------------------------------------------------------------------

    @classmethod
    async def start(cls, config: Config, notifier: Notifier | None = None) -> Gateway:
        """The one way to make a Gateway: state opened, every listener bound, or raises
        (with whatever was bound closed again)."""
        notifier = notifier or Notifier({})
        internals.install()  # the touches of aioquic's and hpack's internals, checked
        try:
            opened = open_state(config)
        except StoreError as exc:  # damaged, or its secret disagrees: nothing is bound yet
            notifier.status(f"cannot start: {exc}")
            raise
        site = None
        if config.cluster.enabled:
            from gateway.cluster.site import join  # the NATS client: only for a site

            try:
                site = await join(config.cluster, opened.secret, f"sha256/{opened.pin}")
            except SiteUnavailable as exc:
                opened.store.close()
                notifier.status(f"cannot start: {exc}")
                raise
        gateway = cls(config, notifier, Metrics(), opened, site)
        if site is not None:
            try:
                await gateway._join_site()
            except BaseException:
                await gateway.stop(drain=0)
                raise
        await gateway._serve()
        return gateway

    async def _join_site(self) -> None:
        """In a site: take its device records, tell it which devices this gateway holds,
        and keep and hand out pushes through its stream."""
        # the NATS client: only for a site
        from gateway.cluster.devices import SiteDevices
        from gateway.cluster.presence import Presence
        from gateway.cluster.pushes import SitePushes
        from gateway.cluster.relay import SiteRelay

        assert self.site is not None
        c = self.config.cluster
        timeout = c.connect_timeout * 2
        try:
            self.site_devices = SiteDevices(self.site, self.store, self.metrics, c.replicas)
            await self.site_devices.start(timeout)
            presence = Presence(self.site, self.gateway_id, self.config.name, self.metrics,
                                c.replicas, view=self.site_view)
            await presence.start(timeout)
            self.presence = presence
            self.pump.presence = presence
            pushes = SitePushes(self.site.nc, self.site.js, self.site.name, c.replicas,
                                self.config.delivery.queue_limit)
            await pushes.open(timeout)
            self.relay = SiteRelay(self.site.nc, pushes, self.site_devices, self.delivery,
                                   self.pump, self.metrics, c.accept_timeout, c.max_keeps,
                                   self.gateway_id)
            await self.relay.start()
            self.pump.site = self.relay
        except SiteUnavailable:
            raise
        except Exception as exc:
            raise SiteUnavailable(f"the site's buckets and stream: {exc}") from None

    async def _serve(self) -> None:
        c = self.config
        self.store.start_checkpointer()
        self.delivery.forget_test_devices(time.time())
        try:
            await self._listen()
            if c.api.enabled:
                await self._serve_api()
            if c.sip.enabled:
                self.sip = await start_sip(c.sip, self.delivery, self.store, self.metrics,
                                           c.name, self.pump, keeper=self.relay)
            self._control = ControlServer(c.control_path, self.delivery, self.store,
                                          self.pump, self.status, keeper=self.relay,
                                          state=self.state)
            await self._control.start()
            if self.site is not None:
                from gateway.cluster.remote import RemoteControl  # NATS: only for a site

                self._remote = RemoteControl(self.site.nc, self.site.name, self.gateway_id,
                                             self._control.answer, self.metrics)
                await self._remote.start()
            if c.discovery.enabled:
                await self._advertise()
        except BaseException:
            await self.stop()
            raise
        self._tasks = [asyncio.create_task(self._sweep()),
                       asyncio.create_task(self._sample_pushes()),
                       asyncio.create_task(self._report()),
                       asyncio.create_task(self._watch_storage()),
                       asyncio.create_task(self.notifier.watchdog())]
        self.started_at = time.time()
        self._write_runtime()
        self.notifier.ready(self.summary())

    def make_link(self, transport: str, peer: str, write, close, ping=None) -> GatewayLink:
        return GatewayLink(self.link_context, transport, peer, write, close, ping)

    async def _listen(self) -> None:
        c = self.config
        host = c.listen.host
        port = c.listen.port or free_port(host)
        transports = []
        if c.listen.tls:
            self._tls_ctx = tls.server_context(str(c.cert_path), str(c.key_path),
                                               session_tickets=False)
            factory = tls.serve_factory(self._tls_ctx, self.make_link, self.metrics,
                                        c.protocol.hello_timeout)
            # host None: asyncio binds IPv4 and IPv6 apart (it sets IPV6_V6ONLY on "::")
            self._tcp = await asyncio.get_running_loop().create_server(
                factory, None if host in ("::", "") else host, port, reuse_address=True,
                backlog=LISTEN_BACKLOG)
            transports.append("tls")
        if c.listen.quic:
            p = c.protocol
            idle = p.heartbeat * (p.heartbeat_misses + 1) + 5
            self._quic_config = quic.server_configuration(str(c.cert_path), str(c.key_path),
                                                          idle, p.max_frame)

            def protocol(*args, **kwargs):
                return quic.QuicDeviceProtocol(*args, make_link=self.make_link,
                                               metrics=self.metrics, **kwargs)

            self._quic = await quic.serve(host or "::", port, configuration=self._quic_config,
                                          create_protocol=protocol, metrics=self.metrics,
                                          receive_buffer=c.listen.quic_receive_buffer,
                                          retry_above=c.listen.quic_retry_above,
                                          half_open_limit=c.listen.quic_half_open_limit)
            transports.append("quic")
        self.listening = Listening(host or "::", port, transports)

    async def _serve_api(self) -> None:
        a = self.config.api
        self.router = Router(self.delivery, self.store, provider_auth(self.config),
                             self.metrics, self.status, RateLimiter(a.rate_limit, a.rate_burst),
                             a.metrics_need_auth)
        self.router.console.history = self.push_history
        self.router.console.selftest = self.start_selftest
        self._api_ctx = tls.server_context(*self._api_cert(self.config), http_server.ALPN)
        factory = self._api_factory = http_server.ApiFactory(
            self._api_ctx, self.router, self.metrics, api_limits(self.config), self.pump,
            keeper=self.relay)
        # port 0 on "::" would give IPv4 and IPv6 two different ports: choose one first
        port = a.port or free_port(a.host)
        self._api = await asyncio.get_running_loop().create_server(
            factory, None if a.host in ("::", "") else a.host, port, reuse_address=True,
            backlog=LISTEN_BACKLOG)
        self.api_port = self._api.sockets[0].getsockname()[1]

    @staticmethod
    def _api_cert(c: Config) -> tuple[str, str]:
        return c.api.cert or str(c.cert_path), c.api.key or str(c.key_path)

    async def _advertise(self) -> None:
        """Bonjour for the bound listeners; a failure here costs discovery, not the gateway."""
        c = self.config
        identity = Identity(instance=c.discovery.instance or c.name,
                            gateway_id=self.delivery.welcome_id,
                            pin=f"sha256/{self.pin}", port=self.listening.port,
                            transports=tuple(self.listening.transports))
        self.network = NetworkService(c.discovery, identity, self.listening.host)
        try:
            await self.network.start()
        except Exception as exc:
            log.error("discovery is off: %s", exc)
            self.network.error = str(exc)

    def start_selftest(self) -> bool:
        """Run the self-test inside the gateway now (the console's button); False while
        one is under way. Its result is kept as `lpgw selftest`'s report is."""
        if self._selftest is not None and not self._selftest.done():
            return False
        last = self.state.last_selftest
        self.state.last_selftest = SelfTestResult(
            last.at if last else 0.0, last.ok if last else False,
            last.failed if last else [], last.checks if last else [], running=True)
        self._selftest = asyncio.get_running_loop().create_task(self._run_selftest())
        return True

    async def _run_selftest(self) -> None:
        from gateway import selftest

        try:
            checks = await selftest.in_gateway(self.config)
        except Exception as exc:  # a bug in a check: said, not raised
            faults.record(self.metrics, "selftest", exc)
            checks = [selftest.Check("selftest", False, f"{type(exc).__name__}: {exc}")]
        self.state.last_selftest = SelfTestResult(
            time.time(), all(c.ok is not False for c in checks),
            [c.name for c in checks if c.ok is False],
            [{"name": c.name, "ok": c.ok, "detail": c.detail[:300], "fix": c.fix[:300]}
             for c in checks])

    async def _sample_pushes(self) -> None:
        """The push counters every SAMPLE_EVERY s for the last hour (the console's chart):
        a few integers a minute, whether anyone looks or not."""
        while True:
            self.push_samples.append(self._push_counts())
            await asyncio.sleep(SAMPLE_EVERY)

    def _push_counts(self) -> tuple[float, int, int, int]:
        m = self.metrics
        return (round(time.time(), 1),
                int(sum(m.value("lpgw_pushes_accepted_total", push_type=t)
                        for t in PUSH_TYPES)),
                int(m.value("lpgw_pushes_delivered_total")),
                int(m.value("lpgw_pushes_expired_total")))

    def push_history(self) -> dict:
        """Pushes accepted, delivered and expired in each SAMPLE_EVERY s of the last hour
        (the last span: from the newest sample until now)."""
        samples = [*self.push_samples, self._push_counts()]
        pairs = list(itertools.pairwise(samples))
        return {"every": SAMPLE_EVERY, "at": [b[0] for _, b in pairs],
                "accepted": [b[1] - a[1] for a, b in pairs],
                "delivered": [b[2] - a[2] for a, b in pairs],
                "expired": [b[3] - a[3] for a, b in pairs]}

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.config.delivery.expire_interval)
            try:
                self.delivery.expire(time.time())
                self.pump.run()  # in a site: the devices pruned, forgotten there too
            except Exception:
                log.exception("expiry sweep failed")

    async def _watch_storage(self) -> None:
        """While the store fails (full disk), try a small write now and then: it recovers,
        and says so, once space is back even if no push or phone comes to find out."""
        while True:
            await asyncio.sleep(STORAGE_CHECK_EVERY)
            if self.delivery.storage_error is None:
                continue
            with faults.contained(self.metrics, "storage_check"):
                # a few bytes may fit in the WAL while a push does not: no room, no probe
                if shutil.disk_usage(self.config.store_path.parent).free >= STORAGE_HEADROOM:
                    self.delivery.check_storage(time.time())

    async def _report(self) -> None:
        """STATUS= for `systemctl status`, kept current."""
        while True:
            await asyncio.sleep(STATUS_EVERY)
            self.notifier.status(self.summary())

    # --- reload (SIGHUP) ---------------------------------------------------------------

    async def reload(self, path: str | None,
                     overrides: dict[str, Any] | None = None) -> bool:
        """Re-read the config and certificate; apply what can change live, keep the rest.

        Devices stay connected. A bad config changes nothing and says why.
        """
        self.notifier.reloading()
        try:
            new = config.load(path, overrides)
            self._check_restart_only(new)
            await self._apply(new)
        except (config.ConfigError, OSError, ValueError) as exc:
            self.last_reload = {"ok": False, "at": time.time(), "error": str(exc)}
            log.error("reload refused, still running the previous configuration:\n%s", exc)
            self.notifier.ready(f"reload FAILED, running the previous config; {self.summary()}")
            return False
        self.last_reload = {"ok": True, "at": time.time()}
        log.info("configuration reloaded")
        self.notifier.ready(self.summary())
        return True

    def _check_restart_only(self, new: Config) -> None:
        for key in RESTART_KEYS:
            old_value, new_value = self.config, new
            for part in key.split("."):
                old_value, new_value = getattr(old_value, part), getattr(new_value, part)
            if old_value != new_value:
                log.warning("%s changed: that takes effect at the next restart", key)

    async def _apply(self, new: Config) -> None:
        old = self.config
        # everything that can fail (files, keys) is read before anything changes
        policy = assertion_policy(new)
        auth = provider_auth(new) if self.router else None
        pin = certs.spki_pin(certs.load_cert(new.cert_path))
        cert_files = (str(new.cert_path), str(new.key_path))
        if self._tls_ctx is not None:
            self._tls_ctx.load_cert_chain(*cert_files)  # new handshakes only
        if self._quic_config is not None:
            self._quic_config.load_cert_chain(*cert_files)
        if self._api_ctx is not None:
            self._api_ctx.load_cert_chain(*self._api_cert(new))
        self.state.cert_not_after = _not_after(new.cert_path)
        if pin != self.pin:
            log.warning("the gateway's key changed: phones pinned to sha256/%s will refuse "
                        "it until they get sha256/%s", self.pin, pin)
            self.pin = pin
        self.delivery.policy = policy
        self.delivery.settings = dataclasses.replace(
            delivery_settings(new), max_payload=self.delivery.settings.max_payload,
            max_payload_voip=self.delivery.settings.max_payload_voip)
        self.link_context = dataclasses.replace(self.link_context,
                                                settings=session_settings(new))
        self.link_context.timers.retune(tick_for(new.protocol.heartbeat))
        if self.router is not None:
            a = new.api
            self.router.auth = auth or self.router.auth
            self.router.limiter = RateLimiter(a.rate_limit, a.rate_burst)
            self.router.metrics_need_auth = a.metrics_need_auth
            if self._api_factory is not None:
                self._api_factory.limits = api_limits(new)
        if self.sip is not None:
            bridge = self.sip.bridge
            bridge.router.routes = [Route(*r) for r in routes(new.sip)]
            bridge.router.topics = tuple(new.sip.topics)
            bridge.router.static = {b.user: list(b.tokens) for b in new.sip.static_bindings}
            bridge.calls.settings = CallSettings(new.sip.ring_window, new.sip.reach_timeout)
            pbx_fields = ("pbx_host", "pbx_port", "pbx_transport", "domain", "register",
                          "keepalive_interval")
            if any(getattr(old.sip, f) != getattr(new.sip, f) for f in pbx_fields):
                bridge.pbx = pbx_link(new.sip, self.sip.port, time.time())
                self.sip.kick()
            bridge.sources, bridge.digest = sip_trust(
                new.sip, bridge.pbx.pbx.host if bridge.pbx else None, new.name, bridge.digest)
        logs.setup(new.log.level, new.log.format)
        self.config = new
        discovery_changed = (old.discovery != new.discovery or old.name != new.name
                             or pin != certs.spki_pin(certs.load_cert(old.cert_path)))
        if discovery_changed:
            if self.network is not None:
                await self.network.stop()
                self.network = None
            if new.discovery.enabled:
                await self._advertise()
        self._write_runtime()

    # --- stop (SIGTERM) ----------------------------------------------------------------

    async def stop(self, drain: float = DRAIN_SECONDS) -> None:
        """Drain, in order: stop advertising, refuse new work, say bye, let the last pushes
        and acks through, then close listeners and the store.

        Each step is contained: one that fails (counted in
        lpgw_internal_errors_total{where="stop"}, logged) does not keep the others from
        running, so SIGTERM still drains, exits 0 and always closes the store.
        """
        await self._stop_step("notify", self.notifier.stopping)
        if self.network is not None:  # goodbyes first: phones stop trying before we close
            network, self.network = self.network, None
            await self._stop_step("discovery", network.stop)
        if self.router is not None:
            self.router.draining = True  # providers get 503 Shutdown from here on
        if self.sip is not None:
            await self._stop_step("sip_drain", self._drain_sip)
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        if self._selftest is not None:
            self._selftest.cancel()
        await self._stop_step("commit", self._last_commit)
        await self._stop_step("byes", self._byes)
        await self._stop_step("quiet", lambda: self._quiet(drain))
        if self._control is not None:
            control, self._control = self._control, None
            await self._stop_step("control", control.stop)
        for name in ("_tcp", "_api", "_quic"):
            server = getattr(self, name)
            if server is not None:
                setattr(self, name, None)
                await self._stop_step(name.strip("_"), server.close)
        if self.sip is not None:
            sip, self.sip = self.sip, None
            await self._stop_step("sip", sip.stop)
        # no heartbeat into a closed store
        await self._stop_step("timers", self.link_context.timers.close)
        if self._remote is not None:
            await self._stop_step("remote control", self._remote.stop)
        if self.relay is not None:
            await self._stop_step("relay", self.relay.stop)
        if self.site_devices is not None:
            await self._stop_step("devices", self.site_devices.stop)
        if not self._store_closed:
            self._store_closed = True
            await self._stop_step("store", self.store.close)
        if self.presence is not None:
            await self._stop_step("presence", self.presence.stop)
        if self.site is not None:
            await self._stop_step("site", self.site.close)
        log.info("stopped")

    async def _stop_step(self, name: str, step: Callable[[], object]) -> None:
        try:
            result = step()
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            faults.record(self.metrics, "stop", exc, name)

    def _drain_sip(self) -> None:
        if self.sip is None:
            return
        self.sip.bridge.draining = True  # new INVITEs get 503
        self.sip.bridge.calls.shutdown(time.time())
        self.pump.run()  # the calls' ends to the phones, their final answers to the PBX

    def _byes(self) -> None:
        self.delivery.shutdown()
        self.pump.run()

    def _last_commit(self) -> None:
        """An open group commit lands; on a full disk it cannot (already logged and
        answered as such): nothing more to do about it here."""
        with contextlib.suppress(Rejected):
            self.delivery.commit(time.time())
        self.pump.run()

    async def _quiet(self, limit: float) -> None:
        """Give the byes (and SIP's final answers) time to leave, up to `limit`."""
        deadline = time.monotonic() + limit
        await asyncio.sleep(0.05)
        while time.monotonic() < deadline and self.sip is not None and any(
                tx.is_invite and tx.state is TxState.COMPLETED
                for tx in self.sip.bridge.tx.server.values()):
            await asyncio.sleep(0.05)  # the PBX's ACKs for the last final responses

    # --- what it says about itself -----------------------------------------------------

    def summary(self) -> str:
        connected = self.delivery.connected() if self.delivery else {}
        quic_n = sum(1 for t in connected.values() if t == "quic")
        net = self.network.status() if self.network else None
        where = (f"advertising on {', '.join(net.get('addresses', [])) or 'nothing'}"
                 if net and net.get("advertising") else
                 f"not advertising ({(net or {}).get('reason') or 'discovery off'})")
        return (f"{len(connected)} devices connected ({quic_n} quic, "
                f"{len(connected) - quic_n} tls); {where}")

    def status(self) -> dict:
        connected = self.delivery.connected() if self.delivery else {}
        by_transport: dict[str, int] = {"quic": 0, "tls": 0}
        for transport in connected.values():
            by_transport[transport] = by_transport.get(transport, 0) + 1
        m = self.metrics
        now = time.time()
        return {
            "version": __version__,
            "gateway_id": self.gateway_id,
            "name": self.config.name,
            "pin": f"sha256/{self.pin}",
            "listen": {"host": self.listening.host, "port": self.listening.port,
                       "transports": self.listening.transports} if self.listening else None,
            "api": {"port": self.api_port} if self.api_port else None,
            "sip": ({"host": self.config.sip.host, "port": self.sip.port,
                     **self.sip.bridge.status(now)} if self.sip else None),
            "network": (self.network.status() if self.network
                        else {"advertising": False, "reason": "discovery is disabled"}),
            "uptime": round(now - self.started_at, 1) if self.started_at else 0,
            "last_reload": self.last_reload,
            "devices": {"connected": by_transport,
                        "known": self._known_devices()},
            # counters are whole numbers: prometheus_client keeps them as floats
            "pushes": {"delivered": int(m.value("lpgw_pushes_delivered_total")),
                       "expired": int(m.value("lpgw_pushes_expired_total"))},
            "heartbeat_timeouts": int(m.value("lpgw_heartbeat_timeouts_total")),
            "call_actions": {a: int(m.value("lpgw_call_actions_total", action=a))
                             for a in CALL_ACTIONS},
            "storage": self._storage_status(),
            "cluster": self._cluster_status(),
            "clock": self._clock_status(),
            "certificate": {"expires": round(self.state.cert_not_after)}
            if self.state.cert_not_after else None,
            "selftest": dataclasses.asdict(self.state.last_selftest)
            if self.state.last_selftest else None,
        }

    def _cluster_status(self) -> dict | None:
        if self.site is None:
            return None
        return {**self.site.status(), "site_id": self.delivery.welcome_id,
                **(self.presence.status() if self.presence is not None else {}),
                **(self.site_devices.status() if self.site_devices is not None else {}),
                **(self.relay.status() if self.relay is not None else {})}

    def _registrations(self) -> list[tuple[str, bool]]:
        pbx = self.sip.bridge.pbx if self.sip is not None else None
        if pbx is None:
            return []
        return [(r.account.user, r.state == RegState.REGISTERED) for r in pbx.registrations]

    def _pbx_ok(self) -> bool | None:
        pbx = self.sip.bridge.pbx if self.sip is not None else None
        return None if pbx is None else pbx.pbx_ok

    def _clock_status(self) -> dict:
        """Steps of the wall clock this run has seen (a Pi has no RTC)."""
        step = self.delivery.last_step
        return {"steps": self.delivery.clock_steps, "synchronised": clock_synchronised(),
                "last_step": None if step is None else {"seconds": round(step.delta, 1),
                                                        "at": round(step.wall, 1)}}

    def _known_devices(self) -> int | None:
        try:
            return 0 if self._store_closed else self.store.count_devices()
        except (StoreError, StorageFailed):  # a failing store must not cost the status
            return None

    def _storage_status(self) -> dict:
        """Whether the store takes writes; the self-test and `lpgw status` show it."""
        error = self.delivery.storage_error
        out: dict = {"ok": error is None, "state_dir": str(self.config.state_path)}
        try:
            usage = shutil.disk_usage(self.config.store_path.parent)
            out["free_mib"] = usage.free // 2**20
        except OSError:
            pass
        if error is not None:
            out["failing_since"], out["error"] = int(error[0]), error[1]
        return out

    def _write_runtime(self) -> None:
        """Where this run listens, for tools and tests (the state dir is private)."""
        path = self.config.state_path / "runtime.json"
        path.write_text(json.dumps({"pid": os.getpid(), "gateway_id": self.gateway_id,
                                    "port": self.listening.port, "api_port": self.api_port,
                                    "sip_port": self.sip.port if self.sip else None,
                                    "pin": f"sha256/{self.pin}",
                                    "control": str(self.config.control_path)}))


def open_state(c: Config) -> Opened:
    """The state directory, certificate and database, opened and checked. Raises
    StoreError, with what to do, for a damaged database or a secret that does not match."""
    c.state_path.mkdir(parents=True, exist_ok=True, mode=0o750)
    if certs.ensure_self_signed(c.cert_path, c.key_path, c.name):
        log.info("made a self-signed P-256 certificate at %s", c.cert_path)
    pin = certs.spki_pin(certs.load_cert(c.cert_path))
    secret_path = c.state_path / SECRET_FILE
    had_secret = secret_path.exists()
    store = Store(c.store_path, c.store.synchronous)
    try:
        secret = token_secret(store, secret_path)
        gateway_id = store.get_or_create_meta(
            "gateway_id", lambda: uuid.uuid4().hex[:16].encode()).decode()
    except BaseException:
        store.close()
        raise
    if store.created and had_secret:
        log.warning("there was no database at %s: made a new, empty one. Devices keep "
                    "their tokens (the secret is in %s), but the pushes it queued and its "
                    "user bindings are gone; if it was lost by mistake, stop lpgw and "
                    "restore it from the backup of %s", c.store_path, secret_path,
                    c.state_path)
    return Opened(store, secret, gateway_id, pin)


def free_port(host: str) -> int:
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


def install_event_loop() -> str:
    """uvloop (libuv) unless LPGW_EVENT_LOOP=asyncio: measured with 10,000 TLS phones, idle
    CPU 6.0% -> 4.9% and 0.99 -> 0.73 ms per handshake in a reconnect storm."""
    wanted = os.environ.get("LPGW_EVENT_LOOP", "uvloop")
    if wanted not in ("uvloop", "asyncio"):
        raise ValueError(f"LPGW_EVENT_LOOP: {wanted!r} is neither uvloop nor asyncio")
    if wanted == "asyncio":
        return "asyncio"
    try:
        import uvloop
    except ImportError:  # a platform without its wheel: asyncio's loop does the same work
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def raise_open_files() -> int:
    """Take the hard open-file limit: each TLS device is a descriptor, and a shell's soft
    limit (often 1,024) would refuse the thousandth phone (the unit sets 65,536)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
    return soft


GC_THRESHOLDS = (10_000, 10, 10)  # CPython's default is (700, 10, 10)


def tune_garbage_collector() -> int:
    """Fewer, not smaller, cyclic-GC passes; returns how many start-up objects were frozen.

    Every QUIC phone is thousands of Python objects (aioquic), and CPython's full
    collection visits them all each time the long-lived heap has grown by a quarter: in a
    storm of 10,000 QUIC phones, 17 full passes took 7.3 s of the gateway's 34 s of CPU
    (8.7 s with the young ones; measured with gc.callbacks). With a young generation of
    10,000 objects instead of 700, young passes are rarer and full passes are 2 (1.1 s):
    the storm took 22.5 s instead of 38.4 s. Rarer passes must not mean garbage kept:
    a connection that ends is freed by reference counting, not by the collector (our
    objects let go of each other in GatewayLink.connection_lost, and aioquic's knot of
    cycles is untied by internals.release_closed_connection). What the start made (modules,
    configuration, keys) lives as long as the process: frozen, no pass visits it again.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    return gc.get_freeze_count()


def watch_garbage_collector(metrics: Metrics) -> Callable[[], None]:
    """Time every cyclic-GC pass into `lpgw_gc_pause_seconds`; returns the undo.

    A full pass stalls calls and pushes alike, and its length grows with the phones held,
    so an operator (and bench/latency.py) needs to see it beside the latency it causes.
    """
    started = [0.0]
    # made now: labels() takes the family's lock and allocates, so called from inside a
    # pass that a scrape holding that lock set off, it would wait for itself forever
    pauses = [metrics.gc_pauses.labels(str(generation)) for generation in range(3)]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses[info["generation"]].observe(time.perf_counter() - started[0])

    gc.callbacks.append(on_gc)
    return lambda: gc.callbacks.remove(on_gc) if on_gc in gc.callbacks else None


async def run(cfg: Config, path: str | None = None,
              overrides: dict[str, Any] | None = None) -> None:
    """`lpgw run`: start, say where we are, reload on SIGHUP (the file again, with the
    command line's `overrides`), drain on SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):  # before start: a stop during start is clean
        loop.add_signal_handler(sig, stop.set)
    open_files = raise_open_files()
    loop_name = type(asyncio.get_running_loop()).__module__.split(".")[0]
    gateway = await Gateway.start(cfg, Notifier())
    reloads: set[asyncio.Task] = set()

    def on_hup() -> None:
        task = asyncio.create_task(gateway.reload(path, overrides))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    frozen = tune_garbage_collector()
    unwatch = watch_garbage_collector(gateway.metrics)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    listening = gateway.listening
    for transport in listening.transports:
        proto = "udp" if transport == "quic" else "tcp"
        print(f"lpgw: listening {transport} on {proto} [{listening.host}]:{listening.port}",
              flush=True)
    if gateway.api_port:
        print(f"lpgw: provider API (APNs-compatible, HTTP/2) on tcp "
              f"[{cfg.api.host}]:{gateway.api_port}", flush=True)
    if gateway.sip:
        print(f"lpgw: SIP on udp+tcp [{cfg.sip.host}]:{gateway.sip.port}", flush=True)
    print(f"lpgw: gateway {gateway.gateway_id} pin sha256/{gateway.pin}", flush=True)
    print(f"lpgw: state in {cfg.state_path}", flush=True)
    api_fds, device_fds = descriptor_split(open_files, api_limits(cfg) if cfg.api.enabled
                                           else dataclasses.replace(ApiLimits(),
                                                                    max_connections=0))
    print(f"lpgw: open-file limit {open_files}: up to {api_fds} for API connections "
          f"(api.max_connections), room for about {device_fds} TLS devices; event loop "
          f"{loop_name}", flush=True)
    print(f"lpgw: garbage collector thresholds {'/'.join(map(str, gc.get_threshold()))}, "
          f"{frozen} start-up objects frozen", flush=True)
    try:
        await stop.wait()
        log.info("draining")
    finally:
        with contextlib.suppress(Exception):
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        await gateway.stop()
        unwatch()
