"""`lpgw selftest` against `lpgw run` leaves no trace: its two test devices and their pushes
(a test push each, an incoming call and its end) are deleted once it is done, the delivery
counters in /metrics and `lpgw status` do not move, and those counters are integers.
Devices left by the self-test of an earlier version are deleted at the next start.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing

import httpx
from prometheus_client.parser import text_string_to_metric_families

from gateway.core.tokens import SELFTEST_TOPIC, selftest_tokens
from gateway.service import free_port
from gateway.store import Store
from tests.conftest import ROOT, GatewayProcess, new_install, send

# what operators read about delivery; the self-test must not add to any of it
DELIVERY_FAMILIES = ("lpgw_pushes_accepted", "lpgw_pushes_delivered", "lpgw_pushes_expired",
                     "lpgw_pushes_dropped", "lpgw_pushes_rejected", "lpgw_handshakes",
                     "lpgw_delivery_latency_seconds")


def lpgw(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)


async def delivery_counters(gp: GatewayProcess) -> dict[tuple, float]:
    async with httpx.AsyncClient(http2=True, verify=False) as client:
        text = (await client.get(f"https://127.0.0.1:{gp.runtime['api_port']}/metrics")).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            if family.name in DELIVERY_FAMILIES
            for s in family.samples if not s.name.endswith("_created")}


def stored(gp: GatewayProcess) -> tuple[set[str], int, set[str]]:
    """(tokens, pushes, self-test topic tokens) in the database, read as another process."""
    with closing(sqlite3.connect(f"file:{gp.state / 'lpgw.sqlite3'}?mode=ro", uri=True)) as db:
        tokens = {r[0] for r in db.execute("SELECT token FROM devices")}
        tests = {r[0] for r in db.execute("SELECT token FROM devices WHERE topic=?",
                                          (SELFTEST_TOPIC,))}
        pushes = db.execute("SELECT count(*) FROM pushes").fetchone()[0]
    return tokens, pushes, tests


def status(gp: GatewayProcess) -> dict:
    result = lpgw("status", "-c", str(gp.config_path))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def plant_leftovers(gp: GatewayProcess) -> set[str]:
    """What an earlier version's self-test left: its two devices, with a push each."""
    secret = bytes.fromhex((gp.state / "token.secret").read_text())
    leftovers = selftest_tokens(secret, gp.runtime["gateway_id"])
    store = Store(gp.state / "lpgw.sqlite3")
    try:
        for token in leftovers:
            store.record_device(token, SELFTEST_TOPIC, ("alert", "voip"), None, time.time())
            store.accept_push(token, new_install(), "alert", 10, 0, None, "{}", time.time(), 8)
    finally:
        store.close()
    return leftovers


async def test_selftest_leaves_no_device_no_push_and_no_count(tmp_path, devices):
    gp = GatewayProcess(tmp_path / "state", 0, {
        "listen": {"host": "127.0.0.1", "port": 0},
        "sip": {"enabled": True, "host": "127.0.0.1", "port": free_port("127.0.0.1")}})
    gp.start()
    gp.kill(signal.SIGTERM)
    leftovers = plant_leftovers(gp)
    gp.start()
    try:
        assert not stored(gp)[2] & leftovers, "an earlier self-test's devices are deleted"
        phone = devices(gp.handle(), "tls", install_id=new_install())
        token = await phone.welcome()
        assert (await send(gp.handle(), token))["ok"]
        await phone.next("push")
        while (await delivery_counters(gp)).get(("lpgw_pushes_delivered_total", ())) != 1:
            await asyncio.sleep(0.02)  # the phone's ack is on its way
        before = (await delivery_counters(gp), status(gp), stored(gp))
        assert before[2][0] == {token}

        report = json.loads(lpgw("selftest", "--json", "-c", str(gp.config_path)).stdout)
        checks = {c["name"]: c["ok"] for c in report["checks"]}
        for name in ("device over quic", "device over tls", "sip call"):
            assert checks[name] is True, report

        deadline = time.monotonic() + 5
        while stored(gp) != before[2]:  # the test devices are let go as they disconnect
            assert time.monotonic() < deadline, stored(gp)
            await asyncio.sleep(0.05)
        after = (await delivery_counters(gp), status(gp), stored(gp))
    finally:
        gp.kill(signal.SIGTERM)
    assert after[0] == before[0], "the self-test moved the delivery counters"
    shown = after[1]
    assert shown["devices"]["known"] == 1
    assert shown["pushes"] == before[1]["pushes"]
    counters = [*shown["pushes"].values(), shown["heartbeat_timeouts"],
                *shown["call_actions"].values()]
    assert all(type(n) is int for n in counters), shown
    assert gp.proc.returncode == 0


def test_selftest_answers_the_inbound_digest_challenge(tmp_path):
    """With sip.inbound_auth on, the gateway challenges the self-test's INVITE like any
    other (loopback is not exempt); the self-test answers from the site's credentials file,
    and a wrong file makes its SIP call check fail."""
    credentials = tmp_path / "inbound.credentials"
    credentials.write_text("pbx:ward-3-secret\n")
    gp = GatewayProcess(tmp_path / "state", 0, {
        "listen": {"host": "127.0.0.1", "port": 0},
        "sip": {"enabled": True, "host": "127.0.0.1", "port": free_port("127.0.0.1"),
                "inbound_auth": {"enabled": True, "credentials_file": str(credentials)}}})
    gp.start()
    try:
        report = json.loads(lpgw("selftest", "--json", "-c", str(gp.config_path)).stdout)
        checks = {c["name"]: c["ok"] for c in report["checks"]}
        assert checks["sip call"] is True, report
        # the self-test reads another password than the gateway holds (not reloaded)
        credentials.write_text("pbx:not-the-one\n")
        report = json.loads(lpgw("selftest", "--json", "-c", str(gp.config_path)).stdout)
        checks = {c["name"]: c["ok"] for c in report["checks"]}
        assert checks.get("sip call") is False, json.dumps(report["checks"])
    finally:
        gp.kill(signal.SIGTERM)
