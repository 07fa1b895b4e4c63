"""Bonjour advertisement that follows the network: watcher -> policy -> python-zeroconf.

`NetworkService` waits for interface changes (netwatch), decides what phones should see
(ifstate.decide) and has the `Advertiser` make it so: sockets of vanished addresses closed,
new records announced, goodbyes sent for gone addresses, sockets opened on new ones.
python-zeroconf advertises one address list on every interface it is bound to, and
re-binds only when asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from zeroconf import DNSOutgoing, IPVersion, ServiceInfo
from zeroconf.asyncio import AsyncZeroconf

from gateway.config import DiscoveryConfig
from gateway.net.ifstate import Advertisement, IPAddress, decide, describe
from gateway.net.netwatch import Watcher, open_watcher

log = logging.getLogger("lpgw.net")

SERVICE_TYPES = {"quic": "_lpgw._udp.local.", "tls": "_lpgw._tcp.local."}
PROTOCOL_VERSION = "1"
RESPONSE_FLAGS = 0x8400  # QR (a response) | AA (authoritative): RFC 6762 §18


@dataclass(frozen=True)
class Identity:
    """What the records say about this gateway, whatever the network does."""

    instance: str  # "Deck 5 Gateway"
    gateway_id: str
    pin: str  # "sha256/<base64>"
    port: int
    transports: tuple[str, ...]  # the listening ones: "quic", "tls"

    @property
    def host(self) -> str:
        """Our mDNS host name: unique per gateway, so two gateways never fight over it."""
        return f"lpgw-{self.gateway_id}.local."


def instance_label(name: str) -> str:
    """The name cut to one DNS label (63 bytes of UTF-8), as DNS-SD requires."""
    raw = name.encode()[:63]
    return raw.decode(errors="ignore").strip() or "lpgw"


def txt_records(identity: Identity, ssid: str | None) -> dict[str, str]:
    txt = {"v": PROTOCOL_VERSION, "id": identity.gateway_id, "pin": identity.pin,
           "tr": ",".join(identity.transports)}
    if ssid:
        txt["ssid"] = ssid
    return txt


class Advertiser:
    """Makes one `Advertisement` after another true on the wire."""

    def __init__(self, identity: Identity) -> None:
        self.identity = identity
        self.current = Advertisement()
        self.names: dict[str, str] = {}  # service type -> registered name (after renames)
        self._zc: AsyncZeroconf | None = None
        self._bound: tuple[str, ...] = ()  # what zeroconf's sockets are bound to
        self._infos: dict[str, ServiceInfo] = {}
        self._pending: set[asyncio.Future] = set()

    async def apply(self, adv: Advertisement) -> None:
        """Raises OSError/RuntimeError when re-binding failed; apply again to retry."""
        if not adv.active:
            await self.withdraw()
        elif self._zc is None:
            await self._register(adv)
        else:
            await self._update(adv)
        self.current = adv

    def _info(self, type_: str, adv: Advertisement, name: str | None = None) -> ServiceInfo:
        i = self.identity
        return ServiceInfo(type_, name or f"{instance_label(i.instance)}.{type_}", port=i.port,
                           properties=txt_records(i, adv.ssid), server=i.host,
                           parsed_addresses=[str(a) for a in adv.addresses])

    async def _register(self, adv: Advertisement) -> None:
        self._zc = AsyncZeroconf(interfaces=list(adv.bind), ip_version=IPVersion.All)
        self._bound = adv.bind
        infos = [self._info(SERVICE_TYPES[t], adv) for t in self.identity.transports]
        try:
            # probing (~1 s) runs for both types at once; a taken name becomes "Name-2"
            self._keep(*await asyncio.gather(*(
                self._zc.async_register_service(info, allow_name_change=True)
                for info in infos)))
        except BaseException:
            await self.withdraw()
            raise
        self._infos = {info.type: info for info in infos}
        self.names = {info.type: info.name for info in infos}

    async def _update(self, adv: Advertisement) -> None:
        """Sockets of gone addresses first, then new records, then the new sockets.

        In that order nothing is sent from an address that no longer exists, and zeroconf's
        re-announcement on new sockets carries the new records, not the old ones.
        """
        assert self._zc is not None
        kept = tuple(b for b in self._bound if b in adv.bind)
        if kept != self._bound:
            await self._rebind(kept)  # only drops sockets, so nothing is re-announced
        old = self.current
        for type_, info in list(self._infos.items()):
            new = self._info(type_, adv, info.name)
            if _records(new) != _records(info):
                self._keep(await self._zc.async_update_service(new))
                self._infos[type_] = new
        self.current = adv
        gone = [a for a in old.addresses if a not in adv.addresses]
        self._goodbye(gone)  # on the links still bound
        if set(adv.bind) != set(self._bound):
            await self._rebind(adv.bind)
            self._goodbye(gone)  # and on the links bound just now

    async def _rebind(self, bind: tuple[str, ...]) -> None:
        """Raises OSError (ENODEV: an address vanished meanwhile) or RuntimeError."""
        assert self._zc is not None
        await self._zc.async_update_interfaces(list(bind))
        self._bound = bind

    def _goodbye(self, gone: list[IPAddress]) -> None:
        """TTL-0 address records: browsers drop them in 1 s instead of at their TTL.

        A new address record flushes older ones of its type anyway (the cache-flush bit),
        but when a whole family goes (IPv4 removed) only a goodbye tells the phones.
        """
        if not gone or self._zc is None or not self._infos:
            return
        info = next(iter(self._infos.values()))
        old = ServiceInfo(info.type, info.name, server=self.identity.host,
                          parsed_addresses=[str(a) for a in gone])
        out = DNSOutgoing(RESPONSE_FLAGS)
        for record in old.dns_addresses(override_ttl=0):
            out.add_answer_at_time(record, 0)
        self._zc.zeroconf.async_send(out)

    def _keep(self, *futures: Any) -> None:
        """Hold announcement tasks until done (the loop keeps only weak references)."""
        for future in futures:
            self._pending.add(future)
            future.add_done_callback(self._pending.discard)

    async def withdraw(self) -> None:
        """Goodbye packets for everything, then close the sockets."""
        zc, self._zc = self._zc, None
        self._bound = ()
        self._infos.clear()
        self.names.clear()
        for future in list(self._pending):
            future.cancel()
        if zc is None:
            return
        try:
            await zc.async_unregister_all_services()
        finally:
            await zc.async_close()


def _records(info: ServiceInfo) -> tuple:
    return (info.properties, tuple(sorted(info.parsed_addresses())), info.port)


class NetworkService:
    """Keeps the advertisement true to the network, and reports on it for `lpgw status`."""

    DEBOUNCE = 0.1  # an interface change comes as a burst of netlink messages
    RETRY = 0.25  # after a failed re-bind (an address vanished meanwhile)
    RETRIES = 20

    def __init__(self, config: DiscoveryConfig, identity: Identity, listen_host: str = "::",
                 backend: str | None = None) -> None:
        self.config = config
        self.listen_host = listen_host
        self.backend = backend
        self.advertiser = Advertiser(identity)
        self.watcher: Watcher | None = None
        self.changes = 0
        self.last_change: dict | None = None
        self.error = ""
        self._reported = Advertisement()  # the last one logged (a retry may finish it)
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Advertise what the network allows now; raises if interfaces cannot be watched."""
        self.watcher = await open_watcher(self.config.poll_interval, self.backend)
        log.info("tracking interfaces with %s", self.watcher.backend)
        failures = 0 if await self._reconcile() else 1
        self._task = asyncio.create_task(self._run(failures))

    async def _run(self, failures: int) -> None:
        watcher = self.watcher
        if watcher is None:
            raise RuntimeError("started without an interface watcher")
        while True:
            if failures and failures <= self.RETRIES:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(watcher.changed(), self.RETRY)
            else:
                await watcher.changed()
                await asyncio.sleep(self.DEBOUNCE)
            failures = 0 if await self._reconcile() else failures + 1

    async def _reconcile(self) -> bool:
        if self.watcher is None:
            return False
        adv = decide(self.watcher.state, self.config, self.listen_host)
        try:
            await self.advertiser.apply(adv)
            self.error = ""
        except (OSError, RuntimeError) as exc:  # ENODEV: an address went while we bound
            self.error = f"binding mDNS failed: {exc}"
            log.warning("%s; trying again", self.error)
            return False
        except Exception as exc:  # a bug, or zeroconf refusing: keep the loop alive
            self.error = f"advertising failed: {exc!r}"
            log.exception("advertising failed; trying again")
            return False
        change = describe(self._reported, adv)
        self._reported = adv
        if change is not None:
            self.changes += 1
            self.last_change = {"at": round(time.time(), 3), "summary": change.summary,
                                "added": list(change.added), "removed": list(change.removed)}
            log.info("discovery: %s", change.summary)
        return True

    async def stop(self) -> None:
        """Goodbyes first, so phones stop trying before the listeners close."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await self.advertiser.withdraw()
        finally:
            if self.watcher is not None:
                await self.watcher.close()
                self.watcher = None

    def status(self) -> dict:
        adv = self.advertiser.current
        return {
            "backend": self.watcher.backend if self.watcher else None,
            **adv.to_dict(),
            "instance": self.advertiser.identity.instance,
            "services": dict(self.advertiser.names),
            "error": self.error,
            "changes": self.changes,
            "last_change": self.last_change,
            "interfaces_seen": self.watcher.state.to_dict() if self.watcher else {},
        }
