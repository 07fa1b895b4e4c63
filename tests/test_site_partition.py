"""A site cut in two (issue 17, point 5): three nats-servers in network namespaces of their
own on one switch, a gateway beside n1 (the majority) and one beside n3; n3's link is cut.

The minority side keeps nothing it cannot keep: pushes there get 503 with a reason, and an
INVITE gets 503 so the PBX tries another branch; the majority goes on; once the link is
back, the minority gateway accepts again and everything answered 200 was delivered.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import jwt
import pytest
import yaml

from bench.lib.natscluster import NatsCluster
from gateway.transport import control
from tests.conftest import ROOT
from tests.netns import Lab, Lines, why_not_available
from tests.test_cluster import site_key
from tests.test_sip import SCENARIOS, SECRET, SIPP

NET = "10.79.0"


def request(gw: dict, message: dict) -> dict:
    return asyncio.run(control.request(Path(gw["runtime"]["control"]), message))


def push(gw: dict, token: str, n: int) -> dict:
    return request(gw, {"op": "send", "token": token, "payload": {"n": n}})


def until_accepted(gw: dict, token: str, n: int, within: float) -> str:
    """Push until the gateway answers ok (only 503 or a token not known yet meanwhile)."""
    deadline = time.monotonic() + within
    while True:
        reply = push(gw, token, n)
        if reply["ok"]:
            return reply["push_id"]
        assert reply["reason"] in ("ServiceUnavailable", "BadDeviceToken"), reply
        assert time.monotonic() < deadline, reply
        time.sleep(0.3)


def start_gateway(ns, tmp: Path, name: str, host: str, servers: list[str], key: dict,
                  secret: Path) -> dict:
    state = tmp / name
    config = tmp / f"{name}.yaml"
    config.write_text(yaml.safe_dump({
        "name": name, "state_dir": str(state), "tls": key, "log": {"level": "warning"},
        "listen": {"host": host, "port": 4433}, "api": {"enabled": False},
        "discovery": {"enabled": False},
        "assertions": {"hs256_secret_file": str(secret)},
        "sip": {"enabled": True, "host": "127.0.0.1", "port": 5060, "trusted": ["127.0.0.1"],
                "ring_window": 8.0, "reach_timeout": 3.0},
        "cluster": {"enabled": True, "site": "cut", "servers": servers, "replicas": 3,
                    "connect_timeout": 5.0, "accept_timeout": 1.0}}))
    proc = ns.popen([sys.executable, "-m", "gateway.cli", "run", "-c", str(config)], cwd=ROOT)
    lines = Lines(proc)
    _, line = lines.wait_for(lambda text: "pin sha256/" in text, 60)
    return {"proc": proc, "lines": lines, "pin": line.split("pin ")[1].strip(),
            "runtime": json.loads((state / "runtime.json").read_text())}


def test_the_minority_side_of_a_partition_answers_503_and_heals(tmp_path):
    reason = why_not_available("sipp")
    if reason:
        pytest.skip(reason)
    with Lab() as lab:
        spaces = [lab.add(f"n{i}") for i in (1, 2, 3)]
        for i, ns in enumerate(spaces, 1):
            lab.plug(ns, f"v{i}", f"{NET}.{i}/24")
        cluster = NatsCluster(tmp_path / "nats")
        try:
            cluster.start(places=[(ns.name, f"{NET}.{i}") for i, ns in
                                  enumerate(spaces, 1)])
            run(lab, spaces, cluster, tmp_path)
        finally:
            cluster.stop()


def run(lab: Lab, spaces: list, cluster: NatsCluster, tmp: Path) -> None:
    key = site_key(tmp / "site-key")
    secret = tmp / "jwt.secret"
    secret.write_text(SECRET)
    # the majority's gateway is told of n3 only, so it is connected there when n3 is cut
    # off: it must notice (missed pings), and move to n1 or n2 (learnt from n3's INFO)
    majority = start_gateway(spaces[0], tmp, "gw1", f"{NET}.1", cluster.urls[2:], key,
                             secret)
    minority = start_gateway(spaces[2], tmp, "gw3", f"{NET}.3", cluster.urls, key, secret)
    nurse = jwt.encode({"sub": "nurse", "exp": int(time.time()) + 600}, SECRET,
                       algorithm="HS256")
    phone = Lines(spaces[0].popen([
        sys.executable, "-m", "gateway.cli", "device", "--host", f"{NET}.1", "--port", "4433",
        "--pin", majority["pin"], "--transport", "tls", "--assertion", nurse], cwd=ROOT))
    _, line = phone.wait_for(lambda text: '"welcome"' in text, 20)
    token = json.loads(line)["token"]
    answered = []
    answered.append(until_accepted(minority, token, 0, 10))  # the site knows it on both

    spaces[2].ip("link", "set", "v3", "down")  # n3 and gw3 cut off from n1 and n2
    started = time.monotonic()
    reply = push(minority, token, 1)
    assert not reply["ok"] and reply["reason"] == "ServiceUnavailable", reply
    assert "quorum" in reply["message"] and time.monotonic() - started < 3
    final = tmp / "final_503.xml"
    final.write_text((SCENARIOS / "uac_final.xml").read_text().replace("FINAL_STATUS", "503"))
    call = spaces[2].exec(SIPP, "127.0.0.1:5060", "-sf", str(final), "-s", "nurse", "-m",
                          "1", "-i", "127.0.0.1", "-p", "5070", "-timeout", "20s",
                          "-timeout_error", "-nostdin", "-nd", timeout=40, check=False)
    assert call.returncode == 0, call.stdout + call.stderr
    # the majority goes on: after its NATS connection notices n3 is gone, if it was
    # connected there (missed pings, ~6-9 s), and after an election if n3 led the stream
    answered.append(until_accepted(majority, token, 2, 40))
    assert not push(minority, token, 4)["ok"]  # and the minority still keeps nothing

    spaces[2].ip("link", "set", "v3", "up")  # healed
    answered.append(until_accepted(minority, token, 3, 30))
    got: set[str] = set()
    deadline = time.monotonic() + 20
    while not set(answered) <= got:
        _, line = phone.wait_for(lambda text: '"push"' in text,
                                 max(0.1, deadline - time.monotonic()))
        got.add(json.loads(line)["id"])
