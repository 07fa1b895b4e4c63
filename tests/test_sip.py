"""The SIP bridge with real peers: SIPp as the PBX's caller, raw sockets for the corners."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import socket
import time
from pathlib import Path

import jwt
import pytest

from gateway.service import free_port
from gateway.transport.sip import start_sip
from tests.conftest import ROOT

SIPP = shutil.which("sipp")
SCENARIOS = ROOT / "tests" / "sip"
SECRET = "s" * 40
needs_sipp = pytest.mark.skipif(SIPP is None, reason="needs Debian package sip-tester (sipp)")


def assertion(user: str) -> str:
    return jwt.encode({"sub": user, "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")


@pytest.fixture
async def pbx_side(gateway_factory, tmp_path):
    """A gateway whose devices bind to users by assertion, and its SIP bridge on UDP+TCP."""
    secret = tmp_path / "jwt.secret"
    secret.write_text(SECRET)
    gw = await gateway_factory(assertions={"hs256_secret_file": str(secret)})
    sip = await start_sip(gw.config.sip.__class__(
        host="127.0.0.1", port=free_port("127.0.0.1"), ring_window=8.0, reach_timeout=3.0),
        gw.delivery, gw.store, gw.metrics, "lpgw-test", gw.pump)
    gw.sip = sip
    yield gw
    await sip.stop()


async def sipp(gw, scenario: Path | str, user: str, transport: str = "u1",
               extra: tuple[str, ...] = (), timeout: float = 30,
               final: int | None = None, tmp: Path | None = None) -> tuple[int, str]:
    path = SCENARIOS / scenario if isinstance(scenario, str) else scenario
    if final is not None:
        text = path.read_text().replace("FINAL_STATUS", str(final))
        path = tmp / f"final_{final}.xml"
        path.write_text(text)
    proc = await asyncio.create_subprocess_exec(
        SIPP, f"127.0.0.1:{gw.sip.port}", "-sf", str(path), "-s", user, "-m", "1",
        "-t", transport, "-i", "127.0.0.1", "-p", str(free_port("127.0.0.1")),
        "-timeout", f"{int(timeout)}s", "-timeout_error", "-nostdin", "-nd",
        *extra, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        cwd=str(tmp or SCENARIOS))
    out, _ = await asyncio.wait_for(proc.communicate(), timeout + 10)
    return proc.returncode, out.decode(errors="replace")


def pushes(device) -> list[dict]:
    return [e for e in device.log if e["event"] == "push"]


@needs_sipp
@pytest.mark.parametrize("transport", ["u1", "t1"])
async def test_invite_rings_then_cancel_ends_it(pbx_side, devices, transport, tmp_path):
    device = devices(pbx_side, "quic", assertion=assertion("nurse"))
    await device.welcome()
    code, out = await sipp(pbx_side, "uac_cancel.xml", "nurse", transport, tmp=tmp_path)
    assert code == 0, out
    call = (await device.next("push"))["payload"]["call"]
    assert call["from"].startswith("sip:1012@") and call["display_name"] == "Desk 12"
    assert call["user"] == "nurse" and call["to"].startswith("sip:nurse@")
    ended = (await device.next("push"))["payload"]["call_ended"]
    assert ended == {"id": call["id"], "reason": "Call completed elsewhere", "status": 487}
    assert pbx_side.metrics.value("lpgw_sip_invite_to_push_seconds_count") == 1
    # one 180 for the call, timed from the INVITE read (the device acked within the call)
    assert pbx_side.metrics.value("lpgw_sip_invite_to_ringing_seconds_count") == 1
    assert 0 < pbx_side.sip.ringing_latencies[0] < 5


@needs_sipp
async def test_device_decline_gives_603(pbx_side, devices, tmp_path):
    device = devices(pbx_side, "tls", assertion=assertion("nurse"), auto_call="decline")
    await device.welcome()
    code, out = await sipp(pbx_side, "uac_final.xml", "nurse", final=603, tmp=tmp_path)
    assert code == 0, out
    call = (await device.next("push"))["payload"]["call"]
    ended = (await device.next("push"))["payload"]["call_ended"]
    assert ended["id"] == call["id"] and ended["status"] == 603


@needs_sipp
async def test_device_busy_gives_486(pbx_side, devices, tmp_path):
    device = devices(pbx_side, "quic", assertion=assertion("nurse"), auto_call="busy")
    await device.welcome()
    code, out = await sipp(pbx_side, "uac_final.xml", "nurse", final=486, tmp=tmp_path)
    assert code == 0, out


@needs_sipp
async def test_nobody_online_gives_480(pbx_side, devices, tmp_path):
    code, out = await sipp(pbx_side, "uac_final.xml", "nobody", final=480, tmp=tmp_path)
    assert code == 0, out


@needs_sipp
async def test_bound_but_offline_device_times_out_with_480(pbx_side, devices, tmp_path):
    device = devices(pbx_side, "quic", assertion=assertion("nurse"), reconnect=False)
    await device.welcome()
    await device.stop()
    started = time.monotonic()
    code, out = await sipp(pbx_side, "uac_final.xml", "nurse", final=480, tmp=tmp_path)
    assert code == 0, out
    assert 2.5 < time.monotonic() - started < 8  # the reach timeout (3 s), not the ring window


# --- raw UDP: the corners of the transaction layer ------------------------------------


class RawUdp:
    """A bare UDP peer: writes exactly what the test says, reads what comes back."""

    def __init__(self, gw) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.target = ("127.0.0.1", gw.sip.port)

    def request(self, method: str, user: str = "nurse", branch: str = "z9hG4bK-1",
                cseq: int = 1, extra: str = "", body: str = "", to_tag: str = "",
                max_forwards: int = 70) -> bytes:
        to = f"<sip:{user}@127.0.0.1>" + (f";tag={to_tag}" if to_tag else "")
        return (f"{method} sip:{user}@127.0.0.1 SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP 127.0.0.1:{self.port};branch={branch};rport\r\n"
                f"From: \"Ward PBX\" <sip:1000@127.0.0.1>;tag=caller\r\n"
                f"To: {to}\r\nCall-ID: call-{branch}\r\n"
                f"CSeq: {cseq} {'INVITE' if method == 'ACK' else method}\r\n"
                f"Max-Forwards: {max_forwards}\r\n{extra}"
                f"Content-Length: {len(body.encode())}\r\n\r\n{body}").encode()

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, self.target)

    async def responses(self, seconds: float) -> list[tuple[float, int, str]]:
        """(arrival, status, whole text) of everything that arrives within `seconds`."""
        loop = asyncio.get_running_loop()
        out, started = [], loop.time()
        while (left := started + seconds - loop.time()) > 0:
            try:
                data = await asyncio.wait_for(loop.sock_recv(self.sock, 65535), left)
            except TimeoutError:
                break
            text = data.decode()
            out.append((loop.time() - started, int(text.split(" ")[1]), text))
        return out

    async def status(self, seconds: float = 2.0) -> int:
        got = await self.responses(seconds)
        finals = [s for _, s, _ in got if s >= 200]
        return finals[0] if finals else 0


@pytest.fixture
def raw(pbx_side):
    peer = RawUdp(pbx_side)
    yield peer
    peer.sock.close()


async def test_final_response_is_retransmitted_until_ack(pbx_side, raw):
    raw.send(raw.request("INVITE", user="nobody", branch="z9hG4bK-rt"))
    got = await raw.responses(2.0)  # no ACK: 480 at 0, T1, 2*T1, 4*T1 ...
    finals = [t for t, s, _ in got if s == 480]
    assert [s for _, s, _ in got][:1] == [100]
    assert len(finals) >= 3
    gaps = [b - a for a, b in itertools.pairwise(finals)]
    assert 0.4 < gaps[0] < 0.7 and 0.9 < gaps[1] < 1.3  # timer G doubles from T1
    raw.send(raw.request("ACK", user="nobody", branch="z9hG4bK-rt"))
    assert [s for _, s, _ in await raw.responses(2.5)] == []  # the ACK stops them


async def test_retransmitted_invite_is_absorbed(pbx_side, devices, raw):
    device = devices(pbx_side, "quic", assertion=assertion("nurse"))
    await device.welcome()
    invite = raw.request("INVITE", branch="z9hG4bK-abs")
    raw.send(invite)
    first = await raw.responses(0.5)
    raw.send(invite)  # as if our 100 was lost
    again = await raw.responses(0.5)
    assert next(s for _, s, _ in first) == 100 and 180 in [s for _, s, _ in first]
    assert [s for _, s, _ in again] == [180]  # the last response, not a new call
    assert len(pushes(device)) == 1


async def test_options_other_methods_and_dialog_requests(pbx_side, raw):
    raw.send(raw.request("OPTIONS", branch="z9hG4bK-o"))
    got = await raw.responses(0.5)
    assert got[0][1] == 200 and "Allow: INVITE, ACK, CANCEL, OPTIONS, MESSAGE" in got[0][2]
    raw.send(raw.request("SUBSCRIBE", branch="z9hG4bK-s"))
    got = await raw.responses(0.5)
    assert got[0][1] == 405 and "Allow: INVITE" in got[0][2]
    raw.send(raw.request("BYE", branch="z9hG4bK-b", to_tag="x"))
    assert await raw.status() == 481
    raw.send(raw.request("INVITE", branch="z9hG4bK-re", to_tag="dialog"))  # a re-INVITE
    assert await raw.status() == 481
    raw.send(raw.request("INVITE", branch="z9hG4bK-rp",
                         extra="Replaces: a;to-tag=b;from-tag=c\r\n"))
    assert await raw.status() == 481
    raw.send(raw.request("INVITE", branch="z9hG4bK-mf", max_forwards=0))
    assert await raw.status() == 483
    raw.send(raw.request("INVITE", branch="z9hG4bK-rq", extra="Require: 100rel-nope\r\n"))
    assert await raw.status() == 420


async def test_message_reaches_connected_devices_or_gets_480(pbx_side, devices, raw):
    raw.send(raw.request("MESSAGE", branch="z9hG4bK-m0", body="anyone?",
                         extra="Content-Type: text/plain\r\n"))
    assert await raw.status() == 480
    device = devices(pbx_side, "tls", assertion=assertion("nurse"))
    await device.welcome()
    raw.send(raw.request("MESSAGE", branch="z9hG4bK-m1", body="Bed 12 needs you",
                         extra="Content-Type: text/plain;charset=UTF-8\r\n"))
    assert await raw.status() == 200
    push = await device.next("push")
    assert push["push_type"] == "alert"
    assert push["payload"]["aps"]["alert"] == {"title": "Ward PBX", "body": "Bed 12 needs you"}
    assert push["payload"]["message"]["from"] == "sip:1000@127.0.0.1"


async def test_device_that_reconnects_mid_ring_gets_the_call(pbx_side, devices, raw):
    first = devices(pbx_side, "quic", assertion=assertion("nurse"), reconnect=False)
    await first.welcome()
    install = first.client.o.install_id
    await first.stop()
    raw.send(raw.request("INVITE", branch="z9hG4bK-mid"))
    await asyncio.sleep(1.0)  # ringing with nobody there
    back = devices(pbx_side, "quic", assertion=assertion("nurse"), install_id=install)
    call = (await back.next("push"))["payload"]["call"]
    assert 180 in [s for _, s, _ in await raw.responses(1.0)]
    raw.send(raw.request("CANCEL", branch="z9hG4bK-mid",
                         extra='Reason: SIP;cause=487;text="ORIGINATOR_CANCEL"\r\n'))
    statuses = [s for _, s, _ in await raw.responses(1.0)]
    assert 200 in statuses and 487 in statuses
    ended = (await back.next("push"))["payload"]["call_ended"]
    assert ended["id"] == call["id"] and ended["reason"] == "ORIGINATOR_CANCEL"


async def test_call_cancelled_while_away_arrives_then_ends(pbx_side, devices, raw):
    """Flexisip's rule: the app can still report the call to CallKit, then end it."""
    first = devices(pbx_side, "tls", assertion=assertion("nurse"), reconnect=False)
    await first.welcome()
    install = first.client.o.install_id
    await first.stop()
    raw.send(raw.request("INVITE", branch="z9hG4bK-away"))
    await asyncio.sleep(0.3)
    raw.send(raw.request("CANCEL", branch="z9hG4bK-away"))
    statuses = [s for _, s, _ in await raw.responses(1.0)]
    assert 487 in statuses
    back = devices(pbx_side, "tls", assertion=assertion("nurse"), install_id=install)
    call = (await back.next("push"))["payload"]["call"]
    ended = (await back.next("push"))["payload"]["call_ended"]
    assert ended["id"] == call["id"] and ended["status"] == 487


