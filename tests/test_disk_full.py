"""A full disk under the state directory, against `lpgw run` over QUIC and TLS: a small
tmpfs is the state directory and a file fills it. While it is full, pushes are refused
with a reason (control socket, `lpgw send`, the HTTP/2 API: 503 ServiceUnavailable), a new
phone gets `bye unavailable` saying why, phones already connected keep their sessions and
phones already known get what is stored; once the file is gone everything works again by
itself, and the acks that could not be written are written.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.core.assertions import AssertionPolicy
from gateway.core.delivery import Delivery, DeliverySettings, Rejected
from gateway.core.metrics import Metrics
from gateway.core.model import PushRequest
from gateway.protocol.messages import Hello
from gateway.store import Store
from gateway.transport import control
from tests.conftest import ROOT, GatewayProcess, new_install, send
from tests.fakelink import Driven, FakeLink

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")

TEAM, KEY_ID, TOPIC = "ABCDE12345", "KEYAAAAAAA", "com.example.lpgw"


@pytest.fixture
def small_fs(tmp_path):
    """An 8 MiB tmpfs, always unmounted afterwards."""
    mount = tmp_path / "fs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(mount)],
                   check=True)
    try:
        yield mount
    finally:
        for _ in range(50):  # the gateway may still be letting go of its files
            if subprocess.run(["umount", str(mount)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        else:
            subprocess.run(["umount", "--lazy", str(mount)], check=True)


def fill(path: Path) -> None:
    """Write `path` until the file system has not one byte left."""
    with path.open("wb", buffering=0) as f:
        for chunk in (1 << 20, 1 << 16, 1 << 12, 1 << 9, 1):
            while True:
                try:
                    f.write(bytes(chunk))
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    assert os.statvfs(path.parent).f_bavail == 0


class Provider:
    """An app server's ES256 key, configured on the gateway."""

    def __init__(self, directory: Path) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.file = directory / "provider.pub"
        self.file.write_bytes(self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

    def config(self) -> dict:
        return {"host": "127.0.0.1", "port": 0, "providers": [
            {"team_id": TEAM, "key_id": KEY_ID, "key_file": str(self.file), "topics": [TOPIC]}]}

    async def push(self, gp: GatewayProcess, token: str) -> httpx.Response:
        bearer = jwt.encode({"iss": TEAM, "iat": int(time.time())}, self.key,
                            algorithm="ES256", headers={"kid": KEY_ID})
        async with httpx.AsyncClient(http2=True, verify=False) as client:
            return await client.post(
                f"https://127.0.0.1:{gp.runtime['api_port']}/3/device/{token}",
                headers={"authorization": f"bearer {bearer}", "apns-topic": TOPIC},
                content=b'{"aps":{"alert":"from the app server"}}')


def start(state: Path, provider: Provider) -> GatewayProcess:
    gp = GatewayProcess(state, 0, {"listen": {"host": "127.0.0.1", "port": 0},
                                   "api": provider.config(),
                                   "protocol": {"heartbeat": 0.5, "heartbeat_misses": 2}})
    gp.start()
    return gp


async def refused_push(gp: GatewayProcess, token: str, accepted: list[str]) -> dict:
    """Push until the store refuses (the WAL may still have room for a few): that refusal.
    What was accepted meanwhile goes into `accepted`."""
    for i in range(500):
        reply = await send(gp.handle(), token, {"aps": {"alert": f"while full {i}"},
                                                "pad": "x" * 3000})
        if not reply["ok"]:
            return reply
        accepted.append(reply["push_id"])
    raise AssertionError("500 pushes of 3 KB were accepted on a full 8 MiB file system")


def lpgw(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)


async def status(gp: GatewayProcess) -> dict:
    return (await control.request(gp.handle().config.control_path, {"op": "status"}))["status"]


@pytest.mark.parametrize("transport", ["quic", "tls"])
async def test_a_full_disk_refuses_clearly_serves_what_is_stored_and_recovers(
        small_fs, tmp_path, devices, transport):
    provider = Provider(tmp_path)
    gp = start(small_fs / "state", provider)
    measured: dict[str, float] = {}
    try:
        gw = gp.handle()
        bystander = devices(gw, transport, install_id=new_install())
        bystander_token = await bystander.welcome()
        known_install = new_install()
        known = devices(gw, transport, install_id=known_install)
        known_token = await known.welcome()
        await known.stop()
        waiting = [(await send(gw, known_token, {"n": i}))["push_id"] for i in range(3)]

        filler = small_fs / "filler"
        fill(filler)
        full_at = time.monotonic()

        # pushes: refused, with the reason, on every path in
        accepted: list[str] = []
        reply = await refused_push(gp, bystander_token, accepted)
        assert reply["reason"] == "ServiceUnavailable", reply
        assert "not stored" in reply["message"] and "storage is full" in reply["message"]
        cli = lpgw("send", bystander_token, "--payload", '{"aps":{"alert":"x"}}',
                   "--socket", str(gw.config.control_path))
        assert cli.returncode == 1
        said = json.loads(cli.stdout)
        assert said["reason"] == "ServiceUnavailable" and "storage is full" in said["message"]
        api = await provider.push(gp, bystander_token)
        assert api.status_code == 503, api.text
        assert api.json()["reason"] == "ServiceUnavailable"

        # a new phone: told why, and nothing else happens to it
        newcomer = devices(gw, transport, install_id=new_install())
        bye = await newcomer.next("disconnected", timeout=10)
        assert (bye["reason"], bye["code"]) == ("unavailable", "storage_unavailable"), bye
        assert "storage is full" in bye["message"], bye

        # a phone already known: welcomed, and given what is stored (its acks wait)
        back = devices(gw, transport, install_id=known_install)
        assert await back.welcome() == known_token
        assert [(await back.next("push"))["id"] for _ in waiting] == waiting

        # a phone already connected: still there after several heartbeats
        await asyncio.sleep(max(0.0, 2.0 - (time.monotonic() - full_at)))
        assert not [e for e in bystander.log if e["event"] == "disconnected"], bystander.log
        storage = (await status(gp))["storage"]
        assert storage["ok"] is False and "full" in storage["error"], storage

        if transport == "quic":  # the self-test says so too (once is enough)
            report = json.loads(lpgw("selftest", "--json", "-c", str(gp.config_path)).stdout)
            checks = {c["name"]: c for c in report["checks"]}
            assert checks["storage writes"]["ok"] is False, checks
            assert "free space" in checks["storage writes"]["fix"]
            assert checks["disk"]["ok"] is False and "0 MiB free" in checks["disk"]["detail"]

        # space comes back: everything recovers by itself
        filler.unlink()
        freed = time.monotonic()
        while not (reply := await send(gw, bystander_token, {"aps": {"alert": "back"}}))["ok"]:
            assert time.monotonic() - freed < 5, reply
            await asyncio.sleep(0.02)
        measured["push accepted again (s)"] = time.monotonic() - freed
        assert (await bystander.next("push"))["id"] in [*accepted, reply["push_id"]]
        await newcomer.welcome()  # it came back by itself (its backoff), and is let in
        measured["new phone welcomed (s)"] = time.monotonic() - freed
        while not (await status(gp))["storage"]["ok"]:
            assert time.monotonic() - freed < 5
            await asyncio.sleep(0.05)
        measured["status ok again (s)"] = time.monotonic() - freed
        received = {e["id"] for e in bystander.log if e["event"] == "push"}
        for push_id in [*accepted, reply["push_id"]]:  # every push accepted arrives
            while push_id not in received:
                await bystander.next("push")
                received = {e["id"] for e in bystander.log if e["event"] == "push"}
        await back.stop()
        await bystander.stop()
    finally:
        gp.kill(signal.SIGTERM)
    assert gp.proc.returncode == 0
    print(f"\n{transport}: {', '.join(f'{k} {v:.3f}' for k, v in measured.items())}")
    with contextlib.closing(sqlite3.connect(small_fs / "state" / "lpgw.sqlite3")) as db:
        left = dict(db.execute("SELECT token, count(*) FROM pushes GROUP BY token"))
    assert left.get(known_token, 0) == 0, "the acks deferred while full were written"
    assert left.get(bystander_token, 0) == 0


async def test_sigterm_while_the_disk_is_full_exits_0_and_keeps_every_accepted_push(
        small_fs, tmp_path, devices):
    provider = Provider(tmp_path)
    state = small_fs / "state"
    gp = start(state, provider)
    try:
        gw = gp.handle()
        install = new_install()
        phone = devices(gw, "tls", install_id=install)
        token = await phone.welcome()
        await phone.stop()
        kept = [(await send(gw, token, {"n": i}))["push_id"] for i in range(3)]
        fill(small_fs / "filler")
        refused = await refused_push(gp, token, kept)
        assert refused["reason"] == "ServiceUnavailable"
        for _ in range(20):  # and many more: the log says it once
            assert not (await send(gw, token, {"again": True}))["ok"]
    finally:
        gp.kill(signal.SIGTERM)
    assert gp.proc.returncode == 0
    out = "".join(gp.lines) + gp.proc.stdout.read().decode()
    for trace_of_the_store in ("sqlite3.", "StorageFailed", "internal error in"):
        assert trace_of_the_store not in out, out
    assert out.count("the store cannot write") == 1, out

    (small_fs / "filler").unlink()
    gp = start(state, provider)
    try:
        phone = devices(gp.handle(), "quic", install_id=install)
        assert await phone.welcome() == token
        got = [(await phone.next("push"))["id"] for _ in kept]
        assert got == kept
    finally:
        gp.kill(signal.SIGTERM)


def test_a_group_commit_lost_to_a_full_disk_is_lost_for_every_caller(small_fs):
    """The API's pushes wait in a group commit for the end of the loop turn; if someone
    else commits first (the SIP shell after a datagram, `lpgw send`) and the disk is full,
    the group is rolled back: the API's own commit must then fail too, never answer 200."""
    store = Store(small_fs / "lpgw.sqlite3")
    try:
        delivery = Driven(Delivery(store, b"k" * 32, "gw", DeliverySettings(),
                                   AssertionPolicy(), Metrics()))
        now = time.time()
        token = delivery.admit(FakeLink(), Hello(version=1, install_id=new_install(),
                                                 topic=TOPIC, push_types=("alert",)), now)
        fill(small_fs / "filler")
        push = PushRequest(push_type="alert", payload={"aps": {"alert": "in a group"}})
        assert delivery.submit(token, push, now, group=True).stored  # in memory, waiting
        with pytest.raises(Rejected, match="storage is full"):
            delivery.commit(now)  # the first committer: the SIP shell, say
        with pytest.raises(Rejected, match="storage is full"):
            delivery.commit(now + 0.01)  # the API's group: its push is not on disk
        with pytest.raises(Rejected):  # a grouped push meanwhile: refused at once
            delivery.submit(token, push, now + 0.02, group=True)
        (small_fs / "filler").unlink()
        assert store.pending_after(token, 0) == []
        later = now + 3  # the hold is over: groups land again
        assert delivery.submit(token, push, later, group=True).stored
        delivery.commit(later)
        assert len(store.pending_after(token, 0)) == 1
    finally:
        store.close()
