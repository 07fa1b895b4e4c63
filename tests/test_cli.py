"""The commands as an operator meets them: `lpgw run`, `lpgw device`, `lpgw send`, `lpgw status`."""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.service import free_port
from tests.conftest import ROOT, GatewayProcess


@pytest.fixture
def running(tmp_path):
    gp = GatewayProcess(tmp_path / "state", free_port("127.0.0.1"))
    gp.start()
    yield gp
    gp.kill(15)


def lpgw(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True,
                          text=True, timeout=30, cwd=ROOT, input=input)


class DeviceProcess:
    def __init__(self, gp: GatewayProcess, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "device", "--port", str(gp.port),
             "--pin", gp.pin, *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def next(self, kind: str, timeout: float = 10) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"device ended: {self.proc.stderr.read()}")
            event = json.loads(line)
            if event["event"] == kind:
                return event
        raise AssertionError(f"no {kind} event")

    def command(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def stop(self) -> int:
        self.command("quit")
        return self.proc.wait(10)


@pytest.mark.parametrize("transport", ["quic", "tls"])
def test_device_send_and_status(running, tmp_path, transport):
    state = tmp_path / "phone.json"
    device = DeviceProcess(running, "--transport", transport, "--state", str(state))
    token = device.next("welcome")["token"]
    assert json.loads(state.read_text())["install_id"]  # kept for the next start

    sock = str(running.state / "control.sock")
    sent = lpgw("send", token, "--type", "voip", "--priority", "10", "--collapse-id", "c1",
                "--payload", '{"call": {"id": "call-1", "from": "sip:desk@ward"}}',
                "--socket", sock)
    assert sent.returncode == 0, sent.stderr
    reply = json.loads(sent.stdout)
    push = device.next("push")
    assert push["id"] == reply["push_id"] and push["push_type"] == "voip"
    assert push["payload"]["call"]["id"] == "call-1" and push["collapse_id"] == "c1"

    device.command("decline call-1")
    deadline = time.monotonic() + 5
    while True:  # the decline travels device -> gateway
        status = lpgw("status", "--socket", sock)
        assert status.returncode == 0
        info = json.loads(status.stdout)
        if info["call_actions"]["decline"] == 1 or time.monotonic() > deadline:
            break
    assert info["call_actions"] == {"ringing": 0, "decline": 1, "busy": 0}
    assert info["devices"]["connected"][transport] == 1
    assert info["pin"] == running.pin and info["listen"]["port"] == running.port
    assert device.stop() == 0

    # the same install, a new process: the same token
    again = DeviceProcess(running, "--transport", transport, "--state", str(state))
    assert again.next("welcome")["token"] == token
    again.stop()


def test_send_refusals_are_clear(running):
    sock = str(running.state / "control.sock")
    bad = lpgw("send", "00" * 32, "--payload", '{"a": 1}', "--socket", sock)
    assert bad.returncode == 1 and json.loads(bad.stdout)["reason"] == "BadDeviceToken"
    notjson = lpgw("send", "00" * 32, "--payload", "{nope", "--socket", sock)
    assert notjson.returncode == 2 and "--payload is not JSON" in notjson.stderr
    down = lpgw("send", "00" * 32, "--payload", "{}", "--socket", str(running.state / "x.sock"))
    assert down.returncode == 1 and "cannot reach the gateway" in down.stderr


def test_device_with_the_wrong_pin_exits_4(running):
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "device", "--port", str(running.port), "--pin",
         "sha256/" + "B" * 43 + "=", "--transport", "tls"],
        capture_output=True, text=True, timeout=30, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert result.returncode == 4
    assert json.loads(result.stdout.splitlines()[-1])["reason"] == "pin_mismatch"


def test_pin_without_a_certificate_says_so(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"state_dir: {tmp_path / 'empty'}\n")
    result = lpgw("pin", "-c", str(cfg))
    assert result.returncode == 1 and "lpgw run` makes one" in result.stderr


def test_run_takes_the_hard_open_file_limit(tmp_path):
    """Started from a shell with a soft limit of 1,024 (or less), the gateway would refuse
    the thousandth TLS phone; it raises its own soft limit to the hard one."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    soft = min(1024, hard // 2)  # below whatever hard limit the machine has
    gp = GatewayProcess(tmp_path / "state", free_port("127.0.0.1"))
    gp.start(preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)))
    try:
        limits = Path(f"/proc/{gp.pid}/limits").read_text()
        raised = next(line.split()[3] for line in limits.splitlines()
                    if line.startswith("Max open files"))
        assert int(raised) == hard
        said = gp.proc.stdout.readline().decode() + gp.proc.stdout.readline().decode()
        # the API's connections (api.max_connections, 256) and 64 for everything else are
        # kept from it: the rest is the devices'
        assert (f"open-file limit {hard}: up to 256 for API connections (api.max_connections),"
                f" room for about {hard - 64 - 256} TLS devices") in said
        assert said.strip().endswith("event loop uvloop")
        gc_line = gp.proc.stdout.readline().decode()  # fewer full GC passes (service.py)
        frozen = re.fullmatch(r"lpgw: garbage collector thresholds 10000/10/10, (\d+) "
                              r"start-up objects frozen\n", gc_line)
        assert frozen and int(frozen[1]) > 10_000, gc_line
    finally:
        gp.kill(15)


def test_run_on_asyncios_own_loop_when_asked(tmp_path, monkeypatch):
    """LPGW_EVENT_LOOP=asyncio: the escape hatch if libuv ever misbehaves on a platform."""
    monkeypatch.setenv("LPGW_EVENT_LOOP", "asyncio")
    gp = GatewayProcess(tmp_path / "state", free_port("127.0.0.1"))
    gp.start()
    try:
        said = gp.proc.stdout.readline().decode() + gp.proc.stdout.readline().decode()
        assert said.strip().endswith("event loop asyncio")
        device = DeviceProcess(gp, "--transport", "tls")
        assert device.next("welcome")["token"]
        assert device.stop() == 0
    finally:
        gp.kill(15)


def test_an_unknown_event_loop_stops_the_start_with_exit_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "run"], capture_output=True,
                          text=True, timeout=30, cwd=ROOT,
                          env={**os.environ, "LPGW_EVENT_LOOP": "libuv"})
    assert done.returncode == 2
    assert "LPGW_EVENT_LOOP: 'libuv' is neither uvloop nor asyncio" in done.stderr


def test_a_device_waiting_to_reconnect_quits_at_once(tmp_path):
    """`quit` (or Ctrl-D) while the device waits between attempts, or is connecting to a
    gateway that does not answer, ends it at once: it used to finish the attempt first
    (up to its connect timeout)."""
    from gateway.service import free_port

    port = free_port("127.0.0.1")  # nobody listens: every QUIC attempt times out
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "device", "--host", "127.0.0.1", "--port",
         str(port), "--pin", "sha256/" + "A" * 43 + "=", "--transport", "quic"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        time.sleep(1.5)  # importing, then the first attempt under way
        began = time.monotonic()
        proc.stdin.write(b"quit\n")
        proc.stdin.flush()
        assert proc.wait(5) == 0
        assert time.monotonic() - began < 1.0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
