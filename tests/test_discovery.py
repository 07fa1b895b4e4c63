"""Discovery as phones meet it: a gateway in one network namespace, phones in others.

A "phone" browses with avahi (an mDNS implementation nobody here wrote) and with
python-zeroconf (`lpgw discover --watch`), and reference devices connect with
`lpgw device --discover`. Then the gateway's network changes under them. All multicast stays
inside namespaces these tests make and always delete; they need root, `ip` and (for the
avahi phone) avahi-daemon, avahi-utils and dbus, and skip with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from zeroconf import ServiceInfo

from gateway.net.browse import Ambiguous, NotFound, parse, pick, usable
from gateway.net.discovery import Identity, instance_label, txt_records
from tests.conftest import ROOT
from tests.netns import (
    AvahiPhone,
    AvahiRecord,
    Lines,
    Netns,
    why_not_available,
)

PY = sys.executable
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
INSTANCE = "Deck 5 Gateway"
SEEN_WITHIN = 2.0  # the promise: phones see an address change within 2 s
# avahi's view lags python-zeroconf's (0.1-0.6 s here) by up to ~1 s: its cache waits RFC
# 6762 section 10.2's one second before it flushes records an announcement replaced
AVAHI_GRACE = 1.0
LATENCIES: dict[str, list[float]] = {"python-zeroconf": [], "avahi": []}  # change -> seen


class GatewayInNs:
    """`lpgw run` inside a namespace, listening on "::" as a real gateway does."""

    def __init__(self, ns: Netns, workdir: Path, name: str = INSTANCE, quic: bool = True,
                 **discovery: Any) -> None:
        self.ns = ns
        self.state = workdir / f"{ns.name}-state"
        self.config = workdir / f"{ns.name}.yaml"
        self.config.write_text(yaml.safe_dump({
            "name": name, "state_dir": str(self.state),
            "listen": {"host": "::", "port": 4433, "quic": quic}, "api": {"port": 0},
            "protocol": {"heartbeat": 0.5, "heartbeat_misses": 2},
            "store": {"synchronous": "NORMAL"}, "sip": {"enabled": False},
            "discovery": discovery}))
        self.proc = ns.popen([PY, "-m", "gateway.cli", "run", "-c", str(self.config)],
                             cwd=ROOT, env=ENV)
        self.lines = Lines(self.proc)

    def started(self) -> GatewayInNs:
        self.lines.wait_for(lambda line: "pin sha256/" in line, 30)
        runtime = json.loads((self.state / "runtime.json").read_text())
        self.pin, self.id = runtime["pin"], runtime["gateway_id"]
        return self

    def network(self) -> dict:
        done = subprocess.run([PY, "-m", "gateway.cli", "status", "-c", str(self.config)],
                              capture_output=True, text=True, timeout=20, cwd=ROOT)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)["network"]

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        assert self.proc.wait(15) == 0


class Events:
    """JSON lines of an `lpgw` process in a namespace."""

    def __init__(self, ns: Netns, *args: str) -> None:
        self.proc = ns.popen([PY, "-m", "gateway.cli", *args], cwd=ROOT, env=ENV,
                             stdin=subprocess.PIPE)
        self.lines = Lines(self.proc)

    def next(self, test: Callable[[dict], bool], timeout: float = 10) -> tuple[float, dict]:
        def match(line: str) -> bool:
            return line.startswith("{") and test(json.loads(line))

        when, line = self.lines.wait_for(match, timeout)
        return when, json.loads(line)

    def event(self, kind: str, timeout: float = 10) -> dict:
        return self.next(lambda e: e.get("event") == kind, timeout)[1]

    def finish(self, timeout: float = 15) -> tuple[int, list[dict]]:
        """Exit status and every event, once the process ends by itself."""
        code = self.proc.wait(timeout)
        with pytest.raises(AssertionError):
            self.lines.wait_for(lambda line: False, 2)  # drain to the end
        return code, [json.loads(line) for _, line in self.lines.seen if line.startswith("{")]


def bare(address: str) -> str:
    return address.split("%")[0]


def zeroconf_sees(addresses: set[str], gateway: GatewayInNs) -> Callable[[dict], bool]:
    """`lpgw discover --watch` shows both services, with exactly these addresses."""
    def good(event: dict) -> bool:
        found = event.get("gateways", [])
        return (sorted(f["service_type"] for f in found) == ["_lpgw._tcp.local.",
                                                             "_lpgw._udp.local."]
                and all({bare(a) for a in f["addresses"]} == addresses
                        and f["gateway_id"] == gateway.id and f["pin"] == gateway.pin
                        for f in found))
    return good


def avahi_sees(addresses: set[str], gateway: GatewayInNs,
               protocols: tuple[str, ...] = ("IPv4", "IPv6")) -> Callable[[list], bool]:
    """avahi resolves both services, over these protocols, to one of these addresses."""
    def good(records: list[AvahiRecord]) -> bool:
        mine = [r for r in records if r.protocol in protocols]
        return (sorted({(r.type, r.protocol) for r in mine})
                == sorted((t, p) for t in ("_lpgw._tcp", "_lpgw._udp") for p in protocols)
                and all(bare(r.address) in addresses and r.port == 4433
                        and r.instance == INSTANCE and r.txt["pin"] == gateway.pin
                        for r in mine))
    return good


# --- records and choices, without a network --------------------------------------------


IDENTITY = Identity(instance=INSTANCE, gateway_id="3f0c9a4e2b7d1a65",
                    pin="sha256/TrzMg9VHe3TURtM0DT7CB135+/FE7gQvMSCxtTkPLBk=", port=4433,
                    transports=("tls", "quic"))


def info_for(identity: Identity, ssid: str | None, *addresses: str,
             type_: str = "_lpgw._udp.local.") -> ServiceInfo:
    return ServiceInfo(type_, f"{identity.instance}.{type_}", port=identity.port,
                       properties=txt_records(identity, ssid), server=identity.host,
                       parsed_addresses=list(addresses))


def test_txt_records():
    assert txt_records(IDENTITY, "Crew") == {
        "v": "1", "id": "3f0c9a4e2b7d1a65", "pin": IDENTITY.pin, "tr": "tls,quic",
        "ssid": "Crew"}
    assert "ssid" not in txt_records(IDENTITY, None)
    assert IDENTITY.host == "lpgw-3f0c9a4e2b7d1a65.local."


def test_instance_names_fit_one_dns_label():
    assert instance_label("Deck 5 Gateway") == "Deck 5 Gateway"
    long = instance_label("Brücke " * 20)  # 63 bytes at most, never half a character
    assert len(long.encode()) <= 63 and long.startswith("Brücke Brücke")


def test_parse_reads_the_records_and_orders_addresses():
    found = parse(info_for(IDENTITY, "Crew", "fe80::1", "fd00::1", "10.0.0.1"))
    assert found.instance == INSTANCE and found.gateway_id == IDENTITY.gateway_id
    assert found.pin == IDENTITY.pin and found.transports == ("tls", "quic")
    assert found.ssid == "Crew" and found.port == 4433
    assert found.addresses == ("10.0.0.1", "fd00::1", "fe80::1")
    other_version = ServiceInfo("_lpgw._udp.local.", "X._lpgw._udp.local.", port=4433,
                                properties={"v": "2", "id": "x", "pin": "y"},
                                server="x.local.", parsed_addresses=["10.0.0.1"])
    assert parse(other_version) is None


def test_pick_one_gateway_or_say_why_not():
    deck5 = parse(info_for(IDENTITY, None, "10.0.0.1"))
    deck6 = parse(info_for(Identity("Deck 6", "77aa", "sha256/x", 4433, ("quic",)), None,
                           "10.0.0.2"))
    assert pick([deck5]) is deck5
    assert pick([deck5, deck6], instance="Deck 6") is deck6
    assert pick([deck5, deck6], gateway_id=IDENTITY.gateway_id) is deck5
    with pytest.raises(Ambiguous, match=r"2 gateways found: 'Deck 5 Gateway'.*'Deck 6'"):
        pick([deck5, deck6])
    with pytest.raises(NotFound, match=r"with instance 'Deck 9' found \(seen: 'Deck 5"):
        pick([deck5, deck6], instance="Deck 9")
    with pytest.raises(NotFound, match=r"^no lpgw gateway found$"):
        pick([])
    # gateways of one site: one id, one pin; any of them will do, asked for or not
    site = Identity("Ward A", "site-ward", "sha256/s", 4433, ("quic",))
    ward_a = parse(info_for(site, None, "10.0.0.3"))
    ward_b = parse(info_for(Identity("Ward B", "site-ward", "sha256/s", 4433, ("quic",)),
                            None, "10.0.0.4"))
    assert pick([ward_a, ward_b]) is ward_a
    assert pick([deck5, ward_a, ward_b], gateway_id="site-ward") is ward_a
    impostor = parse(info_for(Identity("Ward C", "site-ward", "sha256/other", 4433,
                                       ("quic",)), None, "10.0.0.5"))
    with pytest.raises(Ambiguous, match=r"advertise id site-ward with different pins"):
        pick([ward_a, impostor], gateway_id="site-ward")
    # a device that knows the site's pin moves among those with it; an impostor beside
    # them cannot make it give up (with only the impostor left, it refuses that key)
    assert usable([ward_a, impostor, deck5, ward_b], "site-ward", "sha256/s") == [ward_a,
                                                                                ward_b]
    assert usable([impostor], "site-ward", "s") == [impostor]
    assert usable([ward_a, impostor], "site-ward", None) == [ward_a, impostor]


async def test_the_gateway_reports_its_network(gateway_factory, tmp_path):
    """In process, on this machine: a gateway on 127.0.0.1 tracks the interfaces but has
    nothing to advertise, so it opens no mDNS socket."""
    gw = await gateway_factory(discovery={"enabled": True})
    network = gw.status()["network"]
    assert network["backend"] == "netlink" and not network["advertising"]
    assert network["reason"].startswith("listening on 127.0.0.1 only: no such address on")
    assert network["services"] == {} and network["error"] == ""
    assert network["interfaces_seen"] and "lo" not in network["interfaces_seen"]
    off = await gateway_factory(tmp_path / "off")  # the tests' default: discovery off
    assert off.status()["network"] == {"advertising": False, "reason": "discovery is disabled"}


# --- interface tracking in a namespace --------------------------------------------------


def test_netifaces_poller_sees_what_netlink_sees(lab):
    ns = lab.add("nw")
    lab.plug(ns, "e0", "10.79.0.1/24", "10.79.0.2/24", "fd79::1/64")
    lab.plug(ns, "e1", "10.80.0.1/24", up=False)
    watch = {backend: Lines(ns.popen([PY, "-m", "gateway.net.netwatch", "--backend", backend,
                                      "--interval", "0.2", "--watch"], cwd=ROOT, env=ENV))
             for backend in ("netlink", "netifaces")}

    def agreed(test: Callable[[dict], bool]) -> dict:
        """The latest states of both watchers, once they are equal and pass the test."""
        deadline = time.monotonic() + 10
        while True:
            latest = [json.loads(seen[-1][1])["interfaces"] if (seen := w.drain()) else None
                      for w in watch.values()]
            if latest[0] is not None and latest[0] == latest[1] and test(latest[0]):
                return latest[0]
            assert time.monotonic() < deadline, f"watchers disagree: {latest}"
            time.sleep(0.1)

    first = agreed(lambda s: True)
    assert first["e0"]["up"] and {"10.79.0.1", "10.79.0.2", "fd79::1"} < \
        set(first["e0"]["addresses"])
    assert not first["e1"]["up"] and first["e1"]["addresses"] == ["10.80.0.1"]

    ns.ip("link", "set", "e1", "up")
    ns.ip("addr", "add", "fd80::1/64", "dev", "e1", "nodad")
    ns.ip("addr", "del", "10.79.0.2/24", "dev", "e0")
    after = agreed(lambda s: s["e1"]["up"] and "fd80::1" in s["e1"]["addresses"]
                   and "10.79.0.2" not in s["e0"]["addresses"])
    assert after["e0"]["addresses"][0] == "10.79.0.1"

    picked = json.loads(ns.exec(PY, "-m", "gateway.net.netwatch", timeout=20).stdout)
    assert picked["backend"] == "netlink"  # where netlink works, it is the one used


# --- the whole story ---------------------------------------------------------------------


def test_phones_find_the_gateway_and_follow_it(lab, tmp_path):
    reason = why_not_available("avahi-daemon", "avahi-browse", "dbus-daemon", "unshare",
                               "stdbuf")
    if reason:
        pytest.skip(reason)
    gw, ph, pd = lab.add("gw"), lab.add("ph"), lab.add("pd")
    lab.plug(gw, "g0", "10.77.0.1/24", "fd77::1/64")
    lab.plug(gw, "g1", up=False)  # the second interface, brought up later
    lab.plug(ph, "p0", "10.77.0.2/24", "fd77::2/64")  # a phone with avahi
    lab.plug(pd, "d0", "10.77.0.3/24", "fd77::3/64")  # a phone with python-zeroconf
    gateway = GatewayInNs(gw, tmp_path)
    avahi = AvahiPhone(ph, "p0", tmp_path)
    gateway.started()
    browser = Events(pd, "discover", "--watch")

    # found, by both browsers, with the TXT records
    here = gw.addresses("g0")
    browser.next(zeroconf_sees(here, gateway))
    _, records = avahi.until(avahi_sees(here, gateway), 10)
    assert {r.txt["v"] for r in records} == {"1"} and {r.txt["tr"] for r in records} == \
        {"tls,quic"} and {r.txt["id"] for r in records} == {gateway.id}
    assert "ssid" not in records[0].txt  # no Wi-Fi here

    # devices connect through discovery: one trusting on first use, one with the pin
    phone = tmp_path / "phone.json"
    quic = Events(pd, "device", "--discover", "--tofu", "--state", str(phone))
    tls = Events(pd, "device", "--discover", "--transport", "tls", "--pin", gateway.pin,
                 "--instance", INSTANCE)
    assert quic.event("trusted")["pin"] == gateway.pin
    for device in (quic, tls):
        assert device.event("located")["host"] == "10.77.0.1"
        device.event("welcome")
    assert json.loads(phone.read_text())["pin"] == gateway.pin  # for next time

    def change(*commands: tuple[str, ...], interface: str, protocols=("IPv4", "IPv6"),
               reconnect_to: str) -> None:
        """Change the gateway's network; every phone must see it, every device follow.
        Timed from the moment the change is complete (the last command done)."""
        for command in commands:
            gw.ip(*command)
        start = time.monotonic()
        now = gw.addresses(interface)
        seen, _ = browser.next(zeroconf_sees(now, gateway))
        LATENCIES["python-zeroconf"].append(seen - start)
        assert seen - start < SEEN_WITHIN, f"python-zeroconf saw {now} after {seen - start} s"
        seen, _ = avahi.until(avahi_sees(now, gateway, protocols), SEEN_WITHIN + AVAHI_GRACE)
        LATENCIES["avahi"].append(seen - start)
        assert seen - start < SEEN_WITHIN + AVAHI_GRACE, f"avahi saw {now} after {seen - start} s"
        for device in (quic, tls):  # each notices the silence, looks again, reconnects
            device.next(lambda e: e.get("event") == "located" and e["host"] == reconnect_to, 15)
            device.event("welcome")
        network = gateway.network()
        assert network["backend"] == "netlink"  # on the gateway's own loop (uvloop) too
        assert network["advertising"] and set(network["addresses"]) == now
        assert network["interfaces"] == [interface] and network["error"] == ""

    # a new address, as a new DHCP lease brings (old one first: a primary's removal takes
    # its secondaries with it)
    change(("addr", "del", "10.77.0.1/24", "dev", "g0"),
           ("addr", "add", "10.77.0.9/24", "dev", "g0"), interface="g0",
           reconnect_to="10.77.0.9")
    assert gateway.network()["last_change"]["removed"] == ["10.77.0.1"]
    assert any("lpgw.net: discovery: advertising on g0: 10.77.0.9" in line and
               "removed 10.77.0.1" in line for _, line in gateway.lines.drain())
    # the link goes down, its lease with it (else Linux, a weak host, keeps answering for
    # the old address through g1, and established connections carry on), and a second
    # interface comes up
    change(("link", "set", "g0", "down"), ("addr", "flush", "dev", "g0"),
           ("link", "set", "g1", "up"),
           ("addr", "add", "10.77.0.21/24", "dev", "g1"),
           ("addr", "add", "fd77::21/64", "dev", "g1", "nodad"), interface="g1",
           reconnect_to="10.77.0.21")
    # IPv4 goes, IPv6 stays. avahi caches per protocol, and with no IPv4 address left
    # nothing can reach its IPv4 cache (that entry lives out its TTL), so look at IPv6 only
    change(("addr", "del", "10.77.0.21/24", "dev", "g1"), interface="g1", protocols=("IPv6",),
           reconnect_to="fd77::21")

    # a clean stop says goodbye: phones forget the gateway at once, not at the TTL
    start = time.monotonic()
    gateway.stop()
    gone, _ = browser.next(lambda e: e.get("gateways") == [], SEEN_WITHIN + 1)
    assert gone - start < SEEN_WITHIN + 1
    avahi.until(lambda records: not [r for r in records if r.protocol == "IPv6"], 4, whole=True)
    for who, times in LATENCIES.items():
        print(f"\n{who} saw the changes after {', '.join(f'{t:.2f}' for t in times)} s "
              f"(median {statistics.median(times):.2f} s)", end="")


def test_choosing_among_gateways_and_where_they_advertise(lab, tmp_path):
    gw5, gw6, pd = lab.add("g5"), lab.add("g6"), lab.add("pd")
    lab.plug(gw5, "w0", "10.77.0.1/24", "fd77::1/64")
    lab.plug(gw5, "w1", "10.78.0.1/24")
    lab.plug(gw6, "w0", "10.77.0.6/24")
    lab.plug(pd, "d0", "10.77.0.3/24", "10.78.0.3/24", "fd77::3/64")
    deck5 = GatewayInNs(gw5, tmp_path, interfaces=["w1"])  # advertised on w1 only
    deck6 = GatewayInNs(gw6, tmp_path, name="Deck 6 Gateway", quic=False)  # TLS only
    deck5.started(), deck6.started()

    browser = Events(pd, "discover", "--watch")
    _, shown = browser.next(lambda e: len(e.get("gateways", [])) == 3)
    by_id: dict[str, list[dict]] = {}
    for found in shown["gateways"]:
        by_id.setdefault(found["gateway_id"], []).append(found)
    assert {bare(a) for a in by_id[deck5.id][0]["addresses"]} == gw5.addresses("w1")
    assert deck5.network()["interfaces"] == ["w1"]
    # only the transports it listens on
    assert [(f["service_type"], f["transports"]) for f in by_id[deck6.id]] == \
        [("_lpgw._tcp.local.", ["tls"])]

    several = Events(pd, "device", "--discover", "--transport", "tls", "--tofu", "--once")
    code, events = several.finish()
    assert code == 5 and "2 gateways found" in events[-1]["message"]
    assert "choose one with --instance or --gateway-id" in events[-1]["message"]

    wrong_key = Events(pd, "device", "--discover", "--transport", "tls",
                       "--instance", "Deck 6 Gateway", "--pin", deck5.pin)
    code, events = wrong_key.finish()
    assert code == 4 and events[-1]["reason"] == "pin_mismatch"

    nobody = Events(pd, "device", "--discover", "--instance", "Deck 9", "--tofu",
                    "--discover-timeout", "1")
    code, events = nobody.finish()
    assert code == 5 and "no lpgw gateway with instance 'Deck 9' found" in events[-1]["message"]

    no_pin = Events(pd, "device", "--discover", "--instance", "Deck 6 Gateway")
    code, events = no_pin.finish()
    assert code == 2 and "give --pin, or --tofu" in events[-1]["message"]

    phone = tmp_path / "phone.json"
    for args in (("--tofu",), ()):  # trusted on first use, then the pin kept in --state
        chosen = Events(pd, "device", "--discover", "--gateway-id", deck5.id, "--transport",
                        "tls", "--state", str(phone), *args)
        assert chosen.event("located")["host"] == "10.78.0.1"
        assert chosen.event("welcome")["gateway_id"] == deck5.id
        chosen.proc.stdin.write("quit\n")
        chosen.proc.stdin.flush()
        assert chosen.proc.wait(10) == 0
        assert json.loads(phone.read_text())["pin"] == deck5.pin
        kinds = [json.loads(line)["event"] for _, line in chosen.lines.drain()
                 if line.startswith("{")]
        assert ("trusted" in kinds) == bool(args)

    # off the required SSID (there is no Wi-Fi here at all): nothing is advertised
    deck6.stop()
    browser.next(lambda e: {f["gateway_id"] for f in e.get("gateways", [])} == {deck5.id})
    deck6 = GatewayInNs(gw6, tmp_path, name="Deck 6 Gateway", require_ssid="Crew").started()
    network = deck6.network()
    assert not network["advertising"] and network["addresses"] == []
    assert network["reason"] == "not on SSID 'Crew' (no Wi-Fi interface, or its SSID is unknown)"
    assert network["interfaces_seen"]["w0"]["addresses"][0] == "10.77.0.6"
    listed = Events(pd, "discover", "--timeout", "2")
    code, found = listed.finish()
    assert code == 0 and {f["gateway_id"] for f in found} == {deck5.id}


def test_selftest_sees_its_own_bonjour_record(lab, tmp_path):
    """On the appliance, `lpgw selftest` checks the advertisement a phone would see."""
    gw_ns = lab.add("gw")
    lab.plug(gw_ns, "g0", "10.77.0.1/24")
    gateway = GatewayInNs(gw_ns, tmp_path).started()
    done = gw_ns.exec(PY, "-m", "gateway.cli", "selftest", "-c", str(gateway.config), "--json",
                      timeout=30, check=False)
    report = json.loads(done.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["bonjour"]["ok"] is True, checks["bonjour"]
    assert "10.77.0.1" in checks["bonjour"]["detail"]
    assert checks["network"]["ok"] is True and "10.77.0.1" in checks["network"]["detail"]
    failed = [c for c in report["checks"] if c["ok"] is False]
    assert report["ok"] and done.returncode == 0 and not failed, failed
    gateway.stop()
