"""The wall clock steps under a running gateway (a Pi has no RTC; NTP steps it days forward
when it first syncs; an operator may set it back). libfaketime moves `lpgw run`'s wall clock
while its monotonic clock runs on: the clock the gateway sees, the way it would see it.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
from pathlib import Path

import httpx
import pytest

from gateway.core.clock import ClockWatch
from gateway.transport import control
from tests.conftest import GatewayProcess, eventually, new_install, send
from tests.test_api import TOPIC, Keys
from tests.test_containment_process import invite
from tests.test_sip import free_port

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
needs_faketime = pytest.mark.skipif(not LIBFAKETIME.exists(),
                                    reason="needs Debian package faketime (libfaketime)")
DAY = 86400


def test_clock_watch_sees_steps_not_drift():
    watch = ClockWatch(wall=1_000_000.0, mono=50.0)
    assert watch.observe(1_000_010.0005, 60.0) is None  # slewing: half a millisecond
    step = watch.observe(1_000_011.0 + 40 * DAY, 61.0)
    assert step is not None and round(step.delta) == 40 * DAY
    assert watch.observe(1_000_012.0 + 40 * DAY, 62.0) is None  # reported once
    back = watch.observe(1_000_013.0 + 40 * DAY - 3600, 63.0)
    assert back is not None and round(back.delta) == -3600
    assert watch.steps == 2


class FakedGateway:
    """`lpgw run` under libfaketime: `step(seconds)` moves its wall clock from now on."""

    def __init__(self, tmp_path: Path, extra: dict) -> None:
        self.offset = 0.0
        self.file = tmp_path / "faketime"
        self.file.write_text("+0\n")
        self.proc = GatewayProcess(tmp_path / "state", 0, extra)

    def start(self) -> None:
        self.proc.start(env={"LD_PRELOAD": str(LIBFAKETIME),
                             "FAKETIME_TIMESTAMP_FILE": str(self.file),
                             "FAKETIME_NO_CACHE": "1",
                             "FAKETIME_DONT_FAKE_MONOTONIC": "1"})

    def step(self, seconds: float) -> None:
        self.offset += seconds
        self.file.write_text(f"{self.offset:+.0f}\n")

    def wall(self) -> float:
        """The gateway's wall clock, as the test process reckons it."""
        return time.time() + self.offset


async def status(gw) -> dict:
    return (await control.request(gw.config.control_path, {"op": "status"}))["status"]


@needs_faketime
async def test_a_step_forward_forgets_no_device_and_drops_no_push(tmp_path, devices):
    """+40 days, as NTP's first sync on a Pi that booted with an old date. Before: a device
    seen seconds ago got 410 Unregistered (app servers then delete its token) and the pushes
    it had waiting were dropped as expired by the next sweep."""
    keys = Keys(tmp_path)
    fake = FakedGateway(tmp_path, {
        "listen": {"host": "127.0.0.1", "port": 0}, "store": {"synchronous": "NORMAL"},
        "delivery": {"expire_interval": 0.2},
        "api": {"host": "127.0.0.1", "port": 0, "providers": keys.providers()}})
    fake.start()
    try:
        gw = fake.proc.handle()
        steady = devices(gw, "tls")  # stays connected through both steps
        steady_token = await steady.welcome()
        install = new_install()
        away = devices(gw, "quic", install_id=install, reconnect=False)
        token = await away.welcome()
        await away.stop()
        waiting = []
        for n in range(3):
            reply = await send(gw, token, {"n": n}, expiration=int(fake.wall()) + 3600)
            assert reply["ok"] and reply["stored"], reply
            waiting.append(reply["push_id"])

        fake.step(40 * DAY)
        await asyncio.sleep(1.0)  # several expiry sweeps run on the stepped clock
        reply = await send(gw, token, {"n": 3})
        assert reply["ok"], reply  # before: Unregistered
        back = devices(gw, "quic", install_id=install)
        assert await back.welcome() == token
        got = [await back.next("push") for _ in range(4)]
        assert [p["payload"]["n"] for p in got] == [0, 1, 2, 3]
        assert [p["id"] for p in got[:3]] == waiting

        # -1 hour: the API's rate limit and the steady device's heartbeats do not notice
        fake.step(-3600)
        await asyncio.sleep(0.5)
        ctx = ssl.create_default_context(cafile=str(fake.proc.state / "gateway.crt"))
        runtime = fake.proc.runtime
        async with httpx.AsyncClient(http2=True, verify=ctx,
                                     base_url=f"https://localhost:{runtime['api_port']}") as h:
            for n in range(5):
                r = await h.post(f"/3/device/{steady_token}", content=json.dumps({"n": n}),
                                 headers={"authorization": "bearer " + keys.token(
                                     iat=fake.wall()), "apns-topic": TOPIC})
                assert r.status_code == 200, r.text  # before: 429 for an hour
        for n in range(5):
            assert (await steady.next("push"))["payload"] == {"n": n}
        assert [e for e in steady.log if e["event"] == "disconnected"] == []
        s = await status(gw)
        assert s["clock"]["steps"] == 2, s.get("clock")
    finally:
        fake.proc.kill()