async def test_a_draining_gateway_answers_new_invites_503(pbx_side, devices, raw):
    device = devices(pbx_side, "quic", assertion=assertion("nurse"))
    await device.welcome()
    pbx_side.sip.bridge.draining = True
    raw.send(raw.request("INVITE", branch="z9hG4bK-drain"))
    got = await raw.responses(0.5)
    assert [s for _, s, _ in got] == [100, 503] and "Retry-After: 30" in got[-1][2]
    assert pushes(device) == []


async def test_cancel_for_an_unknown_invite_is_481(pbx_side, raw):
    raw.send(raw.request("CANCEL", branch="z9hG4bK-ghost"))
    assert await raw.status() == 481


async def test_malformed_datagrams_are_counted_and_harmless(pbx_side, raw):
    for junk in (b"\x00\xff" * 40, b"INVITE\r\n\r\n", b"hello", b"SIP/2.0 200\r\n\r\n",
                 raw.request("INVITE").replace(b"CSeq: 1 INVITE", b"CSeq: one INVITE")):
        raw.send(junk)
    statuses = [s for _, s, _ in await raw.responses(0.5)]
    assert statuses == [400]  # only the one with a usable Via gets an answer
    assert pbx_side.metrics.value("lpgw_sip_errors_total", kind="parse") >= 3
    raw.send(raw.request("OPTIONS", branch="z9hG4bK-after"))
    assert await raw.status() == 200


