"""IP addresses against lists of networks: who is trusted, who is exempt. One rule: an
IPv4-mapped IPv6 address (::ffff:a.b.c.d, what a dual-stack socket reports) is its IPv4
address, and a scope (%eth0) is ignored."""

from __future__ import annotations

import ipaddress

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def networks(entries: tuple[str, ...] | list[str]) -> tuple[Network, ...]:
    """Addresses or networks (CIDR, host bits allowed) as networks; config checked them."""
    return tuple(ipaddress.ip_network(e, strict=False) for e in entries)


def within(host: str, nets: tuple[Network, ...]) -> bool:
    """Whether `host` (an address as a socket gives it) is in any of `nets`; False for
    anything that is not an address."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address in network for network in nets)
