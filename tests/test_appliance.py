"""The appliance: systemd notifications through a real NOTIFY_SOCKET, reload, drain, and the
self-test passing on a healthy gateway and failing, with the right words, on a broken one."""

from __future__ import annotations

import asyncio
import datetime
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization

from gateway import certs, selftest
from gateway.client import DeviceClient, DeviceOptions
from gateway.notify import Notifier
from gateway.service import Gateway, free_port
from tests.conftest import ROOT, make_config


class NotifySocket:
    """systemd's side of sd_notify: a datagram socket, each message stamped on arrival."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._running = True
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while self._running:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def wait_for(self, line: str, timeout: float = 15, after: float = 0.0) -> tuple[float, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for stamp, text in list(self.messages):
                if stamp >= after and line in text.split("\n"):
                    return stamp, text
            time.sleep(0.02)
        raise AssertionError(f"no {line!r} from the gateway; got {self.messages[-5:]}")

    def times(self, line: str) -> list[float]:
        return [t for t, text in self.messages if line in text.split("\n")]

    def close(self) -> None:
        self._running = False
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path):
    ns = NotifySocket(tmp_path / "notify.sock")
    yield ns
    ns.close()


def start_gateway(tmp_path: Path, notify: NotifySocket, extra: dict | None = None,
                  watchdog_usec: int = 400_000) -> tuple[subprocess.Popen, Path, dict]:
    cfg = tmp_path / "lpgw.yaml"
    data = {"state_dir": str(tmp_path / "state"),
            "listen": {"host": "127.0.0.1", "port": free_port("127.0.0.1")},
            "api": {"host": "127.0.0.1", "port": 0},
            "sip": {"host": "127.0.0.1", "port": free_port("127.0.0.1")},
            "discovery": {"enabled": False}}  # no mDNS on this machine's interfaces
    data.update(extra or {})
    cfg.write_text(yaml.safe_dump(data))
    env = {**os.environ, "NOTIFY_SOCKET": str(notify.path),
           "WATCHDOG_USEC": str(watchdog_usec), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "-c", str(cfg)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    return proc, cfg, data


def stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(30)


def test_ready_only_when_bound_then_watchdog_and_status(tmp_path, notify_socket):
    proc, _, data = start_gateway(tmp_path, notify_socket)
    try:
        _, ready = notify_socket.wait_for("READY=1")
        status = [line for line in ready.split("\n") if line.startswith("STATUS=")]
        assert status and "devices connected" in status[0]
        # READY means bound: the device port answers at once
        with socket.create_connection(("127.0.0.1", data["listen"]["port"]), timeout=2):
            pass
        time.sleep(1.2)
        pings = notify_socket.times("WATCHDOG=1")
        assert len(pings) >= 4  # WatchdogSec 0.4 s -> a ping every 0.2 s
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert max(gaps) < 0.5
    finally:
        assert stop(proc) == 0
    notify_socket.wait_for("STOPPING=1", timeout=2)


def test_bad_config_never_says_ready(tmp_path, notify_socket):
    proc, _, _ = start_gateway(tmp_path, notify_socket, {"protocol": {"heartbeat": -1}})
    assert proc.wait(20) == 2
    assert "protocol.heartbeat: must be at least" in proc.stdout.read().decode()
    assert notify_socket.times("READY=1") == []


async def test_a_blocked_event_loop_stops_the_watchdog(tmp_path, notify_socket):
    env = {"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "200000"}
    os.environ["NOTIFY_SOCKET"] = str(notify_socket.path)  # sdnotify reads it from there
    gw = None
    try:
        gw = await Gateway.start(make_config(tmp_path / "state"), Notifier(env))
        await asyncio.sleep(0.5)
        before = len(notify_socket.times("WATCHDOG=1"))
        blocked_at = time.monotonic()
        time.sleep(1.0)  # something hogs the loop: no ping may go out meanwhile
        await asyncio.sleep(0.5)
        pings = notify_socket.times("WATCHDOG=1")
        during = [t for t in pings if blocked_at + 0.05 < t < blocked_at + 0.95]
        assert before >= 3 and during == []
        assert any(t > blocked_at + 1.0 for t in pings)  # and it resumes after
    finally:
        os.environ.pop("NOTIFY_SOCKET", None)
        if gw is not None:
            await gw.stop(drain=0.2)


def test_notifier_errors_are_logged_not_swallowed(tmp_path, caplog):
    env = {"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock")}
    os.environ["NOTIFY_SOCKET"] = env["NOTIFY_SOCKET"]
    try:
        notifier = Notifier(env)
    finally:
        os.environ.pop("NOTIFY_SOCKET", None)
    assert not notifier.enabled
    assert "cannot reach systemd's NOTIFY_SOCKET" in caplog.text


def test_sighup_reloads_keys_without_dropping_devices(tmp_path, notify_socket):
    import httpx
    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    pub = tmp_path / "key.pub"
    pub.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    proc, cfg, data = start_gateway(tmp_path, notify_socket)
    events: list[dict] = []
    try:
        notify_socket.wait_for("READY=1")
        runtime = json.loads((tmp_path / "state" / "runtime.json").read_text())

        async def scenario() -> None:
            device = DeviceClient(DeviceOptions(host="127.0.0.1", port=runtime["port"],
                                                pin=runtime["pin"], topic="com.example.app"),
                                  events.append)
            task = asyncio.create_task(device.run())
            while not any(e["event"] == "welcome" for e in events):
                await asyncio.sleep(0.05)
            token = next(e["token"] for e in events if e["event"] == "welcome")
            auth = "bearer " + jwt.encode({"iss": "TEAM000001", "iat": int(time.time())}, key,
                                          algorithm="ES256", headers={"kid": "KEY0000001"})
            url = f"https://localhost:{runtime['api_port']}/3/device/{token}"
            ctx = __import__("ssl").create_default_context(
                cafile=str(tmp_path / "state" / "gateway.crt"))
            async with httpx.AsyncClient(http2=True, verify=ctx) as h:
                before = await h.post(url, headers={"authorization": auth}, content=b'{"a":1}')
                assert before.json()["reason"] == "InvalidProviderToken"  # unknown key
                data["api"]["providers"] = [{"team_id": "TEAM000001", "key_id": "KEY0000001",
                                             "key_file": str(pub),
                                             "topics": ["com.example.app"]}]
                data["log"] = {"level": "debug"}
                cfg.write_text(yaml.safe_dump(data))
                sent = time.monotonic()
                proc.send_signal(signal.SIGHUP)
                notify_socket.wait_for("RELOADING=1", after=sent)
                notify_socket.wait_for("READY=1", after=sent)
                after = await h.post(url, headers={"authorization": auth}, content=b'{"a":1}')
                assert after.status_code == 200
                # a bad file: refused, the running config stays
                cfg.write_text("api: {port: [not a port]\n")
                sent = time.monotonic()
                proc.send_signal(signal.SIGHUP)
                _, ready = notify_socket.wait_for("READY=1", after=sent)
                assert "reload FAILED" in ready
                still = await h.post(url, headers={"authorization": auth}, content=b'{"a":2}')
                assert still.status_code == 200
            while sum(e["event"] == "push" for e in events) < 2:
                await asyncio.sleep(0.05)
            device.stop()
            await task

        asyncio.run(asyncio.wait_for(scenario(), 30))
        assert [e for e in events if e["event"] in ("disconnected", "reconnecting")
                and e.get("reason") != "stopped"][:1] in ([], [{"event": "disconnected",
                                                              "reason": "client", "code": None,
                                                              "message": None}])
        assert sum(e["event"] == "welcome" for e in events) == 1  # never dropped
    finally:
        assert stop(proc) == 0
    assert "reload refused, still running the previous configuration" in \
        proc.stdout.read().decode()


def test_sigterm_drains_devices_and_closes_the_store(tmp_path, notify_socket):
    proc, _, _ = start_gateway(tmp_path, notify_socket)
    notify_socket.wait_for("READY=1")
    runtime = json.loads((tmp_path / "state" / "runtime.json").read_text())
    events: dict[str, list[dict]] = {"quic": [], "tls": []}

    async def scenario() -> float:
        clients = []
        for transport, log in events.items():
            c = DeviceClient(DeviceOptions(host="127.0.0.1", port=runtime["port"],
                                           pin=runtime["pin"], transport=transport,
                                           reconnect=False), log.append)
            clients.append(asyncio.create_task(c.run()))
        while not all(any(e["event"] == "welcome" for e in log) for log in events.values()):
            await asyncio.sleep(0.05)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        reasons = await asyncio.wait_for(asyncio.gather(*clients), 10)
        assert reasons == ["shutdown", "shutdown"]
        return started

    started = asyncio.run(scenario())
    assert proc.wait(15) == 0
    assert time.monotonic() - started < 10
    notify_socket.wait_for("STOPPING=1", timeout=1)
    wal = tmp_path / "state" / "lpgw.sqlite3-wal"
    assert not wal.exists() or wal.stat().st_size == 0  # checkpointed: a clean close


# --- the self-test -----------------------------------------------------------------------


def test_selftest_passes_on_a_healthy_gateway_in_under_10_s(tmp_path, notify_socket):
    proc, cfg, _ = start_gateway(tmp_path, notify_socket)
    try:
        notify_socket.wait_for("READY=1")
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "gateway.cli", "selftest", "-c",
                                 str(cfg), "--json"], capture_output=True, text=True,
                                timeout=30, cwd=ROOT)
        elapsed = time.monotonic() - started
        report = json.loads(result.stdout)
        assert result.returncode == 0 and report["ok"], json.dumps(report, indent=1)
        names = {c["name"]: c["ok"] for c in report["checks"]}
        for name in ("config", "certificate", "clock", "store", "disk", "gateway",
                     "device over quic", "device over tls", "sip call", "sip udp", "sip tcp",
                     "provider api"):
            assert names.get(name) is True, name
        assert names["bonjour"] is None  # discovery is off in this test's config
        assert elapsed < 10
        table = subprocess.run([sys.executable, "-m", "gateway.cli", "selftest", "-c",
                                str(cfg)], capture_output=True, text=True, timeout=30,
                               cwd=ROOT)
        assert "all checks passed" in table.stdout and "ok    sip call" in table.stdout
    finally:
        stop(proc)


def test_selftest_signs_its_own_assertion_where_one_is_required(tmp_path, notify_socket):
    secret = tmp_path / "jwt.secret"
    secret.write_text("t" * 40)
    proc, cfg, _ = start_gateway(tmp_path, notify_socket, {"assertions": {
        "required": True, "hs256_secret_file": str(secret)}})
    try:
        notify_socket.wait_for("READY=1")
        result = subprocess.run([sys.executable, "-m", "gateway.cli", "selftest", "-c",
                                 str(cfg), "--json"], capture_output=True, text=True,
                                timeout=30, cwd=ROOT)
        report = json.loads(result.stdout)
        checks = {c["name"]: c["ok"] for c in report["checks"]}
        assert checks["device over quic"] and checks["device over tls"], report
        assert result.returncode == 0
    finally:
        stop(proc)


def test_selftest_names_a_stopped_gateway(tmp_path):
    cfg = tmp_path / "lpgw.yaml"
    cfg.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state")}))
    result = subprocess.run([sys.executable, "-m", "gateway.cli", "selftest", "-c", str(cfg)],
                            capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert result.returncode == 1
    assert "FAIL  gateway" in result.stdout and "systemctl status lpgw" in result.stdout


async def test_selftest_names_a_stopped_listener(tmp_path):
    cfg = make_config(tmp_path / "state", sip={"enabled": True, "host": "127.0.0.1",
                                               "port": free_port("127.0.0.1")})
    gw = await Gateway.start(cfg)
    try:
        gw._tcp.close()  # the TLS listener dies; everything else runs
        await gw._tcp.wait_closed()
        checks = {c.name: c for c in await selftest.online_checks(cfg, timeout=3)}
        assert checks["device over quic"].ok is True
        assert checks["device over tls"].ok is False
        assert checks["device over tls"].fix
        assert checks["sip udp"].ok is True
    finally:
        await gw.stop(drain=0.2)


def test_selftest_expired_certificate_and_wrong_clock(tmp_path):
    state = tmp_path / "state"
    cfg = tmp_path / "lpgw.yaml"
    cfg.write_text(yaml.safe_dump({"state_dir": str(state)}))
    now = datetime.datetime.now(datetime.UTC)
    certs.ensure_self_signed(state / "gateway.crt", state / "gateway.key", "test")
    key = serialization.load_pem_private_key((state / "gateway.key").read_bytes(), None)
    certs.write_self_signed(state / "gateway.crt", state / "gateway.key", key, "test",
                            now=now - datetime.timedelta(days=400), days=365)
    checks = {c.name: c for c in selftest.offline_checks(str(cfg))[0]}
    assert checks["certificate"].ok is False
    assert "SAME key" in checks["certificate"].fix
    # a Pi without an RTC that booted into 1970
    certs.write_self_signed(state / "gateway.crt", state / "gateway.key", key, "test", now=now)
    checks = {c.name: c for c in selftest.offline_checks(
        str(cfg), now=datetime.datetime(1970, 1, 1, 0, 1, tzinfo=datetime.UTC))[0]}
    assert checks["clock"].ok is False and "no RTC" in checks["clock"].fix
    assert checks["certificate"].ok is True  # the clock is to blame, and only the clock
    checks = {c.name: c for c in selftest.offline_checks(str(cfg))[0]}
    assert checks["clock"].ok and checks["certificate"].ok


def test_selftest_offline_needs_no_gateway(tmp_path):
    state = tmp_path / "state"
    cfg = tmp_path / "lpgw.yaml"
    cfg.write_text(yaml.safe_dump({"state_dir": str(state)}))
    certs.ensure_self_signed(state / "gateway.crt", state / "gateway.key", "test")
    result = subprocess.run([sys.executable, "-m", "gateway.cli", "selftest", "--offline",
                             "--json", "-c", str(cfg)], capture_output=True, text=True,
                            timeout=30, cwd=ROOT)
    report = json.loads(result.stdout)
    assert result.returncode == 0 and report["ok"]
    assert [c["name"] for c in report["checks"]] == ["config", "certificate", "clock", "store",
                                                     "disk"]


# --- the unit files ------------------------------------------------------------------------

SYSTEMD_ANALYZE = __import__("shutil").which("systemd-analyze")


def installed_unit(tmp_path: Path) -> Path:
    """The unit as the role installs it, pointing at this checkout's lpgw."""
    text = (ROOT / "systemd" / "lpgw.service").read_text()
    unit = tmp_path / "lpgw.service"
    unit.write_text(text.replace("/opt/lpgw/venv/bin/lpgw",
                                 str(Path(sys.executable).parent / "lpgw")))
    return unit


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="needs systemd-analyze (Debian systemd)")
def test_unit_verifies_and_scores_well(tmp_path):
    unit = installed_unit(tmp_path)
    verify = subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True,
                            text=True, timeout=60)
    assert verify.returncode == 0, verify.stderr
    security = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=true", str(unit)],
                              capture_output=True, text=True, timeout=60)
    line = next(x for x in security.stdout.splitlines() if "Overall exposure level" in x)
    score = float(line.split(":")[1].split()[0])
    assert score <= 2.0, line  # "OK"; the note quotes the figure
    text = unit.read_text()
    for needed in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "User=lpgw",
                   "StateDirectory=lpgw", "ProtectSystem=strict", "NoNewPrivileges=yes",
                   "CapabilityBoundingSet=\n", "AF_NETLINK", "RestartPreventExitStatus=2 3"):
        assert needed in text, needed
    dropin = (ROOT / "systemd" / "lpgw-low-ports.conf").read_text()
    assert "CAP_NET_BIND_SERVICE" in dropin