# --- lpgw toward the PBX: REGISTER with digest, OPTIONS keepalive ----------------------


async def start_pbx(scenario: str, port: int) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        SIPP, "-sf", str(SCENARIOS / scenario), "-i", "127.0.0.1", "-p", str(port), "-t", "u1",
        "-m", "1", "-timeout", "20s", "-timeout_error", "-nostdin", "-nd",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        cwd=str(SCENARIOS))


async def sip_with_pbx(gateway_factory, tmp_path, pbx_port: int, **sip):
    gw = await gateway_factory()
    cfg = gw.config.sip.__class__(host="127.0.0.1", port=free_port("127.0.0.1"),
                                  pbx_host="127.0.0.1", pbx_port=pbx_port, **sip)
    gw.sip = await start_sip(cfg, gw.delivery, gw.store, gw.metrics, "lpgw-test", gw.pump)
    return gw


@contextlib.asynccontextmanager
async def registering(gateway_factory, tmp_path, password: str):
    """A SIPp registrar (digest, user 2001) and a gateway registering with it."""
    from gateway.config import SipRegistration

    secret = tmp_path / "2001.secret"
    secret.write_text(password + "\n")
    pbx_port = free_port("127.0.0.1")
    pbx = await start_pbx("registrar.xml", pbx_port)
    await asyncio.sleep(0.3)
    gw = await sip_with_pbx(gateway_factory, tmp_path, pbx_port, keepalive_interval=300,
                            register=(SipRegistration(user="2001", password_file=str(secret)),))
    try:
        yield gw, pbx
    finally:
        if pbx.returncode is None:
            pbx.kill()
        await gw.sip.stop()


