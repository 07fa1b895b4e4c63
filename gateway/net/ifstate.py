"""The gateway's interfaces and what to advertise on them, as plain data with no I/O.

Netlink, netifaces and nl80211 fill an `InterfaceState` at the edge (netwatch.py), `decide()`
turns it and the `discovery` config into an `Advertisement`, and discovery.py makes that
true on the wire. Keeping the middle free of sockets makes every policy case a unit test.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum

from gateway.config import DiscoveryConfig

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Kind(StrEnum):
    WIFI = "wifi"
    ETHERNET = "ethernet"  # anything not Wi-Fi: wired, bridges, veths, tunnels


@dataclass(frozen=True)
class Interface:
    name: str
    index: int
    kind: Kind = Kind.ETHERNET
    up: bool = False  # administratively up and running (carrier, or associated on Wi-Fi)
    loopback: bool = False
    addresses: frozenset[IPAddress] = frozenset()
    ssid: str | None = None  # Wi-Fi only: the associated SSID, None if none or unknown

    @property
    def usable(self) -> tuple[IPAddress, ...]:
        """Addresses a phone on the link could connect to: IPv4 first, link-local last."""
        good = [a for a in self.addresses
                if not (a.is_loopback or a.is_multicast or a.is_unspecified)]
        return tuple(sorted(good, key=_preference))

    def to_dict(self) -> dict:
        return {"index": self.index, "kind": str(self.kind), "up": self.up,
                "addresses": [str(a) for a in self.usable], "ssid": self.ssid}


def _preference(address: IPAddress) -> tuple[int, int, str]:
    return (address.version, int(address.is_link_local), str(address))


@dataclass(frozen=True)
class InterfaceState:
    """Every interface the host has, by index. Immutable: each change makes a new state."""

    interfaces: tuple[Interface, ...] = ()

    def get(self, index: int) -> Interface | None:
        return next((i for i in self.interfaces if i.index == index), None)

    def _put(self, interface: Interface) -> InterfaceState:
        others = [i for i in self.interfaces if i.index != interface.index]
        return InterfaceState(tuple(sorted([*others, interface], key=lambda i: i.index)))

    def with_link(self, index: int, name: str, *, up: bool,
                  loopback: bool = False) -> InterfaceState:
        """A link appeared or changed; its addresses and Wi-Fi facts are kept."""
        old = self.get(index) or Interface(name=name, index=index)
        return self._put(replace(old, name=name, up=up, loopback=loopback))

    def without_link(self, index: int) -> InterfaceState:
        return InterfaceState(tuple(i for i in self.interfaces if i.index != index))

    def with_address(self, index: int, address: IPAddress) -> InterfaceState:
        """An address was added; an address event can come before its link's."""
        old = self.get(index) or Interface(name=f"if{index}", index=index)
        return self._put(replace(old, addresses=old.addresses | {address}))

    def without_address(self, index: int, address: IPAddress) -> InterfaceState:
        old = self.get(index)
        if old is None or address not in old.addresses:
            return self
        return self._put(replace(old, addresses=old.addresses - {address}))

    def with_wifi(self, ssids: Mapping[int, str | None]) -> InterfaceState:
        """Mark exactly these interfaces as Wi-Fi, each with its SSID (None: not associated)."""
        return InterfaceState(tuple(
            replace(i, kind=Kind.WIFI, ssid=ssids[i.index]) if i.index in ssids
            else replace(i, kind=Kind.ETHERNET, ssid=None)
            for i in self.interfaces))

    def to_dict(self) -> dict:
        return {i.name: i.to_dict() for i in self.interfaces if not i.loopback}


@dataclass(frozen=True)
class Advertisement:
    """What to announce: addresses of the chosen interfaces, or nothing and why."""

    interfaces: tuple[str, ...] = ()
    addresses: tuple[IPAddress, ...] = ()
    # what zeroconf binds to: every IPv4 address, and one IPv6 address per interface (its
    # link-local one when it has one), because IPv6 multicast is joined per interface
    bind: tuple[str, ...] = ()
    ssid: str | None = None
    reason: str = ""

    @property
    def active(self) -> bool:
        return bool(self.addresses)

    def to_dict(self) -> dict:
        return {"advertising": self.active, "reason": self.reason,
                "interfaces": list(self.interfaces),
                "addresses": [str(a) for a in self.addresses], "ssid": self.ssid}


def nothing(reason: str) -> Advertisement:
    return Advertisement(reason=reason)


