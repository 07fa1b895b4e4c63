"""Device-row spam, against `lpgw run`: new installs limited per source address, a cap on
device records, and devices unseen for `delivery.unregistered_after_days` pruned with their
queues. The sources are real other addresses: phones in network namespaces of their own.

Before issue 15 one client made 650 device rows a second with made-up install ids, kept for
ever.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import sys
import textwrap
import time
from pathlib import Path

import yaml

from tests.conftest import ROOT, GatewayProcess, new_install, send
from tests.netns import Lines

PY = sys.executable
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
GW, PHONE_A, PHONE_B = "10.77.0.1", "10.77.0.2", "10.77.0.3"

# Hellos from inside a phone's namespace, one TLS connection each: prints, per install id
# given, the first frame's type and, for a bye, its reason, as one JSON list.
HELLOS = textwrap.dedent("""
    import asyncio, json, sys
    from tests.rawpeer import RawTls, hello
    async def one(install):
        peer = await RawTls.open(int(sys.argv[2]), host=sys.argv[1])
        await peer.send(hello(install_id=install))
        frame = await peer.read(5)
        peer.writer.close()
        return [frame["type"], frame.get("reason")] if frame else ["closed", None]
    async def main():
        print(json.dumps([await one(i) for i in sys.argv[3:]]))
    asyncio.run(main())
""")


def hellos(ns, installs: list[str]) -> list[list]:
    done = ns.exec(PY, "-c", HELLOS, GW, "4433", *installs, timeout=60)
    return json.loads(done.stdout)


def metric(ns, api_port: int, name: str) -> dict[str, float]:
    """Samples of one metric from the gateway's /metrics, read inside its namespace."""
    done = ns.exec(PY, "-c", "import sys, httpx; print(httpx.get(sys.argv[1], verify=False)"
                   ".text)", f"https://{GW}:{api_port}/metrics", timeout=20)
    found = {}
    for line in done.stdout.splitlines():
        if line.startswith(name):
            key, _, value = line.rpartition(" ")
            found[key] = float(value)
    return found


def test_new_installs_are_limited_per_source_and_capped(lab, tmp_path):
    gw_ns, a, b = lab.add("gw"), lab.add("a"), lab.add("b")
    lab.plug(gw_ns, "eth0", f"{GW}/24")
    lab.plug(a, "eth0", f"{PHONE_A}/24")
    lab.plug(b, "eth0", f"{PHONE_B}/24")
    config = tmp_path / "lpgw.yaml"
    config.write_text(yaml.safe_dump({
        "state_dir": str(tmp_path / "state"), "discovery": {"enabled": False},
        "listen": {"host": "::", "port": 4433, "quic": False},
        "api": {"host": "::", "port": 8443}, "sip": {"enabled": False},
        "store": {"synchronous": "NORMAL"},
        "delivery": {"new_device_rate": 0.01, "new_device_burst": 5, "max_devices": 12}}))
    proc = gw_ns.popen([PY, "-m", "gateway.cli", "run", "-c", str(config)], cwd=ROOT, env=ENV)
    lines = Lines(proc)
    lines.wait_for(lambda line: "pin sha256/" in line, 30)

    first = [new_install() for _ in range(8)]
    got = hellos(a, first)
    # a burst of 5 from phone A, then its rate (one per 100 s) refuses the rest
    assert got == [["welcome", None]] * 5 + [["bye", "rate_limited"]] * 3, got
    # phone B has its own bucket; an install A already made connects again whatever A's rate
    assert hellos(b, [new_install() for _ in range(5)]) == [["welcome", None]] * 5
    assert hellos(a, first[:2]) == [["welcome", None]] * 2
    # 10 records now: two more fit under max_devices 12, then every new install is refused
    # from any source, a known one still welcome
    c = lab.add("c")
    lab.plug(c, "eth0", "10.77.0.4/24")
    got = hellos(c, [new_install() for _ in range(4)])
    assert got == [["welcome", None]] * 2 + [["bye", "device_limit"]] * 2, got
    assert hellos(a, first[2:3]) == [["welcome", None]]

    refused = metric(gw_ns, 8443, "lpgw_device_installs_refused_total")
    assert refused == {'lpgw_device_installs_refused_total{reason="rate"}': 3.0,
                       'lpgw_device_installs_refused_total{reason="full"}': 2.0}, refused
    handshakes = metric(gw_ns, 8443, "lpgw_handshakes_total")
    assert handshakes['lpgw_handshakes_total{result="rate_limited",transport="tls"}'] == 3
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(15) == 0
    # a refusal a client causes at will is logged once a minute per kind, the rest counted
    said = [line for _, line in lines.drain() if "refused a hello" in line]
    assert len(said) == 2, said  # of 3 rate refusals and 2 for the cap
    assert "too many new installs" in said[0] and "all the devices it can keep" in said[1]
    assert sum("closing tls peer" in line for _, line in lines.seen) == 2
    rows = sqlite3.connect(tmp_path / "state" / "lpgw.sqlite3").execute(
        "SELECT count(*) FROM devices").fetchone()[0]
    assert rows == 12


async def test_devices_unseen_too_long_are_pruned_with_their_queues(tmp_path, devices):
    """A gateway that finds, at start, devices last seen longer ago than
    unregistered_after_days deletes them and their queued pushes in its first sweep."""
    settings = {"listen": {"host": "127.0.0.1", "port": 0}, "sip": {"enabled": False},
                "store": {"synchronous": "NORMAL"},
                "delivery": {"unregistered_after_days": 1, "expire_interval": 0.2}}
    proc = GatewayProcess(tmp_path / "state", 0, settings)
    proc.start()
    gw = proc.handle()
    old, fresh = devices(gw, "tls", install_id=new_install()), devices(gw, "tls")
    old_token, fresh_token = await old.welcome(), await fresh.welcome()
    await old.stop()
    await fresh.stop()
    for token in (old_token, fresh_token):
        assert (await send(gw, token, {"aps": {"alert": "queued"}}))["ok"]
    proc.kill(signal.SIGTERM)
    db_path = proc.state / "lpgw.sqlite3"
    with sqlite3.connect(db_path) as db:  # the old one was last seen 2 days ago
        db.execute("UPDATE devices SET last_seen=? WHERE token=?",
                   (time.time() - 2 * 86400, old_token))
    assert _rows(db_path, old_token) == (1, 1)

    proc = GatewayProcess(tmp_path / "state", 0, settings)
    proc.start()
    try:
        deadline = time.monotonic() + 10
        while _rows(db_path, old_token) != (0, 0):
            assert time.monotonic() < deadline, "not pruned within 10 s"
            time.sleep(0.1)
        assert _rows(db_path, fresh_token) == (1, 1)  # seen lately: kept, queue and all
        reply = await send(proc.handle(), old_token, {"aps": {"alert": "late"}})
        assert not reply["ok"] and "BadDeviceToken" in json.dumps(reply), reply
    finally:
        proc.kill(signal.SIGTERM)
    out = "".join(proc.lines) + proc.proc.stdout.read().decode(errors="replace")
    assert "pruned 1 devices unseen for 1 days" in out, out


def _rows(db_path: Path, token: str) -> tuple[int, int]:
    with sqlite3.connect(db_path) as db:
        return (db.execute("SELECT count(*) FROM devices WHERE token=?", (token,)).fetchone()[0],
                db.execute("SELECT count(*) FROM pushes WHERE token=?", (token,)).fetchone()[0])