def registration(gw) -> dict:
    (reg,) = gw.sip.bridge.status(time.time())["pbx"]["registrations"]
    return reg


async def until_state(gw, state: str) -> dict:
    async with asyncio.timeout(10):
        while (reg := registration(gw))["state"] != state:
            await asyncio.sleep(0.05)
    return reg


@needs_sipp
async def test_register_with_digest_and_refresh(gateway_factory, tmp_path):
    async with registering(gateway_factory, tmp_path, "s3cret-pass") as (gw, pbx):
        reg = await until_state(gw, "registered")
        assert reg["user"] == "2001" and 0 < reg["expires_in"] <= 4
        out, _ = await asyncio.wait_for(pbx.communicate(), 15)  # the refresh ends it
        assert pbx.returncode == 0, out.decode()
        reg = registration(gw)
        assert reg["state"] == "registered" and reg["expires_in"] > 30  # refreshed: 60 s


@needs_sipp
async def test_wrong_password_backs_off(gateway_factory, tmp_path):
    async with registering(gateway_factory, tmp_path, "wrong") as (gw, _):
        reg = await until_state(gw, "failed")
        assert "403" in reg["error"]
        assert gw.sip.bridge.pbx.registrations[0].due > time.time() + 3  # not hammering


@needs_sipp
async def test_options_keepalive_marks_the_pbx_reachable(gateway_factory, tmp_path):
    pbx_port = free_port("127.0.0.1")
    pbx = await start_pbx("uas_options.xml", pbx_port)
    await asyncio.sleep(0.3)
    gw = await sip_with_pbx(gateway_factory, tmp_path, pbx_port, keepalive_interval=1)
    try:
        out, _ = await asyncio.wait_for(pbx.communicate(), 10)
        assert pbx.returncode == 0, out.decode()
        status = gw.sip.bridge.status(time.time())["pbx"]
        assert status["reachable"] is True and status["last_answer_ago"] < 5
    finally:
        await gw.sip.stop()


