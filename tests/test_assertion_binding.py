"""A user binding made by a device's assertion lasts as long as the assertion, against
`lpgw run` with a SIP MESSAGE as the test of who rings: it ends when the assertion expires,
and when the device comes back without one. A binding the API made stays either way.

Before issue 15 such a binding outlived its assertion: after it expired, a reconnect without
one still rang for that user.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import ssl
import time
import uuid

import httpx
import jwt

from tests.conftest import GatewayProcess, new_install
from tests.test_log_secrets import message
from tests.test_sip import free_port

SECRET = "binding-" + uuid.uuid4().hex + uuid.uuid4().hex
LEEWAY = 30.0  # AssertionPolicy's: an assertion is good until exp + 30 s


def ring(sip_port: int, user: str) -> int:
    """Send a MESSAGE for `user` from loopback; the final status it gets."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.sendto(message(sip_port, sock.getsockname()[1], user, f"for {user}"),
                    ("127.0.0.1", sip_port))
        sock.settimeout(5)
        return int(sock.recv(65535).split(b" ", 2)[1])


def assertion(user: str, exp: float) -> str:
    return jwt.encode({"sub": user, "exp": int(exp)}, SECRET, algorithm="HS256")


async def test_an_assertion_binding_ends_with_the_assertion(tmp_path, devices):
    (tmp_path / "hs.secret").write_text(SECRET)
    (tmp_path / "admin.token").write_text("admin-" + uuid.uuid4().hex)
    sip_port = free_port("127.0.0.1")
    proc = GatewayProcess(tmp_path / "state", 0, {
        "listen": {"host": "127.0.0.1", "port": 0}, "store": {"synchronous": "NORMAL"},
        "assertions": {"hs256_secret_file": str(tmp_path / "hs.secret")},
        "api": {"host": "127.0.0.1", "port": 0,
                "admin_token_file": str(tmp_path / "admin.token")},
        "sip": {"enabled": True, "host": "127.0.0.1", "port": sip_port}})
    proc.start()
    try:
        gw = proc.handle()
        # an assertion that expired 26 s ago is still good (leeway 30 s): bound ~4 s more
        until = time.time() - 26 + LEEWAY
        nurse = devices(gw, "tls", assertion=assertion("nurse", time.time() - 26))
        await nurse.welcome()
        assert ring(sip_port, "nurse") == 200
        assert (await nurse.next("push"))["payload"]["message"]["to"] == "nurse"
        await asyncio.sleep(until - time.time() + 0.3)
        assert ring(sip_port, "nurse") == 480  # still connected, but no longer the nurse's
        with_push = [e for e in nurse.log if e["event"] == "push"]
        assert len(with_push) == 1

        # bound for 10 minutes, then back without an assertion: the binding ends at once
        install = new_install()
        porter = devices(gw, "quic", install_id=install,
                         assertion=assertion("porter", time.time() + 600))
        await porter.welcome()
        assert ring(sip_port, "porter") == 200
        await porter.stop()
        again = devices(gw, "quic", install_id=install)
        await again.welcome()
        assert ring(sip_port, "porter") == 480

        # a binding the API made is the site's: a reconnect without an assertion keeps it
        install = new_install()
        desk = devices(gw, "tls", install_id=install)
        token = await desk.welcome()
        admin = (tmp_path / "admin.token").read_text()
        ctx = ssl.create_default_context(cafile=str(proc.state / "gateway.crt"))
        async with httpx.AsyncClient(http2=True, verify=ctx) as client:
            bound = await client.put(
                f"https://localhost:{proc.runtime['api_port']}/v1/devices/{token}/user",
                json={"user": "desk"}, headers={"authorization": f"bearer {admin}"})
            assert bound.status_code == 200, bound.text
        await desk.stop()
        desk = devices(gw, "tls", install_id=install)
        await desk.welcome()
        assert ring(sip_port, "desk") == 200
    finally:
        proc.kill(signal.SIGTERM)