def _options(me: int) -> bytes:
    return (f"OPTIONS sip:lpgw@127.0.0.1 SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{me};branch=z9hG4bK-o{time.monotonic_ns()};rport\r\n"
            f"From: <sip:1000@127.0.0.1>;tag=o\r\nTo: <sip:lpgw@127.0.0.1>\r\n"
            f"Call-ID: o{time.monotonic_ns()}\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\n"
            f"Content-Length: 0\r\n\r\n").encode()


async def _statuses(sock: socket.socket, seconds: float) -> list[tuple[int, str]]:
    loop = asyncio.get_running_loop()
    out: list[tuple[int, str]] = []
    deadline = loop.time() + seconds
    while (left := deadline - loop.time()) > 0:
        try:
            data = await asyncio.wait_for(loop.sock_recv(sock, 65535), left)
        except TimeoutError:
            break
        text = data.decode()
        out.append((int(text.split(" ")[1]), text.split("CSeq: ")[1].split("\r\n")[0]))
    return out


@needs_faketime
@pytest.mark.parametrize("step", [40 * DAY, -3600], ids=["forward-40d", "back-1h"])
async def test_a_ringing_call_keeps_its_ring_window_across_a_step(tmp_path, devices, step):
    """Before: +40 days ended every ringing call with 480 at the next SIP message; a step
    back left SIP's timers an hour late (the ring window, retransmissions, registrations)."""
    sip_port = free_port("127.0.0.1")
    fake = FakedGateway(tmp_path, {
        "listen": {"host": "127.0.0.1", "port": 0}, "store": {"synchronous": "NORMAL"},
        "sip": {"enabled": True, "host": "127.0.0.1", "port": sip_port, "ring_window": 4,
                "reach_timeout": 3}})
    fake.start()
    pbx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    pbx.bind(("127.0.0.1", 0))
    pbx.setblocking(False)
    me = pbx.getsockname()[1]
    try:
        gw = fake.proc.handle()
        nurse = devices(gw, "tls")
        token = await nurse.welcome()
        assert (await control.request(gw.config.control_path,
                                      {"op": "bind", "token": token, "user": "nurse"}))["ok"]
        pbx.sendto(invite(sip_port, me, "nurse", ";rport"), ("127.0.0.1", sip_port))
        first = await _statuses(pbx, 1.0)
        assert (180, "1 INVITE") in first, first

        fake.step(step)
        await asyncio.sleep(0.3)
        pbx.sendto(_options(me), ("127.0.0.1", sip_port))  # SIP reads its clock again
        during = await _statuses(pbx, 1.0)
        assert [s for s in during if s[1] == "1 INVITE"] == [], during  # still ringing

        # the ring window (4 s) ends on time: 480 within a few seconds, not an hour
        later = await _statuses(pbx, 5.0)
        assert (480, "1 INVITE") in later, later
        await eventually(lambda: any("call_ended" in e["payload"] for e in nurse.log
                                     if e["event"] == "push"))
    finally:
        pbx.close()
        fake.proc.kill()
