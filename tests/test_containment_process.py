"""The fault that stopped QUIC for every phone, against `lpgw run`: an unauthenticated
INVITE whose top Via says `;rport=abc`, for a user whose phone is on QUIC. Before: the
phone's ack of the call made the 180 raise inside the QUIC server's work loop, and from
then on no QUIC datagram was handled (healthy phones timed out and could not come back)
while TLS went on. Now the INVITE is answered without a ring, and every phone keeps
being served; SIGTERM still drains and exits 0.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import time

from gateway.transport import control
from tests.conftest import GatewayProcess, new_install, send
from tests.test_sip import free_port


def invite(sip_port: int, source_port: int, user: str, via_params: str) -> bytes:
    return (f"INVITE sip:{user}@127.0.0.1 SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{source_port};branch=z9hG4bK-evil{via_params}\r\n"
            f"From: \"Nobody\" <sip:666@127.0.0.1>;tag=x\r\n"
            f"To: <sip:{user}@127.0.0.1>\r\nCall-ID: evil-{time.monotonic_ns()}\r\n"
            f"CSeq: 1 INVITE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n").encode()


async def answers(sock: socket.socket, seconds: float) -> list[int]:
    loop = asyncio.get_running_loop()
    got: list[int] = []
    deadline = loop.time() + seconds
    while (left := deadline - loop.time()) > 0:
        try:
            data = await asyncio.wait_for(loop.sock_recv(sock, 65535), left)
        except TimeoutError:
            break
        got.append(int(data.split(b" ")[1]))
    return got


async def test_rport_abc_invite_to_a_quic_phone_stops_nobody(tmp_path, devices):
    sip_port = free_port("127.0.0.1")
    proc = GatewayProcess(tmp_path / "state", 0, {
        "listen": {"host": "127.0.0.1", "port": 0}, "store": {"synchronous": "NORMAL"},
        "sip": {"enabled": True, "host": "127.0.0.1", "port": sip_port}})
    proc.start()
    pbx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    pbx.bind(("127.0.0.1", 0))
    pbx.setblocking(False)
    try:
        gw = proc.handle()
        nurse = devices(gw, "quic", install_id=new_install())
        nurse_token = await nurse.welcome()
        reply = await control.request(gw.config.control_path,
                                      {"op": "bind", "token": nurse_token, "user": "nurse"})
        assert reply["ok"], reply
        other = devices(gw, "quic")
        other_token = await other.welcome()
        rss_before = proc.rss_kib()

        for _ in range(3):  # a few of them, as a prankster would
            pbx.sendto(invite(sip_port, pbx.getsockname()[1], "nurse", ";rport=abc"),
                       ("127.0.0.1", sip_port))
        got = await answers(pbx, 2.0)
        assert 180 not in got and 200 not in got, got  # no ring for a broken Via

        # every QUIC phone is still served: the bystander, the nurse, and a newcomer
        for device, token in ((other, other_token), (nurse, nurse_token)):
            reply = await send(gw, token, {"after": "invite"})
            assert reply["ok"] and reply["sent"], reply
            push = await device.next("push")
            assert push["payload"] == {"after": "invite"}
        started = time.monotonic()
        newcomer = devices(gw, "quic")
        await newcomer.welcome()
        assert time.monotonic() - started < 5
        for device in (nurse, other):
            assert [e for e in device.log if e["event"] == "disconnected"] == []
        rss_after = proc.rss_kib()
        print(f"rport=abc INVITEs: RSS {rss_before} -> {rss_after} KiB; QUIC phones served, "
              f"newcomer welcomed in {time.monotonic() - started:.2f} s")
        assert rss_after - rss_before < 5 * 1024

        proc.proc.send_signal(signal.SIGTERM)  # and it still drains cleanly
        assert proc.proc.wait(20) == 0
        out = proc.proc.stdout.read().decode(errors="replace")
        assert "Traceback" not in out, out
    finally:
        pbx.close()
        proc.kill()


async def test_sigterm_after_control_requests_is_quiet(tmp_path):
    """`lpgw status` a few times, then SIGTERM: exit 0 and no traceback (before: the
    control socket's finished tasks were cancelled at exit and asyncio printed one)."""
    proc = GatewayProcess(tmp_path / "state", 0, {"listen": {"host": "127.0.0.1", "port": 0}})
    proc.start()
    try:
        gw = proc.handle()
        for _ in range(20):
            assert (await control.request(gw.config.control_path, {"op": "status"}))["ok"]
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(20) == 0
        out = proc.proc.stdout.read().decode(errors="replace")
        assert "Traceback" not in out and "Exception in callback" not in out, out
    finally:
        proc.kill()
