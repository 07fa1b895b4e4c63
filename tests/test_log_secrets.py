"""No secret in any log, at any level: `lpgw run --log-level debug` driven through every path
that carries one (provider JWTs, the admin token, device tokens and install ids, device
assertions, SIP digest both ways, the control socket, a reload), then everything it wrote is
searched for each secret.

A device token may appear by its first 8 characters (that is how operators tell devices
apart); anything longer is a leak.
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

from gateway.transport import control
from tests.conftest import GatewayProcess, send
from tests.test_api import TOPIC, Keys
from tests.test_sip import free_port, needs_sipp, start_pbx

HS_SECRET = "hs256-" + uuid.uuid4().hex + uuid.uuid4().hex
PBX_PASSWORD = "s3cret-pass"  # what tests/sip/registrar.xml accepts


def message(sip_port: int, source_port: int, user: str, text: str) -> bytes:
    body = text.encode()
    return (f"MESSAGE sip:{user}@127.0.0.1 SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{source_port};branch=z9hG4bK-{uuid.uuid4().hex}\r\n"
            f"From: <sip:2000@127.0.0.1>;tag=a\r\nTo: <sip:{user}@127.0.0.1>\r\n"
            f"Call-ID: {uuid.uuid4().hex}\r\nCSeq: 1 MESSAGE\r\nMax-Forwards: 70\r\n"
            f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


def leaks(text: str, secrets: dict[str, str]) -> list[str]:
    """Each secret found, with the start of the first line holding it (the secret masked)."""
    found = []
    for name, value in secrets.items():
        line = next((line for line in text.splitlines() if value and value in line), None)
        if line is not None:
            found.append(f"{name}: {line.replace(value, '<' + name + '>')[:160]}")
    return found


@needs_sipp
async def test_debug_logs_hold_no_secret(tmp_path, devices):
    keys = Keys(tmp_path)
    admin = "admin-" + uuid.uuid4().hex
    (tmp_path / "admin.token").write_text(admin + "\n")
    (tmp_path / "hs.secret").write_text(HS_SECRET)
    (tmp_path / "2001.secret").write_text(PBX_PASSWORD + "\n")
    pbx_port = free_port("127.0.0.1")
    pbx = await start_pbx("registrar.xml", pbx_port)
    sip_port = free_port("127.0.0.1")
    api_port = free_port("127.0.0.1")
    proc = GatewayProcess(tmp_path / "state", 0, {
        "listen": {"host": "127.0.0.1", "port": 0}, "log": {"level": "debug"},
        "store": {"synchronous": "NORMAL"},
        "assertions": {"hs256_secret_file": str(tmp_path / "hs.secret")},
        "api": {"host": "127.0.0.1", "port": api_port, "providers": keys.providers(),
                "admin_token_file": str(tmp_path / "admin.token")},
        "sip": {"enabled": True, "host": "127.0.0.1", "port": sip_port,
                "pbx_host": "127.0.0.1", "pbx_port": pbx_port, "keepalive_interval": 300,
                "register": [{"user": "2001",
                              "password_file": str(tmp_path / "2001.secret")}]}})
    secrets: dict[str, str] = {"admin token": admin, "HS256 secret": HS_SECRET,
                               "PBX password": PBX_PASSWORD}
    try:
        proc.start()
        gw = proc.handle()
        token_secret = (proc.state / "token.secret")
        if token_secret.exists():
            secrets["token secret"] = token_secret.read_bytes().hex()[:16]
        key_pem = (proc.state / "gateway.key").read_text().splitlines()
        secrets["TLS key"] = key_pem[1]

        # devices: with a good assertion (QUIC), a forged one (TLS), and none
        assertion = jwt.encode({"sub": "nurse", "exp": int(time.time()) + 600}, HS_SECRET,
                               algorithm="HS256")
        forged = jwt.encode({"sub": "nurse", "exp": int(time.time()) + 600}, "x" * 40,
                            algorithm="HS256")
        installs = [str(uuid.uuid4()) for _ in range(3)]
        nurse = devices(gw, "quic", install_id=installs[0], assertion=assertion)
        nurse_token = await nurse.welcome()
        refused = devices(gw, "tls", install_id=installs[1], assertion=forged, reconnect=False)
        await refused.next("disconnected")
        other = devices(gw, "tls", install_id=installs[2])
        other_token = await other.welcome()
        secrets.update({"assertion": assertion, "forged assertion": forged,
                        "assertion signature": assertion.rsplit(".", 1)[1],
                        "nurse token": nurse_token[:9], "other token": other_token[:9]})
        secrets.update({f"install id {i}": v for i, v in enumerate(installs)})

        # the API: pushes with good and bad JWTs, reads with the admin token, HTTP/1.1 too
        provider = keys.token()
        bad_signature = provider[:-8] + ("A" * 8 if not provider.endswith("A" * 8) else "B" * 8)
        secrets.update({"provider JWT": provider, "JWT signature": provider.rsplit(".", 1)[1],
                        "bad JWT": bad_signature})
        ctx = ssl.create_default_context(cafile=str(proc.state / "gateway.crt"))
        base = f"https://localhost:{proc.runtime['api_port']}"
        async with httpx.AsyncClient(http2=True, verify=ctx, base_url=base) as h2:
            ok = await h2.post(f"/3/device/{other_token}", content=b'{"aps":{"alert":"a"}}',
                               headers={"authorization": f"bearer {provider}",
                                        "apns-topic": TOPIC})
            assert ok.status_code == 200, ok.text
            bad = await h2.post(f"/3/device/{other_token}", content=b'{"aps":{"alert":"b"}}',
                                headers={"authorization": f"bearer {bad_signature}"})
            assert bad.status_code == 403
            bound = await h2.put(f"/v1/devices/{other_token}/user", json={"user": "porter"},
                                 headers={"authorization": f"bearer {admin}"})
            assert bound.status_code < 300, bound.text
            listed = await h2.get("/v1/devices", headers={"authorization": f"bearer {admin}"})
            assert listed.status_code == 200
            wrong = await h2.get("/status", headers={"authorization": f"bearer {admin}x"})
            assert wrong.status_code in (401, 403)
        async with httpx.AsyncClient(http2=False, verify=ctx, base_url=base) as h1:
            status = await h1.get("/status", headers={"authorization": f"bearer {admin}"})
            assert status.status_code == 200
        assert (await other.next("push"))["payload"]["aps"]["alert"] == "a"

        # the control socket (`lpgw send`) and SIP: a MESSAGE for the nurse, the PBX
        # registration with its digest password
        reply = await send(gw, nurse_token, {"via": "control"})
        assert reply["ok"], reply
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            sock.sendto(message(sip_port, sock.getsockname()[1], "nurse", "ward 3"),
                        ("127.0.0.1", sip_port))
            sock.settimeout(5)
            assert b" 200 " in sock.recv(65535).split(b"\r\n")[0]
        async with asyncio.timeout(10):
            while True:
                status = await control.request(gw.config.control_path, {"op": "status"})
                regs = status["status"]["sip"]["pbx"]["registrations"]
                if regs and regs[0]["state"] == "registered":
                    break
                await asyncio.sleep(0.1)

        proc.proc.send_signal(signal.SIGHUP)  # a reload reads every secret file again
        await asyncio.sleep(1.0)
        reply = await send(gw, nurse_token, {"after": "reload"})
        assert reply["ok"], reply
    finally:
        if pbx.returncode is None:
            pbx.kill()
        await pbx.wait()
        proc.kill(signal.SIGTERM)
        proc.kill()
    out = "".join(proc.lines) + proc.proc.stdout.read().decode(errors="replace")
    assert out.count(" DEBUG ") >= 6, out  # the level really was debug: each API request
    found = leaks(out, secrets)
    assert not found, "secrets in the log:\n" + "\n".join(found)
    print(f"debug log of {out.count(chr(10))} lines, {len(out)} bytes: none of "
          f"{len(secrets)} secrets in it")