def decide(state: InterfaceState, config: DiscoveryConfig,
           listen_host: str = "::") -> Advertisement:
    """The interfaces to advertise on, per `discovery.*`, or nothing with the reason.

    Only addresses the listeners accept on are advertised: all of them for "::", IPv4 ones
    for "0.0.0.0", else just `listen_host` itself (so a gateway on 127.0.0.1 advertises
    nothing). `require_ssid` is a gate: nothing is advertised unless some Wi-Fi interface
    is on that SSID, and Wi-Fi interfaces on another SSID are never advertised on, while
    wired ones (if allowed) are.
    """
    if not config.enabled:
        return nothing("discovery is disabled")
    state = _listened(state, listen_host)
    chosen = [i for i in state.interfaces if not i.loopback]
    if config.interfaces:
        chosen = [i for i in chosen if i.name in config.interfaces]
        if not chosen:
            return nothing(f"no configured interface exists ({_names(config.interfaces)})")
    if config.wifi_only:
        chosen = [i for i in chosen if i.kind is Kind.WIFI]
        if not chosen:
            return nothing("no Wi-Fi interface")
    up = [i for i in chosen if i.up]
    if not up:
        return nothing(f"no interface is up ({_names(i.name for i in chosen)} down)"
                       if chosen else "no interface")
    chosen = [i for i in up if i.usable]
    if not chosen:
        where = _names(i.name for i in up)
        if listen_host in ("", "::"):
            return nothing(f"no address on {where}")
        return nothing(f"listening on {listen_host} only: no such address on {where}")
    if config.require_ssid:
        on_it = [i for i in chosen if i.kind is Kind.WIFI and i.ssid == config.require_ssid]
        if not on_it:
            return nothing(_off_ssid(state, config.require_ssid))
        chosen = [i for i in chosen if i.kind is not Kind.WIFI or i.ssid == config.require_ssid]
    ssids = [i.ssid for i in chosen if i.kind is Kind.WIFI and i.ssid]
    return Advertisement(
        interfaces=tuple(i.name for i in chosen),
        addresses=tuple(sorted({a for i in chosen for a in i.usable}, key=_preference)),
        bind=_bind(chosen),
        ssid=config.require_ssid or (ssids[0] if ssids else None))


def _listened(state: InterfaceState, host: str) -> InterfaceState:
    """The state with only the addresses a listener bound to `host` accepts on."""
    if host in ("", "::"):
        return state
    wanted = _address(host)  # None for a host name: nothing we could advertise matches it

    def accepts(address: IPAddress) -> bool:
        return address.version == 4 if host == "0.0.0.0" else address == wanted

    return InterfaceState(tuple(replace(i, addresses=frozenset(filter(accepts, i.addresses)))
                                for i in state.interfaces))


def _address(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return None


def _bind(interfaces: Iterable[Interface]) -> tuple[str, ...]:
    v4: list[str] = []
    v6: list[str] = []
    for i in interfaces:
        usable = i.usable
        v4 += [str(a) for a in usable if a.version == 4]
        six = [a for a in usable if a.version == 6]
        if six:
            v6.append(str(next((a for a in six if a.is_link_local), six[0])))
    return (*v4, *v6)


def _off_ssid(state: InterfaceState, wanted: str) -> str:
    on = sorted({i.ssid for i in state.interfaces if i.kind is Kind.WIFI and i.ssid})
    if on:
        return f"not on SSID {wanted!r} (on {_names(repr(s) for s in on)})"
    if any(i.kind is Kind.WIFI for i in state.interfaces):
        return f"not on SSID {wanted!r} (Wi-Fi not associated)"
    return f"not on SSID {wanted!r} (no Wi-Fi interface, or its SSID is unknown)"


def _names(names: Iterable[str]) -> str:
    return ", ".join(names)


@dataclass(frozen=True)
class Change:
    """The difference between two advertisements, for the log and the status."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    summary: str = ""


def describe(old: Advertisement, new: Advertisement) -> Change | None:
    """None when nothing a phone could see changed."""
    if old == new:
        return None
    before = {str(a) for a in old.addresses}
    after = {str(a) for a in new.addresses}
    added = tuple(sorted(after - before))
    removed = tuple(sorted(before - after))
    if not new.active:
        summary = f"advertising nothing: {new.reason}"
    else:
        parts = [f"advertising on {_names(new.interfaces)}: {_names(map(str, new.addresses))}"]
        if added:
            parts.append(f"added {_names(added)}")
        if removed:
            parts.append(f"removed {_names(removed)}")
        if new.ssid != old.ssid:
            parts.append(f"SSID {new.ssid!r}")
        summary = "; ".join(parts)
    return Change(added=added, removed=removed, summary=summary)
