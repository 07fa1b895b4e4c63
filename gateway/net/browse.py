"""The phone's side of discovery: browse for lpgw gateways, read their TXT, pick one.

One long-lived browser, as NWBrowser is on iOS: its cache follows the gateway's
announcements and goodbyes, so looking again after a disconnect is instant and sees the
gateway's new address. The TXT `pin` only says which key to expect; the TLS/QUIC handshake
still checks the key itself (client.py), so a forged record cannot get a device to talk to
someone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass

from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from gateway.endpoints import Endpoint, Endpoints, normalize_pin
from gateway.net.discovery import PROTOCOL_VERSION, SERVICE_TYPES

# After the first answer, how long to wait for others before calling it "the only one".
# python-zeroconf's first query asks for unicast answers (QU), which reach only one of the
# mDNS stacks on a host (say avahi-daemon and us); its second, 1 s later, is multicast.
SETTLE = 1.5


class NotFound(LookupError):
    pass


class Ambiguous(LookupError):
    pass


@dataclass(frozen=True)
class Found:
    """One advertised gateway service, as its records describe it."""

    instance: str
    service_type: str
    gateway_id: str
    pin: str
    transports: tuple[str, ...]
    version: str
    ssid: str | None
    host: str
    port: int
    addresses: tuple[str, ...]  # best first: IPv4, global IPv6, link-local IPv6 with %scope

    def to_dict(self) -> dict:
        return {**asdict(self), "transports": list(self.transports),
                "addresses": list(self.addresses)}


def parse(info: AsyncServiceInfo) -> Found | None:
    """None unless the records are complete and speak our protocol version."""
    txt = {k.decode(errors="replace"): (v or b"").decode(errors="replace")
           for k, v in info.properties.items()}
    addresses = info.parsed_scoped_addresses(IPVersion.All)
    if (txt.get("v") != PROTOCOL_VERSION or not txt.get("id") or not txt.get("pin")
            or not info.port or not addresses):
        return None
    return Found(instance=info.name.removesuffix("." + info.type), service_type=info.type,
                 gateway_id=txt["id"], pin=txt["pin"],
                 transports=tuple(t for t in txt.get("tr", "").split(",") if t),
                 version=txt["v"], ssid=txt.get("ssid") or None,
                 host=(info.server or "").rstrip("."), port=info.port,
                 addresses=tuple(sorted(addresses, key=_preference)))


def _preference(address: str) -> tuple[int, int]:
    ip = ipaddress.ip_address(address.split("%")[0])
    return (ip.version, int(ip.is_link_local))


def matches(found: Found, instance: str | None, gateway_id: str | None) -> bool:
    return ((instance is None or found.instance == instance)
            and (gateway_id is None or found.gateway_id == gateway_id))


def pick(found: list[Found], instance: str | None = None,
         gateway_id: str | None = None) -> Found:
    """The one gateway (or site) these criteria name; NotFound or Ambiguous (with the
    choices) if not. The gateways of a site advertise one id and one pin (the site's): any
    of them will do, and the Locator picks one for each connection."""
    chosen = [f for f in found if matches(f, instance, gateway_id)]
    if len(chosen) == 1 or (chosen and len({(f.gateway_id, f.pin) for f in chosen}) == 1):
        return chosen[0]
    wanted = " and ".join(w for w in (instance and f"instance {instance!r}",
                                      gateway_id and f"gateway id {gateway_id}") if w)
    if not chosen:
        seen = "; ".join(f"{f.instance!r} (id {f.gateway_id})" for f in found)
        raise NotFound(f"no lpgw gateway{' with ' + wanted if wanted else ''} found"
                       + (f" (seen: {seen})" if seen else ""))
    names = "; ".join(f"{f.instance!r} (id {f.gateway_id})" for f in chosen)
    if len({f.gateway_id for f in chosen}) == 1:
        raise Ambiguous(f"{len(chosen)} gateways advertise id {chosen[0].gateway_id} with "
                        f"different pins: {names}; a site's gateways share one (check them "
                        "with `lpgw pin`, or choose one with --instance)")
    raise Ambiguous(f"{len(chosen)} gateways found: {names}; choose one with --instance "
                    "or --gateway-id")


class Browser:
    """Browses one or both service types for as long as it is open."""

    POLL = 0.1  # expiries (goodbyes) do not call back: read the cache this often
    ASK_EVERY = 1.0  # seconds between queries for a service the cache cannot describe

    def __init__(self, transports: tuple[str, ...] = ("quic",)) -> None:
        self.types = [SERVICE_TYPES[t] for t in transports]
        self._azc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._names: set[tuple[str, str]] = set()
        self._asked: dict[tuple[str, str], float] = {}
        self._requests: set[asyncio.Task] = set()
        self._poke = asyncio.Event()

    async def start(self) -> None:
        self._azc = AsyncZeroconf(ip_version=IPVersion.All)
        self._browser = AsyncServiceBrowser(self._azc.zeroconf, self.types,
                                            handlers=[self._on_change])

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str,
                   state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Removed:
            self._names.discard((service_type, name))
        else:
            self._names.add((service_type, name))
        self._poke.set()

    def current(self) -> list[Found]:
        """What the cache says right now (expired and goodbye'd records are gone)."""
        found: list[Found] = []
        if self._azc is None:
            return found
        for type_, name in sorted(self._names):
            info = AsyncServiceInfo(type_, name)
            parsed = parse(info) if info.load_from_cache(self._azc.zeroconf) else None
            if parsed is not None:
                found.append(parsed)
        return found

    def _ask_missing(self, found: list[Found]) -> None:
        """Query (at most every ASK_EVERY s) for services the cache cannot describe yet."""
        if self._azc is None:
            return
        have = {(f.service_type, f"{f.instance}.{f.service_type}") for f in found}
        now = time.monotonic()
        for key in self._names - have:
            if now - self._asked.get(key, -self.ASK_EVERY) >= self.ASK_EVERY:
                self._asked[key] = now
                task = asyncio.create_task(
                    AsyncServiceInfo(*key).async_request(self._azc.zeroconf, 1000))
                self._requests.add(task)
                task.add_done_callback(self._answered)

    def _answered(self, task: asyncio.Task) -> None:
        self._requests.discard(task)
        self._poke.set()

    async def wait(self, until: Callable[[list[Found]], bool], timeout: float) -> list[Found]:
        """Wait (up to `timeout` s) until `until(found)`; returns what was found either way."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.current()
            left = deadline - time.monotonic()
            if until(found) or left <= 0:
                return found
            self._ask_missing(found)
            self._poke.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), min(left, self.POLL))

    async def watch(self) -> AsyncIterator[list[Found]]:
        """The gateways now, then again whenever that changes."""
        found = self.current()
        yield found
        while True:
            changed = await self.wait(found.__ne__, 3600)
            if changed != found:
                found = changed
                yield found

    async def find(self, instance: str | None = None, gateway_id: str | None = None,
                   timeout: float = 5.0) -> Found:
        """The gateway to use: by instance or id, else the only one there is."""

        def some(found: list[Found]) -> bool:
            return any(matches(f, instance, gateway_id) for f in found)

        found = await self.wait(some, timeout)
        if some(found) and instance is None and gateway_id is None:
            found = await self.wait(lambda f: False, SETTLE)  # are there others?
        return pick(found, instance, gateway_id)

    async def close(self) -> None:
        for task in list(self._requests):
            task.cancel()
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        if self._azc is not None:
            await self._azc.async_close()
            self._azc = None


def usable(found: list[Found], gateway_id: str, pin: str | None) -> list[Found]:
    """The advertisements of this gateway (or site) to choose among: those with the
    expected pin when any has it (another pin beside them is a misconfigured gateway or
    an impostor on the Wi-Fi, and must not make the device give up); else all of them
    (the device then refuses the key it is offered)."""
    mine = [f for f in found if f.gateway_id == gateway_id]
    if pin is None:
        return mine
    right = [f for f in mine if normalize_pin(f.pin) == normalize_pin(pin)]
    return right or mine


class Locator:
    """Where a chosen gateway is now: the device asks before every connection attempt."""

    def __init__(self, browser: Browser, gateway_id: str, timeout: float = 10.0,
                 pin: str | None = None) -> None:
        self.browser = browser
        self.gateway_id = gateway_id
        self.pin = pin
        self.timeout = timeout
        self.endpoints = Endpoints()

    async def __call__(self, avoid: Endpoint | None = None) -> tuple[str, int, str]:
        """(address, port, advertised pin); `avoid` just failed. Every gateway of a site
        advertises the site's id: any of them will do, the one that failed last."""
        found = usable(await self.browser.wait(
            lambda fs: any(f.gateway_id == self.gateway_id for f in fs), self.timeout),
            self.gateway_id, self.pin)
        if not found:
            raise NotFound(f"no lpgw gateway with gateway id {self.gateway_id} found")
        pins = {(a, f.port): f.pin for f in found for a in f.addresses}
        host, port = self.endpoints.choose(list(pins), avoid)
        return host, port, pins[(host, port)]
