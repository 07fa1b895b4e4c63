"""The interface model and the advertising policy, with fake states: no sockets, no root."""

from __future__ import annotations

import asyncio
from ipaddress import ip_address

import pytest

from gateway.config import DiscoveryConfig
from gateway.net.ifstate import (
    Advertisement,
    Interface,
    InterfaceState,
    Kind,
    decide,
    describe,
)
from gateway.net.netwatch import (
    NETIFACES,
    NETLINK,
    ThreadedWatcher,
    Watcher,
    apply_message,
    choose_backend,
)


def iface(name: str, index: int, *addresses: str, kind: Kind = Kind.ETHERNET, up: bool = True,
          ssid: str | None = None, loopback: bool = False) -> Interface:
    return Interface(name=name, index=index, kind=kind, up=up, loopback=loopback, ssid=ssid,
                     addresses=frozenset(ip_address(a) for a in addresses))


LO = iface("lo", 1, "127.0.0.1", "::1", loopback=True)
ETH = iface("eth0", 2, "192.168.5.10", "fe80::2")
WLAN = iface("wlan0", 3, "10.40.0.7", "fd40::7", "fe80::3", kind=Kind.WIFI, ssid="Crew")


def state(*interfaces: Interface) -> InterfaceState:
    return InterfaceState(tuple(sorted(interfaces, key=lambda i: i.index)))


def addrs(adv: Advertisement) -> list[str]:
    return [str(a) for a in adv.addresses]


# --- the model -------------------------------------------------------------------------


def test_links_and_addresses_build_up_in_any_order():
    s = InterfaceState().with_address(2, ip_address("10.0.0.2"))  # address before its link
    s = s.with_link(2, "eth0", up=True)
    s = s.with_address(2, ip_address("fe80::1")).with_link(1, "lo", up=True, loopback=True)
    assert [i.name for i in s.interfaces] == ["lo", "eth0"]
    eth = s.get(2)
    assert eth.up and {str(a) for a in eth.addresses} == {"10.0.0.2", "fe80::1"}
    s = s.with_link(2, "eth0", up=False)  # a link change keeps the addresses
    assert not s.get(2).up and len(s.get(2).addresses) == 2
    s = s.without_address(2, ip_address("10.0.0.2")).without_address(2, ip_address("10.9.9.9"))
    assert [str(a) for a in s.get(2).addresses] == ["fe80::1"]
    assert s.without_link(2).get(2) is None


def test_states_compare_by_value_so_repeats_are_not_changes():
    a = state(ETH).with_address(2, ip_address("192.168.5.10"))
    assert a == state(ETH)
    assert a.with_link(2, "eth0", up=True) == a


def test_wifi_facts_are_replaced_as_a_whole():
    s = state(ETH, WLAN).with_wifi({3: "Guest"})
    assert s.get(3).kind is Kind.WIFI and s.get(3).ssid == "Guest"
    s = s.with_wifi({})  # nl80211 gone: nothing is Wi-Fi any more
    assert s.get(3).kind is Kind.ETHERNET and s.get(3).ssid is None


def test_usable_addresses_prefer_ipv4_then_global_then_link_local():
    i = iface("eth0", 2, "fe80::1", "fd00::1", "10.0.0.1", "127.0.0.2", "::")
    assert [str(a) for a in i.usable] == ["10.0.0.1", "fd00::1", "fe80::1"]


# --- rtnetlink messages (dicts stand in for pyroute2's) ---------------------------------


def test_netlink_messages_apply():
    up = 0x1 | 0x40
    s = apply_message(InterfaceState(), {"event": "RTM_NEWLINK", "index": 2, "ifname": "eth0",
                                         "flags": up})
    s = apply_message(s, {"event": "RTM_NEWADDR", "index": 2, "IFA_LOCAL": "10.0.0.2",
                          "IFA_ADDRESS": "10.0.0.1"})  # point-to-point: ours is IFA_LOCAL
    s = apply_message(s, {"event": "RTM_NEWADDR", "index": 2, "IFA_ADDRESS": "fd00::2",
                          "IFA_FLAGS": 0x40})  # tentative: not usable yet
    assert s.get(2).up and [str(a) for a in s.get(2).addresses] == ["10.0.0.2"]
    s = apply_message(s, {"event": "RTM_NEWADDR", "index": 2, "IFA_ADDRESS": "fd00::2",
                          "IFA_FLAGS": 0x80})  # DAD done
    assert {str(a) for a in s.get(2).addresses} == {"10.0.0.2", "fd00::2"}
    s = apply_message(s, {"event": "RTM_NEWLINK", "index": 2, "ifname": "eth0", "flags": 0x1})
    assert not s.get(2).up  # up but not running: no carrier
    s = apply_message(s, {"event": "RTM_DELADDR", "index": 2, "IFA_LOCAL": "10.0.0.2"})
    s = apply_message(s, {"event": "RTM_NEWROUTE", "index": 2})  # ignored
    assert [str(a) for a in s.get(2).addresses] == ["fd00::2"]
    assert apply_message(s, {"event": "RTM_DELLINK", "index": 2}).get(2) is None


