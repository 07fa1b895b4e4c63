"""The database and its secret against `lpgw run`: a damaged database stops the start with
a clear line (never a traceback, never a silent run); `lpgw db salvage` keeps what can be
read; the token secret lives in a file of its own, so a lost database keeps every token;
and SIGTERM still drains and closes the store when one step of the stop fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.store import Store
from tests.conftest import ROOT, GatewayProcess, new_install, send

TOPIC = "com.example.lpgw"  # what `devices()` registers with
FILLER = 400  # devices, with a push each: enough pages to damage one in the middle


@dataclass
class Pristine:
    state: Path
    install: str
    token: str
    push_id: str


@contextlib.asynccontextmanager
async def a_phone_with_a_push_waiting(state: Path, devices):
    """`lpgw run`, a phone that registered and left, and a push stored for it:
    (gateway, install id, token, push id)."""
    gp = GatewayProcess(state, 0, {"listen": {"host": "127.0.0.1", "port": 0}})
    gp.start()
    try:
        install = new_install()
        phone = devices(gp.handle(), "tls", install_id=install)
        token = await phone.welcome()
        await phone.stop()
        reply = await send(gp.handle(), token, {"aps": {"alert": "kept"}})
        assert reply["ok"] and reply["stored"], reply
        yield gp, install, token, reply["push_id"]
    finally:
        gp.kill(signal.SIGTERM)


@pytest.fixture
async def pristine(tmp_path_factory, devices) -> Pristine:
    """A state directory as `lpgw run` leaves it: a phone known, a push waiting for it, and
    FILLER more devices written through the store."""
    cache = tmp_path_factory.getbasetemp() / "pristine-state"
    facts = cache.with_suffix(".json")
    if not facts.exists():  # made once for the whole module, copied by each test
        async with a_phone_with_a_push_waiting(cache, devices) as (_, install, token, push_id):
            pass
        store = Store(cache / "lpgw.sqlite3")
        try:
            for i in range(FILLER):
                filler = f"{i:064x}"
                store.record_device(filler, TOPIC, ("alert",), None, 1.0)
                store.accept_push(filler, f"f-{i}", "alert", 10, 0, None,
                               json.dumps({"pad": "x" * 300}), 1.0, 256)
        finally:
            store.close()
        facts.write_text(json.dumps([install, token, push_id]))
    install, token, push_id = json.loads(facts.read_text())
    state = tmp_path_factory.mktemp("run") / "state"
    shutil.copytree(cache, state)
    (state / "control.sock").unlink(missing_ok=True)
    return Pristine(state, install, token, push_id)


def config_for(state: Path) -> Path:
    return GatewayProcess(state, 0, {"listen": {"host": "127.0.0.1", "port": 0}}).config_path


@contextlib.asynccontextmanager
async def restarted(pristine: Pristine, devices, transport: str = "tls"):
    """`lpgw run` on the state directory, and our phone back: with the same token, so app
    servers still reach it."""
    gp = GatewayProcess(pristine.state, 0, {"listen": {"host": "127.0.0.1", "port": 0}})
    gp.start()
    try:
        phone = devices(gp.handle(), transport, install_id=pristine.install)
        assert await phone.welcome() == pristine.token
        yield gp, phone
    finally:
        gp.kill(signal.SIGTERM)


def lpgw(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)


def refused_start(cfg: Path) -> str:
    """`lpgw run` that must stop at once with exit 3; its output."""
    try:
        run = subprocess.run([sys.executable, "-m", "gateway.cli", "run", "-c", str(cfg)],
                             capture_output=True, text=True, timeout=15, cwd=ROOT)
    except subprocess.TimeoutExpired:
        pytest.fail("lpgw run started and ran on: it must refuse this state directory")
    out = run.stdout + run.stderr
    assert run.returncode == 3, out
    assert "Traceback" not in out, out
    return out


def devices_leaf_away_from_the_first(db_path: Path) -> int:
    """A page of the devices table in the middle of it (the first device, our phone, is on
    the first page)."""
    with closing(sqlite3.connect(f"file:{db_path}?immutable=1", uri=True)) as db:
        leaves = [r[0] for r in db.execute(
            "SELECT pageno FROM dbstat WHERE name='devices' AND pagetype='leaf' ORDER BY path")]
    assert len(leaves) >= 4, leaves
    return leaves[len(leaves) // 2]


def damage(db_path: Path, kind: str) -> None:
    size = db_path.stat().st_size
    noise = random.Random(14).randbytes
    with db_path.open("r+b") as f:
        if kind == "header":
            f.write(noise(100))
        elif kind == "middle_page":
            page = devices_leaf_away_from_the_first(db_path)
            f.seek((page - 1) * 4096)
            f.write(noise(4096))
        elif kind == "truncated":
            f.truncate(size // 2)
        elif kind == "empty":
            f.truncate(0)


# --- a damaged database ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["header", "middle_page", "truncated", "empty"])
async def test_a_damaged_database_stops_the_start_and_says_what_to_do(pristine, kind):
    db = pristine.state / "lpgw.sqlite3"
    assert not Path(f"{db}-wal").exists()  # a clean stop: the file alone is the database
    damage(db, kind)
    before = db.read_bytes()
    cfg = config_for(pristine.state)

    out = refused_start(cfg)
    assert f"cannot start: the database {db} is damaged" in out, out
    assert "restore the state directory from its backup" in out
    assert f"lpgw db salvage -c {cfg} --replace" in out
    assert db.read_bytes() == before, "the start must leave the damaged file as it was"

    report = json.loads(lpgw("selftest", "--offline", "--json", "-c", str(cfg)).stdout)
    store = next(c for c in report["checks"] if c["name"] == "store")
    assert store["ok"] is False and not report["ok"], report
    assert "lpgw db salvage" in store["fix"] and "backup" in store["fix"], store


@pytest.mark.parametrize("kind", ["header", "middle_page"])
async def test_salvage_keeps_what_can_be_read_and_the_gateway_starts_on_it(pristine, kind,
                                                                           devices):
    db = pristine.state / "lpgw.sqlite3"
    damage(db, kind)
    cfg = config_for(pristine.state)

    salvaged = lpgw("db", "salvage", "-c", str(cfg), "--replace")
    assert salvaged.returncode == 0, salvaged.stderr
    report = json.loads(salvaged.stdout)
    assert "Traceback" not in salvaged.stderr
    assert {"token_secret", "gateway_id"} <= set(report["meta"]), report
    if kind == "header":  # every page is whole: everything comes back
        assert report["header_rebuilt"] and report["devices"] == FILLER + 1, report
        assert report["pushes"] == FILLER + 1, report
    else:  # one page of devices is lost, with their pushes; the rest comes back
        assert report["unreadable_stretches"] >= 1, report
        assert FILLER // 2 < report["devices"] < FILLER + 1, report
        assert report["pushes"] == report["devices"], report
    kept = Path(report["damaged_kept_at"])
    assert kept.exists() and kept.parent == pristine.state

    async with restarted(pristine, devices, "quic") as (gp, phone):
        push = await phone.next("push")
        assert push["id"] == pristine.push_id  # the push it had waiting is still there
    assert gp.proc.returncode == 0


def test_salvage_says_when_nothing_can_be_read(pristine):
    db = pristine.state / "lpgw.sqlite3"
    damage(db, "empty")
    result = lpgw("db", "salvage", "-c", str(config_for(pristine.state)))
    assert result.returncode == 1
    assert "nothing can be read" in result.stderr and "backup" in result.stderr
    assert "Traceback" not in result.stderr
    assert not Path(f"{db}.salvaged").exists()


# --- the token secret --------------------------------------------------------------------


async def test_a_lost_database_keeps_every_token(pristine, devices):
    for name in ("lpgw.sqlite3", "lpgw.sqlite3-wal", "lpgw.sqlite3-shm"):
        (pristine.state / name).unlink(missing_ok=True)
    async with restarted(pristine, devices) as (gp, _):
        pass
    out = "".join(gp.lines) + gp.proc.stdout.read().decode()
    assert "there was no database" in out and "restore it from the backup" in out, out


async def test_an_older_database_s_secret_moves_into_its_own_file(pristine, devices):
    secret_file = pristine.state / "token.secret"
    secret = bytes.fromhex(secret_file.read_text())
    secret_file.unlink()  # as every state directory before this version
    async with restarted(pristine, devices):
        pass
    assert bytes.fromhex(secret_file.read_text()) == secret
    assert secret_file.stat().st_mode & 0o777 == 0o600


def test_a_secret_file_that_disagrees_with_the_database_stops_the_start(pristine):
    secret_file = pristine.state / "token.secret"
    secret_file.write_text(os.urandom(32).hex() + "\n")  # say, another box's backup
    db = pristine.state / "lpgw.sqlite3"
    before = db.read_bytes()
    out = refused_start(config_for(pristine.state))
    assert "hold different token secrets" in out and "Put back" in out, out
    assert db.read_bytes() == before


# --- stop ----------------------------------------------------------------------------------


async def test_sigterm_drains_and_closes_the_store_when_a_stop_step_fails(tmp_path, devices):
    """The control socket's path turned into a directory: removing it fails at stop. The
    phones still get `bye shutdown`, the store is still closed, the exit status is 0."""
    gp = GatewayProcess(tmp_path / "state", 0, {"listen": {"host": "127.0.0.1", "port": 0}})
    gp.start()
    phone = devices(gp.handle(), "tls", reconnect=False)
    token = await phone.welcome()
    assert (await send(gp.handle(), token))["ok"]
    sock = gp.state / "control.sock"
    sock.unlink()
    (sock / "in-the-way").mkdir(parents=True)
    gp.proc.send_signal(signal.SIGTERM)
    bye = await phone.next("disconnected", timeout=10)
    assert bye["reason"] == "shutdown"
    assert await asyncio.to_thread(gp.proc.wait, 15) == 0
    out = gp.proc.stdout.read().decode()
    assert "internal error in stop (control)" in out, out
    wal = gp.state / "lpgw.sqlite3-wal"
    assert not wal.exists() or wal.stat().st_size == 0, "the store was closed (checkpointed)"


# --- backup and restore (hardware.md) ----------------------------------------------------


async def test_a_backup_taken_while_running_restores_pin_tokens_and_pushes(tmp_path, devices):
    state = tmp_path / "state"
    async with a_phone_with_a_push_waiting(state, devices) as (gp, install, token, kept):
        backup = lpgw("db", "backup", "-c", str(gp.config_path), "--to",
                      str(tmp_path / "backup"))
        assert backup.returncode == 0, backup.stderr
        assert json.loads(backup.stdout)["devices"] == 1
        assert (await send(gp.handle(), token, {"n": "after the backup"}))["ok"]
    pin = gp.pin
    assert sorted(p.name for p in (tmp_path / "backup").iterdir()) == [
        "gateway.crt", "gateway.key", "lpgw.sqlite3", "token.secret"]
    assert all(p.stat().st_mode & 0o077 == 0 for p in (tmp_path / "backup").iterdir())

    shutil.rmtree(state)  # the card died; a new one, and the backup copied back
    shutil.copytree(tmp_path / "backup", state)
    gp = GatewayProcess(state, 0, {"listen": {"host": "127.0.0.1", "port": 0}})
    gp.start()
    try:
        assert gp.pin == pin  # phones still trust it
        phone = devices(gp.handle(), "quic", install_id=install)
        assert await phone.welcome() == token  # app servers still reach it
        assert (await phone.next("push"))["id"] == kept
        with pytest.raises(TimeoutError):  # what came after the backup is not in it
            await phone.next("push", timeout=0.5)
    finally:
        gp.kill(signal.SIGTERM)
