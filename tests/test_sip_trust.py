"""SIP from trusted peers only, against `lpgw run`.

In network namespaces (source addresses matter): a guest on the Wi-Fi gets 403 or silence
and rings nobody, the PBX's MESSAGE rings only the devices of the apps its route allows, an
INVITE whose Via names a third host sends that host nothing, and a reload moves the trust.
On loopback: SIPp as a PBX answering lpgw's digest challenge (sip.inbound_auth).

Before issue 15 the listener on `::` answered everyone, and any host could put an alert on
every bound phone.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import textwrap
import time
import uuid

import jwt
import yaml

from tests.conftest import ROOT, GatewayProcess
from tests.netns import Lines
from tests.test_sip import SCENARIOS, SIPP, free_port, needs_sipp

PY = sys.executable
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
GW, PBX, GUEST, VICTIM = "10.78.0.1", "10.78.0.2", "10.78.0.3", "10.78.0.4"
SECRET = "sip-trust-" + uuid.uuid4().hex + uuid.uuid4().hex
APP_A, APP_B = "com.example.nurse", "com.example.guestapp"

# Send one SIP request (hex on argv) from a namespace, from port argv[2], to the gateway, and
# print the status of each datagram that comes back within argv[3] seconds, as JSON.
SEND = textwrap.dedent("""
    import json, socket, sys, time
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", int(sys.argv[2])))
    sock.sendto(bytes.fromhex(sys.argv[4]), (sys.argv[1], 5060))
    got, end = [], time.monotonic() + float(sys.argv[3])
    while (left := end - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            got.append(int(sock.recv(65535).split(b" ", 2)[1]))
        except TimeoutError:
            break
    print(json.dumps(got))
""")

# Count datagrams arriving on argv[1]:argv[2] for argv[3] seconds (the would-be victim).
LISTEN = textwrap.dedent("""
    import socket, sys, time
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((sys.argv[1], int(sys.argv[2])))
    print("ready", flush=True)
    n, size, end = 0, 0, time.monotonic() + float(sys.argv[3])
    while (left := end - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            size += len(sock.recv(65535)); n += 1
        except TimeoutError:
            break
    print(n, size, flush=True)
""")


def request(method: str, user: str, via_host: str, via_port: int, via_extra: str = "") -> bytes:
    body = b"CODE BLUE, ward 3" if method == "MESSAGE" else b""
    return (f"{method} sip:{user}@{GW} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {via_host}:{via_port};branch=z9hG4bK-{uuid.uuid4().hex}"
            f"{via_extra}\r\n"
            f"From: <sip:2000@{via_host}>;tag=t{uuid.uuid4().hex[:8]}\r\n"
            f"To: <sip:{user}@{GW}>\r\nCall-ID: {uuid.uuid4().hex}\r\n"
            f"CSeq: 1 {method}\r\nMax-Forwards: 70\r\n"
            + ("Content-Type: text/plain\r\n" if body else "")
            + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def send(ns, data: bytes, port: int = 5070, wait: float = 1.5) -> list[int]:
    """From `port`: the Via's sent-by port, where responses go when it has no rport."""
    done = ns.exec(PY, "-c", SEND, GW, str(port), str(wait), data.hex(), timeout=wait + 15)
    return json.loads(done.stdout)


class Device:
    """`lpgw device` inside the gateway's namespace, its JSON events read on a thread."""

    def __init__(self, ns, pin: str, topic: str, user: str) -> None:
        token = jwt.encode({"sub": user, "exp": int(time.time()) + 600}, SECRET,
                           algorithm="HS256")
        self.proc = ns.popen([PY, "-m", "gateway.cli", "device", "--host", "127.0.0.1",
                              "--port", "4433", "--pin", pin, "--transport", "tls",
                              "--topic", topic, "--assertion", token], cwd=ROOT, env=ENV)
        self.lines = Lines(self.proc)
        self.lines.wait_for(lambda line: '"welcome"' in line, 15)

    def pushes(self) -> list[str]:
        return [line for _, line in self.lines.drain() if '"event": "push"' in line]


def metric(ns, name: str) -> dict[str, float]:
    done = ns.exec(PY, "-c", "import sys, httpx; print(httpx.get(sys.argv[1], verify=False)"
                   ".text)", "https://127.0.0.1:8443/metrics", timeout=20)
    return {line.rpartition(" ")[0]: float(line.rpartition(" ")[2])
            for line in done.stdout.splitlines() if line.startswith(name)}


def test_only_trusted_peers_ring_phones(lab, tmp_path):
    gw, pbx, guest, victim = (lab.add(n) for n in ("gw", "pbx", "guest", "victim"))
    for ns, address in ((gw, GW), (pbx, PBX), (guest, GUEST), (victim, VICTIM)):
        lab.plug(ns, "eth0", f"{address}/24")
    (tmp_path / "hs.secret").write_text(SECRET)
    config = tmp_path / "lpgw.yaml"
    settings = {
        "state_dir": str(tmp_path / "state"), "discovery": {"enabled": False},
        "listen": {"host": "::", "port": 4433, "quic": False},
        "api": {"host": "::", "port": 8443}, "store": {"synchronous": "NORMAL"},
        "assertions": {"hs256_secret_file": str(tmp_path / "hs.secret")},
        "sip": {"enabled": True, "host": "::", "port": 5060, "trusted": [f"{PBX}/32"],
                "topics": [APP_A]}}
    config.write_text(yaml.safe_dump(settings))
    proc = gw.popen([PY, "-m", "gateway.cli", "run", "-c", str(config)], cwd=ROOT, env=ENV)
    lines = Lines(proc)
    _, started = lines.wait_for(lambda line: "pin sha256/" in line, 30)
    pin = "sha256/" + started.split("pin sha256/")[1].strip()
    nurse = Device(gw, pin, APP_A, "nurse")
    squatter = Device(gw, pin, APP_B, "nurse")  # another app bound to the same user

    # a guest on the Wi-Fi: 403, and no phone shows its alert
    assert send(guest, request("MESSAGE", "nurse", GUEST, 5070)) == [403]
    assert send(guest, request("INVITE", "nurse", GUEST, 5070)) == [403]
    # the PBX: its MESSAGE rings the nurse's app, not the other app bound to "nurse"
    assert send(pbx, request("MESSAGE", "nurse", PBX, 5070)) == [200]
    time.sleep(0.5)
    assert len(nurse.pushes()) == 1 and squatter.pushes() == []

    # an INVITE from the PBX whose Via names a third host (received=, and its sent-by):
    # every response and retransmission goes to the PBX's address, none to the third host
    listener = victim.popen([PY, "-c", LISTEN, VICTIM, "5099", "5"], env=ENV)
    victim_lines = Lines(listener)
    victim_lines.wait_for(lambda line: line == "ready", 10)
    statuses = send(pbx, request("INVITE", "nobody", VICTIM, 5099,
                                 f";received={VICTIM};rport=5099"), port=5099, wait=3.5)
    assert statuses[:2] == [100, 480] and len(statuses) >= 3, statuses  # retransmitted
    _, counted = victim_lines.wait_for(lambda line: line[0].isdigit(), 10)
    assert counted == "0 0", f"the third host got {counted} (datagrams, bytes)"

    # a reload: silence for strangers, and the guest's address trusted instead
    settings["sip"].update(trusted=[f"{GUEST}/32"], untrusted_reply="none")
    config.write_text(yaml.safe_dump(settings))
    os.killpg(proc.pid, signal.SIGHUP)
    lines.wait_for(lambda line: "reloaded" in line, 15)
    assert send(pbx, request("MESSAGE", "nurse", PBX, 5070)) == []
    assert send(guest, request("MESSAGE", "nurse", GUEST, 5070)) == [200]
    time.sleep(0.5)
    assert len(nurse.pushes()) == 2 and squatter.pushes() == []

    counted = metric(gw, "lpgw_sip_untrusted_total")
    assert counted == {'lpgw_sip_untrusted_total{outcome="forbidden"}': 2.0,
                       'lpgw_sip_untrusted_total{outcome="dropped"}': 1.0}, counted
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(15) == 0


def auth_scenario(tmp_path, method: str, final: int) -> str:
    text = (SCENARIOS / "uac_auth.xml").read_text()
    ack = ("ACK sip:[service]@[remote_ip]:[remote_port] SIP/2.0\n"
           "      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch-3];rport\n"
           '      From: "Desk 12" <sip:1012@[local_ip]:[local_port]>;'
           "tag=[pid]SIPpTag00[call_number]\n      [last_To:]\n      Call-ID: [call_id]\n"
           "      CSeq: 1 ACK\n      Max-Forwards: 70\n      Content-Length: 0\n")
    if method == "INVITE":
        text = text.replace("ACK_OR_NOTHING", ack)
    else:
        start = text.index("  <send>\n    <![CDATA[\n      ACK_OR_NOTHING")
        text = text[:start] + text[text.index("</send>", start) + len("</send>\n"):]
    text = text.replace("METHOD", method).replace("FINAL_STATUS", str(final))
    path = tmp_path / f"auth_{method}_{final}.xml"
    path.write_text(text)
    return str(path)


async def run_sipp(scenario: str, sip_port: int, user: str, password: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        SIPP, f"127.0.0.1:{sip_port}", "-sf", scenario, "-s", "nurse", "-m", "1", "-t", "u1",
        "-i", "127.0.0.1", "-p", str(free_port("127.0.0.1")), "-au", user, "-ap", password,
        "-timeout", "15s", "-timeout_error", "-nostdin", "-nd",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        cwd=str(SCENARIOS))
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode, out.decode(errors="replace")


@needs_sipp
async def test_inbound_digest_with_sipp_answering_the_challenge(tmp_path, devices):
    (tmp_path / "pbx.credentials").write_text("# user:password\npbx:ward-3-secret\n")
    (tmp_path / "hs.secret").write_text(SECRET)
    sip_port = free_port("127.0.0.1")
    proc = GatewayProcess(tmp_path / "state", 0, {
        "listen": {"host": "127.0.0.1", "port": 0}, "store": {"synchronous": "NORMAL"},
        "log": {"level": "debug"},
        "assertions": {"hs256_secret_file": str(tmp_path / "hs.secret")},
        "sip": {"enabled": True, "host": "127.0.0.1", "port": sip_port, "ring_window": 2,
                "inbound_auth": {"enabled": True, "realm": "ward3",
                                 "credentials_file": str(tmp_path / "pbx.credentials")}}})
    proc.start()
    try:
        nurse = devices(proc.handle(), "tls", assertion=jwt.encode(
            {"sub": "nurse", "exp": int(time.time()) + 600}, SECRET, algorithm="HS256"))
        await nurse.welcome()
        code, out = await run_sipp(auth_scenario(tmp_path, "MESSAGE", 200), sip_port,
                                   "pbx", "ward-3-secret")
        assert code == 0, out
        assert "ward 3" in json.dumps((await nurse.next("push"))["payload"])
        # a wrong password: 403, and the phone shows nothing
        code, out = await run_sipp(auth_scenario(tmp_path, "MESSAGE", 403), sip_port,
                                   "pbx", "guessed")
        assert code == 0, out
        # an INVITE is challenged too (and its 401 ACKed); with credentials it rings the
        # nurse (180) until the 2 s ring window ends (480)
        code, out = await run_sipp(auth_scenario(tmp_path, "INVITE", 480), sip_port,
                                   "pbx", "ward-3-secret")
        assert code == 0, out
        pushes = [e["payload"] for e in nurse.log if e["event"] == "push"]
        assert [p for p in pushes if "message" in p] == pushes[:1], pushes  # not the 403's
        assert "call" in pushes[1], pushes
    finally:
        proc.kill(signal.SIGTERM)
    out = "".join(proc.lines) + proc.proc.stdout.read().decode(errors="replace")
    assert "ward-3-secret" not in out and "guessed" not in out