# --- the policy ------------------------------------------------------------------------


def test_default_advertises_every_up_interface_but_loopback():
    adv = decide(state(LO, ETH, WLAN), DiscoveryConfig())
    assert adv.active and adv.interfaces == ("eth0", "wlan0")
    assert addrs(adv) == ["10.40.0.7", "192.168.5.10", "fd40::7", "fe80::2", "fe80::3"]
    assert adv.ssid == "Crew"
    # zeroconf binds each IPv4 address, and one IPv6 address (link-local) per interface
    assert adv.bind == ("192.168.5.10", "10.40.0.7", "fe80::2", "fe80::3")


def test_bind_uses_a_global_ipv6_address_when_there_is_no_link_local_one():
    adv = decide(state(iface("eth0", 2, "fd00::5")), DiscoveryConfig())
    assert adv.bind == ("fd00::5",)


def test_down_interfaces_and_interfaces_without_addresses_are_left_out():
    down = iface("eth1", 4, "10.1.0.1", up=False)
    bare = iface("eth2", 5)
    adv = decide(state(ETH, down, bare), DiscoveryConfig())
    assert adv.interfaces == ("eth0",)
    nothing_up = decide(state(LO, down), DiscoveryConfig())
    assert not nothing_up.active and nothing_up.reason == "no interface is up (eth1 down)"
    assert decide(state(bare), DiscoveryConfig()).reason == "no address on eth2"
    assert decide(state(LO), DiscoveryConfig()).reason == "no interface"


def test_configured_interfaces_only():
    adv = decide(state(ETH, WLAN), DiscoveryConfig(interfaces=("wlan0", "wlan9")))
    assert adv.interfaces == ("wlan0",)
    missing = decide(state(ETH), DiscoveryConfig(interfaces=("wlan0",)))
    assert not missing.active and missing.reason == "no configured interface exists (wlan0)"


def test_wifi_only():
    adv = decide(state(ETH, WLAN), DiscoveryConfig(wifi_only=True))
    assert adv.interfaces == ("wlan0",)
    assert decide(state(ETH), DiscoveryConfig(wifi_only=True)).reason == "no Wi-Fi interface"


def test_require_ssid_advertises_while_on_it_including_wired_interfaces():
    adv = decide(state(ETH, WLAN), DiscoveryConfig(require_ssid="Crew"))
    assert adv.interfaces == ("eth0", "wlan0") and adv.ssid == "Crew"


def test_require_ssid_advertises_nothing_on_another_ssid():
    guest = state(ETH, WLAN).with_wifi({3: "Guest"})
    adv = decide(guest, DiscoveryConfig(require_ssid="Crew"))
    assert not adv.active and adv.addresses == () and adv.bind == ()
    assert adv.reason == "not on SSID 'Crew' (on 'Guest')"


def test_require_ssid_when_not_associated_or_without_wifi():
    loose = state(ETH, WLAN).with_wifi({3: None})
    assert decide(loose, DiscoveryConfig(require_ssid="Crew")).reason == \
        "not on SSID 'Crew' (Wi-Fi not associated)"
    assert decide(state(ETH), DiscoveryConfig(require_ssid="Crew")).reason == \
        "not on SSID 'Crew' (no Wi-Fi interface, or its SSID is unknown)"


def test_require_ssid_skips_wifi_on_other_ssids():
    wlan1 = iface("wlan1", 6, "172.16.0.4", kind=Kind.WIFI, ssid="Guest")
    adv = decide(state(ETH, WLAN, wlan1), DiscoveryConfig(require_ssid="Crew", wifi_only=True))
    assert adv.interfaces == ("wlan0",) and "172.16.0.4" not in addrs(adv)


