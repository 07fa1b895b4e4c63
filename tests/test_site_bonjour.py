"""Phones find a site's gateways over Bonjour and move when theirs goes silent (issue 17,
point 1): two gateways of one site, each in a network namespace of its own, advertise the
site's id and pin; a reference device (`lpgw device --discover --gateway-id site-...`) in
a third finds one; that gateway's link is cut (no RST, no goodbye: its records stay in the
device's cache); the device notices the silence and moves to the other gateway of the
site, with the same token, and gets a push there. The site's 3 nats-servers sit in a
namespace of their own, so the cut costs the site nothing but that gateway.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import yaml

from bench.lib.natscluster import NatsCluster
from gateway.transport import control
from tests.conftest import ROOT
from tests.netns import Lab, Lines, Netns
from tests.test_cluster import site_key
from tests.test_discovery import Events

NET = "10.80.0"
SITE = "ward"


def start_gateway(ns: Netns, tmp: Path, name: str, servers: list[str], key: dict) -> dict:
    state = tmp / name
    config = tmp / f"{name}.yaml"
    config.write_text(yaml.safe_dump({
        "name": name, "state_dir": str(state), "tls": key, "log": {"level": "warning"},
        "listen": {"host": "::", "port": 4433, "quic": False}, "api": {"enabled": False},
        "protocol": {"heartbeat": 0.5, "heartbeat_misses": 2},
        "sip": {"enabled": False},
        "cluster": {"enabled": True, "site": SITE, "servers": servers, "replicas": 3,
                    "connect_timeout": 5.0}}))
    proc = ns.popen([sys.executable, "-m", "gateway.cli", "run", "-c", str(config)], cwd=ROOT)
    lines = Lines(proc)
    _, line = lines.wait_for(lambda text: "pin sha256/" in text, 60)
    return {"proc": proc, "pin": line.split("pin ")[1].strip(),
            "control": json.loads((state / "runtime.json").read_text())["control"]}


def test_a_phone_moves_to_another_gateway_of_the_site_when_its_own_goes_silent(lab: Lab,
                                                                              tmp_path):
    nats, g1, g2, pd = lab.add("nt"), lab.add("g1"), lab.add("g2"), lab.add("pd")
    lab.plug(nats, "n0", *(f"{NET}.{i}/24" for i in (11, 12, 13)))
    lab.plug(g1, "w0", f"{NET}.1/24")
    lab.plug(g2, "w0", f"{NET}.2/24")
    lab.plug(pd, "d0", f"{NET}.9/24")
    cluster = NatsCluster(tmp_path / "nats")
    gateways: dict[str, dict] = {}
    try:
        cluster.start(places=[(nats.name, f"{NET}.{i}") for i in (11, 12, 13)])
        key = site_key(tmp_path / "site-key")
        for i, ns in ((1, g1), (2, g2)):
            gateways[f"{NET}.{i}"] = start_gateway(ns, tmp_path, f"ward-{i}", cluster.urls,
                                                   key)
        pins = {gw["pin"] for gw in gateways.values()}
        assert len(pins) == 1  # the site's key pair: one pin on every gateway

        listed = Events(pd, "discover", "--timeout", "3")
        code, found = listed.finish()
        assert code == 0
        assert {f["gateway_id"] for f in found} == {f"site-{SITE}"}
        assert {f["instance"] for f in found} == {"ward-1", "ward-2"}

        device = Events(pd, "device", "--discover", "--gateway-id", f"site-{SITE}",
                        "--transport", "tls", "--pin", pins.pop(),
                        "--state", str(tmp_path / "phone.json"))
        first = device.event("located", 20)["host"]
        token = device.event("welcome", 30)["token"]
        other = next(host for host in gateways if host != first)

        cut = time.monotonic()
        (g1 if first.endswith(".1") else g2).ip("link", "set", "w0", "down")
        device.next(lambda e: e.get("event") == "located" and e["host"] == other, 20)
        welcome = device.event("welcome", 30)
        back = time.monotonic() - cut
        assert welcome["token"] == token and welcome["gateway_id"] == f"site-{SITE}"
        reply = asyncio.run(control.request(Path(gateways[other]["control"]), {
            "op": "send", "token": token, "payload": {"aps": {"alert": "moved"}}}))
        assert reply["ok"], reply
        pushed = device.event("push", 10)
        assert pushed["payload"] == {"aps": {"alert": "moved"}}
        print(f"\nthe phone was on {first}; its link cut, it was welcomed on {other} after "
              f"{back:.1f} s")
        assert back < 15
    finally:
        for gw in gateways.values():  # the cut-off one would wait for its NATS to drain
            gw["proc"].kill()
            gw["proc"].wait(10)
        cluster.stop()