# --- Kamailio forking to a desk phone and to lpgw ---------------------------------------

KAMAILIO = shutil.which("kamailio") or (Path("/usr/sbin/kamailio")
                                         if Path("/usr/sbin/kamailio").exists() else None)


def kamailio_modules() -> str:
    for candidate in Path("/usr/lib").glob("*/kamailio/modules"):
        return str(candidate) + "/"
    return "/usr/lib/kamailio/modules/"


@needs_sipp
@pytest.mark.skipif(KAMAILIO is None, reason="needs Debian package kamailio")
async def test_answered_elsewhere_through_a_forking_proxy(pbx_side, devices, tmp_path):
    device = devices(pbx_side, "quic", assertion=assertion("nurse"))
    await device.welcome()
    proxy_port, desk_port = free_port("127.0.0.1"), free_port("127.0.0.1")
    cfg = tmp_path / "kamailio.cfg"
    cfg.write_text((SCENARIOS / "kamailio.cfg.in").read_text()
                   .replace("@PROXY_PORT@", str(proxy_port)).replace("@DESK_PORT@", str(desk_port))
                   .replace("@LPGW_PORT@", str(pbx_side.sip.port))
                   .replace("@MODULES@", kamailio_modules()))
    proxy_log = (tmp_path / "kamailio.log").open("wb")
    proxy = await asyncio.create_subprocess_exec(
        str(KAMAILIO), "-f", str(cfg), "-DD", "-E", "-Y", str(tmp_path), "-P",
        str(tmp_path / "kamailio.pid"), stdout=proxy_log, stderr=asyncio.subprocess.STDOUT,
        start_new_session=True)  # its worker processes go with it (killpg below)
    desk = await asyncio.create_subprocess_exec(
        SIPP, "-sf", str(SCENARIOS / "uas_desk.xml"), "-i", "127.0.0.1", "-p", str(desk_port),
        "-t", "u1", "-m", "1", "-timeout", "20s", "-timeout_error", "-nostdin", "-nd",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=str(tmp_path))
    try:
        await asyncio.sleep(1.0)  # the proxy and the desk phone are listening
        assert proxy.returncode is None, (tmp_path / "kamailio.log").read_text()[-2000:]
        caller = await asyncio.create_subprocess_exec(
            SIPP, f"127.0.0.1:{proxy_port}", "-sf", str(SCENARIOS / "uac_answered.xml"),
            "-s", "nurse", "-i", "127.0.0.1", "-p", str(free_port("127.0.0.1")), "-t", "u1",
            "-m", "1", "-timeout", "20s", "-timeout_error", "-nostdin", "-nd",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            cwd=str(tmp_path))
        out, _ = await asyncio.wait_for(caller.communicate(), 40)
        assert caller.returncode == 0, (out.decode()[-2000:] +
                                        (tmp_path / "kamailio.log").read_text()[-3000:])
        desk_out, _ = await asyncio.wait_for(desk.communicate(), 10)
        assert desk.returncode == 0, desk_out.decode()[-3000:]
        call = (await device.next("push"))["payload"]["call"]
        assert call["display_name"] == "Ward 3"
        ended = (await device.next("push"))["payload"]["call_ended"]
        assert ended["id"] == call["id"] and ended["status"] == 487
        assert ended["reason"] == "Call completed elsewhere"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proxy.pid, signal.SIGKILL)
        await proxy.wait()
        if desk.returncode is None:
            desk.kill()
            await desk.wait()
        proxy_log.close()