def test_disabled():
    adv = decide(state(ETH), DiscoveryConfig(enabled=False))
    assert not adv.active and adv.reason == "discovery is disabled"


@pytest.mark.parametrize(("host", "expected"), [
    ("::", ["192.168.5.10", "fe80::2"]),
    ("0.0.0.0", ["192.168.5.10"]),
    ("192.168.5.10", ["192.168.5.10"]),
    ("127.0.0.1", []),  # what the other tests' gateways listen on: nothing is advertised
    ("gateway.example", []),
])
def test_only_addresses_the_listeners_accept_on(host, expected):
    adv = decide(state(LO, ETH), DiscoveryConfig(), listen_host=host)
    assert addrs(adv) == expected
    if not expected:
        assert adv.reason == f"listening on {host} only: no such address on eth0"


# --- describing a change for the log and the status -------------------------------------


def test_describe_changes():
    before = decide(state(ETH), DiscoveryConfig())
    moved = decide(state(iface("eth0", 2, "192.168.5.11", "fe80::2")), DiscoveryConfig())
    change = describe(before, moved)
    assert change.added == ("192.168.5.11",) and change.removed == ("192.168.5.10",)
    assert change.summary == ("advertising on eth0: 192.168.5.11, fe80::2; added 192.168.5.11; "
                              "removed 192.168.5.10")
    assert describe(moved, moved) is None
    gone = describe(moved, decide(state(ETH), DiscoveryConfig(require_ssid="Crew")))
    assert gone.removed == ("192.168.5.11", "fe80::2")
    assert gone.summary.startswith("advertising nothing: not on SSID 'Crew'")


# --- which backend ---------------------------------------------------------------------


@pytest.mark.parametrize(("platform", "pyroute2", "netifaces", "forced", "expected"), [
    ("linux", True, True, None, NETLINK),  # never netifaces where netlink works
    ("linux", True, False, None, NETLINK),
    ("linux", False, True, None, NETIFACES),
    ("darwin", False, True, None, NETIFACES),
    ("darwin", True, True, None, NETIFACES),  # pyroute2 installed, but no netlink on a Mac
    ("linux", True, True, NETIFACES, NETIFACES),
])
def test_backend_choice(platform, pyroute2, netifaces, forced, expected):
    assert choose_backend(platform, pyroute2, netifaces, forced) == expected


def test_no_backend_says_what_to_install():
    with pytest.raises(RuntimeError, match="netifaces"):
        choose_backend("darwin", False, False)
    with pytest.raises(ValueError):
        choose_backend("linux", True, True, "ifconfig")


# --- the netlink watcher's own thread (uvloop cannot open netlink sockets) ---------------


class _Scripted(Watcher):
    """A watcher that starts (or fails to) and then changes once, on whatever loop runs it."""

    backend = "scripted"

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.fail = fail
        self.loop_type = ""
        self.closed = False

    async def start(self) -> None:
        self.loop_type = type(asyncio.get_running_loop()).__name__
        if self.fail:
            raise OSError("no netlink here")
        self.state = InterfaceState().with_link(1, "e0", up=True, loopback=False)
        asyncio.get_running_loop().call_later(
            0.05, self._publish, self.state.with_link(2, "e1", up=True, loopback=False))

    async def close(self) -> None:
        self.closed = True


async def test_a_threaded_watcher_runs_on_a_selector_loop_and_posts_changes_back():
    inner = _Scripted()
    watcher = ThreadedWatcher(lambda: inner)
    await watcher.start()
    assert watcher.backend == "scripted" and inner.loop_type.endswith("SelectorEventLoop")
    assert [i.name for i in watcher.state.interfaces] == ["e0"]
    state = await asyncio.wait_for(watcher.changed(), 5)
    assert sorted(i.name for i in state.interfaces) == ["e0", "e1"]
    await watcher.close()
    assert inner.closed


async def test_a_threaded_watcher_that_cannot_start_raises_in_the_caller():
    watcher = ThreadedWatcher(lambda: _Scripted(fail=True))
    with pytest.raises(OSError, match="no netlink here"):
        await asyncio.wait_for(watcher.start(), 5)
    await watcher.close()
