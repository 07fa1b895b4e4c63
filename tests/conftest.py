"""Shared fixtures: a real gateway on 127.0.0.1 and reference devices talking to it."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from gateway import config as config_mod
from gateway.client import DeviceClient, DeviceOptions
from gateway.service import Gateway
from gateway.transport import control

ROOT = Path(__file__).resolve().parent.parent


def make_config(state: Path, **overrides: Any) -> config_mod.Config:
    data: dict[str, Any] = {"state_dir": str(state), "listen": {"host": "127.0.0.1", "port": 0},
                            "api": {"host": "127.0.0.1", "port": 0},
                            "sip": {"enabled": False},
                            # no mDNS on this machine's real interfaces: tests that advertise
                            # do it inside network namespaces of their own
                            "discovery": {"enabled": False},
                            "store": {"synchronous": "NORMAL"}}
    for key, value in overrides.items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    return config_mod.from_dict(data)


@pytest.fixture
def lab():
    """Network namespaces for the test (tests/netns.py), all deleted at its end; skipped
    with the reason where they cannot be made."""
    from tests.netns import Lab, leftover_namespaces, why_not_available

    reason = why_not_available()
    if reason:
        pytest.skip(reason)
    made = Lab()
    try:
        yield made
    finally:
        made.close()
        assert leftover_namespaces(made.tag) == []


@pytest.fixture(scope="module")
def nats_cluster(tmp_path_factory):
    """A 3-node NATS JetStream cluster on loopback for a module's site tests (stopped by
    pid at its end): bench/lib/natscluster.py."""
    from bench.lib.natscluster import NatsCluster

    cluster = NatsCluster(tmp_path_factory.mktemp("nats"))
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture
async def gateway_factory(tmp_path):
    """Start in-process gateways; all are stopped at the end of the test."""
    started: list[Gateway] = []

    async def start(state: Path | None = None, **overrides: Any) -> Gateway:
        gw = await Gateway.start(make_config(state or tmp_path / "state", **overrides))
        started.append(gw)
        return gw

    yield start
    for gw in started:
        await gw.stop(drain=0.2)


@pytest.fixture
async def gateway(gateway_factory):
    return await gateway_factory()


class Device:
    """A DeviceClient running in the background, its events on a queue."""

    def __init__(self, gw: Gateway, transport: str, **options: Any) -> None:
        self.events: asyncio.Queue[dict] = asyncio.Queue()
        self.log: list[dict] = []
        opts = DeviceOptions(host="127.0.0.1", port=gw.listening.port, pin=gw.pin,
                             transport=transport, backoff_min=0.05, backoff_max=0.2, **options)
        self.client = DeviceClient(opts, self._emit)
        self.task = asyncio.create_task(self.client.run())

    def _emit(self, event: dict) -> None:
        self.log.append(event)
        self.events.put_nowait(event)

    async def next(self, kind: str, timeout: float = 5.0) -> dict:
        """The next event of this kind; fails the test when it does not come."""
        async with asyncio.timeout(timeout):
            while True:
                event = await self.events.get()
                if event["event"] == kind:
                    return event

    async def welcome(self) -> str:
        return (await self.next("welcome"))["token"]

    async def stop(self) -> None:
        self.client.stop()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(self.task, 5)


@pytest.fixture
async def devices():
    made: list[Device] = []

    def make(gw: Gateway, transport: str = "quic", **options: Any) -> Device:
        d = Device(gw, transport, **options)
        made.append(d)
        return d

    yield make
    for d in made:
        await d.stop()


async def send(gw: Gateway, token: str, payload: dict | None = None, **fields: Any) -> dict:
    """Push through the control socket: the path `lpgw send` takes."""
    message = {"op": "send", "token": token, "payload": payload or {"aps": {"alert": "hi"}}}
    message.update(fields)
    return await control.request(gw.config.control_path, message)


async def eventually(predicate, timeout: float = 5.0, step: float = 0.02) -> Any:
    """Wait until `predicate()` (a plain or an async function) is truthy; that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(step)


def new_install() -> str:
    return str(uuid.uuid4())


# --- a gateway as its own process (for SIGKILL, memory and CLI tests) ----------------


class GatewayProcess:
    def __init__(self, state: Path, port: int, extra: dict | None = None) -> None:
        self.state = state
        self.port = port
        self.config_path = state.parent / f"{state.name}.yaml"
        data = {"state_dir": str(state), "listen": {"host": "127.0.0.1", "port": port},
                "api": {"host": "127.0.0.1", "port": 0}, "sip": {"enabled": False},
                "discovery": {"enabled": False}}
        for key, value in (extra or {}).items():
            data[key] = value
        self.config_path.write_text(yaml.safe_dump(data))
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20, preexec_fn=None, env: dict | None = None) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "run", "-c", str(self.config_path)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
            preexec_fn=preexec_fn)
        deadline = time.monotonic() + timeout
        lines = self.lines
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline().decode()
            lines.append(line)
            if "pin sha256/" in line:
                self.pin = line.split("pin ")[1].strip()
                self.runtime = json.loads((self.state / "runtime.json").read_text())
                return
            if not line and self.proc.poll() is not None:
                break
        raise RuntimeError("gateway did not start:\n" + "".join(lines))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)

    def handle(self) -> SimpleNamespace:
        """What `send`, `devices` and `control.request` need of a gateway, for this one."""
        return SimpleNamespace(config=SimpleNamespace(control_path=Path(self.runtime["control"])),
                               listening=SimpleNamespace(port=self.runtime["port"]),
                               pin=self.pin)

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")