async def test_call_pushes_are_on_disk_once_the_invite_is_handled(pbx_side, devices, raw):
    import sqlite3

    device = devices(pbx_side, "quic", assertion=assertion("nurse"), ack=False)
    await device.welcome()
    raw.send(raw.request("INVITE", branch="z9hG4bK-disk"))
    await device.next("push")  # written to the device first ...
    other = sqlite3.connect(pbx_side.config.store_path)
    try:  # ... and committed: another connection sees it
        assert other.execute("SELECT count(*) FROM pushes").fetchone()[0] == 1
    finally:
        other.close()


async def test_routes_map_extensions_and_static_bindings_ring_fixed_devices(gateway_factory,
                                                                          devices, tmp_path):
    from gateway.config import SipConfig, SipRouteConfig, SipStaticBinding

    secret = tmp_path / "jwt.secret"
    secret.write_text(SECRET)
    gw = await gateway_factory(assertions={"hs256_secret_file": str(secret)})
    nurse = devices(gw, "quic", assertion=assertion("nurse001"))
    await nurse.welcome()
    desk = devices(gw, "tls")  # no assertion: reachable only through the static binding
    desk_token = await desk.welcome()
    gw.sip = await start_sip(SipConfig(
        host="127.0.0.1", port=free_port("127.0.0.1"),
        routes=(SipRouteConfig(match=r"2(\d{3})", user=r"nurse\1"),),
        static_bindings=(SipStaticBinding(user="ward3", tokens=(desk_token,)),)),
        gw.delivery, gw.store, gw.metrics, "lpgw-test", gw.pump)
    raw = RawUdp(gw)
    try:
        raw.send(raw.request("INVITE", user="2001", branch="z9hG4bK-route"))
        call = (await nurse.next("push"))["payload"]["call"]
        assert call["user"] == "nurse001" and call["to"].startswith("sip:2001@")
        raw.send(raw.request("INVITE", user="ward3", branch="z9hG4bK-static"))
        assert (await desk.next("push"))["payload"]["call"]["user"] == "ward3"
        raw.send(raw.request("INVITE", user="3001", branch="z9hG4bK-none"))
        statuses = [s for _, s, _ in await raw.responses(1.0)]
        assert 480 in statuses  # no route, nobody bound: at once
        assert len(pushes(nurse)) == 1 and len(pushes(desk)) == 1
    finally:
        raw.sock.close()
