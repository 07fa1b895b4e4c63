"""The SQLite store on a real file under tmp_path (never :memory:: WAL needs a file)."""

from __future__ import annotations

import shutil
import sqlite3
import stat
import subprocess
import sys
import time
from contextlib import closing

import pytest

from gateway.store import SCHEMA_VERSION, Store, StoreError
from tests.conftest import ROOT

NOW = 1_800_000_000.0
TOKEN = "a" * 64
OTHER = "b" * 64
TOPIC = "com.example.app"


@pytest.fixture
def path(tmp_path):
    return tmp_path / "state" / "lpgw.db"


@pytest.fixture
def store(path):
    s = Store(path)
    yield s
    s.close()


def device(s: Store, token: str = TOKEN, now: float = NOW, **kw) -> None:
    s.record_device(token, kw.get("topic", TOPIC), kw.get("push_types", ("alert", "voip")),
                    kw.get("user"), now)


def add(s: Store, n: int, token: str = TOKEN, collapse_id: str | None = None,
        expiration: int = int(NOW) + 3600, limit: int = 256, now: float = NOW):
    return s.accept_push(token, f"id-{n}", "alert", 10, expiration, collapse_id,
                      f'{{"n":{n}}}', now, limit)


def other_connection(path) -> closing[sqlite3.Connection]:
    """A second, independent connection to the same file (closed on exit)."""
    return closing(sqlite3.connect(path))


# --- opening ---------------------------------------------------------------------------


def test_schema_is_created_on_a_new_file(store, path):
    assert path.is_file()
    with other_connection(path) as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"meta", "devices", "pushes"} <= tables
    assert {"devices_user", "pushes_expiration"} <= indexes
    assert store.get_meta("schema_version") == str(SCHEMA_VERSION).encode()


def test_wal_mode_and_synchronous(path):
    s = Store(path)
    try:
        assert s._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert s._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL by default
        assert s._db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    finally:
        s.close()
    # WAL is a property of the file: another connection sees it too
    with other_connection(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"

    s = Store(path, synchronous="NORMAL")
    try:
        assert s._db.execute("PRAGMA synchronous").fetchone()[0] == 1
    finally:
        s.close()


def test_database_files_are_private(store, path):
    device(store)
    add(store, 1)
    for p in path.parent.iterdir():
        if p.name.startswith(path.name):
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, p.name


def test_integrity_is_ok(store):
    device(store)
    add(store, 1)
    assert store.integrity() == "ok"


def test_data_survives_reopening(path):
    s = Store(path)
    device(s, user="alice")
    add(s, 1)
    add(s, 2)
    s.ack_through(TOKEN, 1, NOW + 1)
    s.close()
    assert not path.with_name(path.name + "-wal").exists() or \
        path.with_name(path.name + "-wal").stat().st_size == 0  # close checkpoints the WAL

    s = Store(path)
    try:
        d = s.device(TOKEN)
        assert d is not None
        assert d.user == "alice"
        assert d.push_types == ("alert", "voip")
        assert d.acked_seq == 1
        assert [(p.seq, p.push_id) for p in s.pending_after(TOKEN, 0)] == [(2, "id-2")]
        # sequence numbers continue; they are never reused after a restart
        stored, _, _ = add(s, 3)
        assert stored.seq == 3
        assert s.get_meta("schema_version") == str(SCHEMA_VERSION).encode()
    finally:
        s.close()


def test_newer_schema_is_refused(path):
    s = Store(path)
    s.set_meta("schema_version", str(SCHEMA_VERSION + 1).encode())
    s.close()
    with pytest.raises(StoreError, match="newer"):
        Store(path)


def test_newer_schema_is_refused_without_writing_to_it(path):
    """A database from a newer lpgw (say it renamed `pushes`) must be left as it is."""
    path.parent.mkdir(parents=True)
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL)")
        db.execute("INSERT INTO meta VALUES ('schema_version', ?)",
                   (str(SCHEMA_VERSION + 1).encode(),))
        db.execute("CREATE TABLE queue (token TEXT, seq INTEGER)")
    with pytest.raises(StoreError):
        Store(path)
    with other_connection(path) as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {"meta", "queue"}


def test_same_schema_version_opens(path):
    Store(path).close()
    s = Store(path)
    s.close()


def test_get_or_create_meta_makes_once_and_persists(path):
    calls: list[int] = []

    def make() -> bytes:
        calls.append(1)
        return b"secret-%d" % len(calls)

    s = Store(path)
    assert s.get_or_create_meta("token_secret", make) == b"secret-1"
    assert s.get_or_create_meta("token_secret", make) == b"secret-1"
    s.close()
    s = Store(path)
    try:
        assert s.get_or_create_meta("token_secret", make) == b"secret-1"
    finally:
        s.close()
    assert len(calls) == 1


# --- devices ---------------------------------------------------------------------------


def test_upsert_device_keeps_topic_and_created_at(store):
    device(store, now=NOW, user="alice")
    device(store, now=NOW + 50, push_types=("voip",), user="bob", topic="com.example.other")
    d = store.device(TOKEN)
    assert d.topic == TOPIC
    assert d.created_at == NOW
    assert d.last_seen == NOW + 50
    assert d.push_types == ("voip",)
    assert d.user == "bob"
    assert d.acked_seq == 0 and d.next_seq == 1
    assert store.count_devices() == 1
    assert store.device(OTHER) is None


def test_touch_updates_last_seen(store):
    device(store)
    store.seen(TOKEN, NOW + 9)
    assert store.device(TOKEN).last_seen == NOW + 9


def test_unregister_deletes_pushes_and_upsert_registers_again(store):
    device(store)
    device(store, OTHER)
    add(store, 1)
    add(store, 2)
    add(store, 3, token=OTHER)
    store.unregister(TOKEN, NOW + 5)
    d = store.device(TOKEN)
    assert d.unregistered_at == NOW + 5
    assert store.count_pending(TOKEN) == 0
    assert store.count_pending(OTHER) == 1  # nobody else's
    device(store, now=NOW + 6)
    assert store.device(TOKEN).unregistered_at is None


# --- pushes ----------------------------------------------------------------------------


def test_add_push_assigns_increasing_seqs_and_is_committed(store, path):
    device(store)
    first, collapsed, evicted = add(store, 1)
    second, _, _ = add(store, 2)
    assert (first.seq, second.seq) == (1, 2)
    assert first.token == TOKEN and first.push_id == "id-1" and first.payload_json == '{"n":1}'
    assert collapsed == [] and evicted == []
    assert store.device(TOKEN).next_seq == 3
    # committed: another connection sees both at once
    with other_connection(path) as db:
        assert db.execute("SELECT count(*) FROM pushes").fetchone()[0] == 2


def test_add_push_collapses_same_collapse_id(store):
    device(store)
    add(store, 1, collapse_id="c")
    add(store, 2, collapse_id="d")
    stored, collapsed, evicted = add(store, 3, collapse_id="c")
    assert collapsed == ["id-1"]
    assert evicted == []
    assert stored.seq == 3
    assert [p.push_id for p in store.pending_after(TOKEN, 0)] == ["id-2", "id-3"]
    # no collapse id collapses nothing
    _, collapsed, _ = add(store, 4)
    assert collapsed == []


def test_add_push_evicts_the_oldest_over_the_limit(store):
    device(store)
    for n in (1, 2, 3):
        assert add(store, n, limit=3)[2] == []
    _, _, evicted = add(store, 4, limit=3)
    assert evicted == ["id-1"]
    _, _, evicted = add(store, 5, limit=2)
    assert sorted(evicted) == ["id-2", "id-3"]
    assert [p.seq for p in store.pending_after(TOKEN, 0)] == [4, 5]


def test_add_push_to_unknown_device_fails_and_stores_nothing(store):
    with pytest.raises(StoreError):
        add(store, 1)
    assert store.count_pending(TOKEN) == 0
    assert not store._db.in_transaction  # rolled back, not left open
    device(store)
    assert add(store, 1)[0].seq == 1


def test_next_seq_takes_a_number_without_storing(store):
    device(store)
    assert store.next_seq(TOKEN) == 1
    assert store.next_seq(TOKEN) == 2
    assert store.count_pending(TOKEN) == 0
    assert add(store, 1)[0].seq == 3
    with pytest.raises(StoreError):
        store.next_seq(OTHER)


def test_pending_is_in_seq_order_after_a_seq(store):
    device(store)
    device(store, OTHER)
    for n in range(1, 6):
        add(store, n)
    add(store, 99, token=OTHER)
    assert [p.seq for p in store.pending_after(TOKEN, 0)] == [1, 2, 3, 4, 5]
    assert [p.seq for p in store.pending_after(TOKEN, 3)] == [4, 5]
    assert store.pending_after(TOKEN, 5) == []
    assert [p.push_id for p in store.pending_after(OTHER, 0)] == ["id-99"]
    assert store.count_pending(TOKEN) == 5


def test_ack_returns_accepted_times_and_raises_acked_seq(store):
    device(store)
    for n in (1, 2, 3):
        add(store, n, now=NOW + n)
    assert sorted(t for _, t in store.ack_through(TOKEN, 2, NOW + 10)) == [NOW + 1, NOW + 2]
    d = store.device(TOKEN)
    assert d.acked_seq == 2
    assert d.last_seen == NOW + 10
    assert [p.seq for p in store.pending_after(TOKEN, 0)] == [3]
    assert store.ack_through(TOKEN, 2, NOW + 11) == []
    # acked_seq never goes down, and never past what was handed out
    store.ack_through(TOKEN, 1, NOW + 12)
    assert store.device(TOKEN).acked_seq == 2
    assert [t for _, t in store.ack_through(TOKEN, 1000, NOW + 13)] == [NOW + 3]
    assert store.device(TOKEN).acked_seq == 3


def test_delete_pushes(store):
    device(store)
    for n in (1, 2, 3):
        add(store, n)
    store.drop_pushes(TOKEN, [1, 3])
    assert [p.seq for p in store.pending_after(TOKEN, 0)] == [2]


def test_expire_drops_only_pushes_past_expiration(store):
    device(store)
    device(store, OTHER)
    add(store, 1, expiration=int(NOW) + 10)
    add(store, 2, expiration=int(NOW) + 100)
    add(store, 3, expiration=0)  # now-or-never rows are not swept by time
    add(store, 4, token=OTHER, expiration=int(NOW) + 20)
    assert store.expire(NOW + 10) == []  # not past yet at the second itself
    gone = store.expire(NOW + 50)
    assert sorted(gone) == [(TOKEN, "id-1"), (OTHER, "id-4")]
    assert [p.push_id for p in store.pending_after(TOKEN, 0)] == ["id-2", "id-3"]
    assert store.expire(NOW + 50) == []


FSYNC_SCRIPT = """
import sys
import time
from gateway.store import Store
s = Store(sys.argv[1])
def mark(name):
    sys.stderr.write(f"MARK {name}\\n"); sys.stderr.flush()
mark("connects")
for i in range(20):
    s.record_device(f"{i:064x}", "t", ("alert",), None, 1.0 + i)
    s.seen(f"{i:064x}", 2.0 + i)
mark("pushes")
for i in range(5):
    s.accept_push(f"{i:064x}", f"p{i}", "alert", 10, 0, None, "{}", 3.0, 100)
mark("end")
s.close()
"""


@pytest.mark.skipif(not shutil.which("strace"), reason="strace is not installed")
def test_connects_cost_no_fsync_and_every_accepted_push_does(tmp_path):
    """A reconnect storm must not wait on the disk; an accepted push must be on it."""
    trace = tmp_path / "trace"
    subprocess.run(["strace", "-f", "-qq", "-o", str(trace), "-e", "trace=fsync,fdatasync,write",
                    sys.executable, "-c", FSYNC_SCRIPT, str(tmp_path / "db")],
                   check=True, capture_output=True, timeout=60, cwd=ROOT)
    counts: dict[str, int] = {}
    phase = "open"
    for line in trace.read_text().splitlines():
        if "MARK " in line:
            phase = line.split("MARK ")[1].split("\\")[0]
        elif "fsync(" in line or "fdatasync(" in line:
            counts[phase] = counts.get(phase, 0) + 1
    assert counts.get("connects", 0) == 0, counts
    assert counts.get("pushes", 0) >= 5, counts


def test_the_checkpointer_moves_the_wal_into_the_database_off_the_caller(path):
    """Checkpoints run in their own thread (not inside a COMMIT of the event loop): the
    database file grows while the caller only commits, far below SQLite's own threshold."""
    s = Store(path)
    s.start_checkpointer(every=0.05)
    assert s._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 16384
    time.sleep(0.2)  # the schema is checkpointed
    before = path.stat().st_size
    for i in range(300):
        s.record_device(f"{i:064x}", TOPIC, ("alert",), None, NOW)
    deadline = time.monotonic() + 5
    while path.stat().st_size == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.stat().st_size > before  # only a checkpoint writes the database file
    thread = s._checkpointer[1]
    s.close()
    assert not thread.is_alive()
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT count(*) FROM devices").fetchone()[0] == 300


def test_unsynced_writes_join_an_open_group_commit_instead_of_waiting_on_it(store):
    """Inside a group commit the main connection holds the write lock: a device seen or an
    ack must go into that transaction (through the other connection it would wait for ever
    in this same thread) and is undone with it."""
    device(store)
    store.begin()
    add(store, 1)
    device(store, OTHER)
    store.ack_through(TOKEN, 1, NOW + 5)
    store.seen(TOKEN, NOW + 6)
    store.rollback()
    assert store.device(OTHER) is None
    assert store.device(TOKEN).last_seen == NOW
    store.begin()
    device(store, OTHER)
    store.commit()
    assert store.device(OTHER) is not None


KILL_SCRIPT = """
import os, signal, sys
from gateway.store import Store
s = Store(sys.argv[1])
s.record_device("a" * 64, "t", ("alert",), "nurse-1", 1.0)
s.seen("a" * 64, 7.0)
s.accept_push("a" * 64, "p1", "alert", 10, 0, None, "{}", 3.0, 100)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_device_written_without_fsync_is_durable_once_a_push_to_it_is(path):
    """The unsynced connection shares the WAL: the push's FULL commit carries the row."""
    run = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(path)], cwd=ROOT,
                         capture_output=True, timeout=60)
    assert run.returncode == -9, run.stderr
    s = Store(path)
    try:
        d = s.device("a" * 64)
        assert (d.user, d.last_seen, d.next_seq) == ("nurse-1", 7.0, 2)
        assert [p.push_id for p in s.pending_after("a" * 64, 0)] == ["p1"]
    finally:
        s.close()


def test_a_schema_1_database_is_brought_up_to_date_in_place(tmp_path):
    """What lpgw before issue 15 wrote (no user_expires) opens with every row kept; its
    bindings were all made for good."""
    path = tmp_path / "old.sqlite3"
    with closing(sqlite3.connect(path)) as db:
        db.executescript(
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);"
            "CREATE TABLE devices (token TEXT PRIMARY KEY, topic TEXT NOT NULL, push_types "
            "TEXT NOT NULL, user TEXT, created_at REAL NOT NULL, last_seen REAL NOT NULL, "
            "acked_seq INTEGER NOT NULL DEFAULT 0, next_seq INTEGER NOT NULL DEFAULT 1, "
            "unregistered_at REAL);"
            "CREATE TABLE pushes (token TEXT NOT NULL, seq INTEGER NOT NULL, push_id TEXT NOT "
            "NULL, push_type TEXT NOT NULL, priority INTEGER NOT NULL, expiration INTEGER NOT "
            "NULL, collapse_id TEXT, payload TEXT NOT NULL, accepted_at REAL NOT NULL, "
            "PRIMARY KEY (token, seq)) WITHOUT ROWID;"
            "INSERT INTO meta VALUES ('schema_version', '1');")
        db.execute("INSERT INTO devices(token, topic, push_types, user, created_at, last_seen)"
                   " VALUES (?, 'com.example.app', '[\"alert\"]', 'nurse', 1, ?)",
                   ("ab" * 32, time.time()))
        db.commit()
    store = Store(path)
    try:
        assert store.get_meta("schema_version") == str(SCHEMA_VERSION).encode() == b"2"
        assert store.device("ab" * 32).user_expires is None
        assert store.devices_of_user("nurse") == ["ab" * 32]
        # a hello with an assertion binds until it ends; one without ends that binding
        store.record_device("ab" * 32, "com.example.app", ("alert",), "porter", 10.0, 100.0)
        assert store.devices_of_user("porter", now=99.0) == ["ab" * 32]
        assert store.devices_of_user("porter", now=100.0) == []
        store.record_device("ab" * 32, "com.example.app", ("alert",), None, 11.0)
        assert store.device("ab" * 32).user is None
    finally:
        store.close()


def test_a_page_of_devices_for_the_console(store):
    """The console's list: newest seen first, a page at a time, a search in token, app or
    user (any case), and %, _ and \\ in a search taken literally."""
    for i in range(120):
        device(store, f"{i:064x}", now=NOW + i, topic="com.example.nurse" if i % 2 else "x.y",
               user="Ward_3%" if i == 7 else None)
    total, page = store.device_page("", 0, 50)
    assert total == 120 and len(page) == 50
    assert page[0].token == f"{119:064x}" and page[49].token == f"{70:064x}"
    total, page = store.device_page("", 100, 50)
    assert total == 120 and len(page) == 20
    assert store.device_page("NURSE", 0, 50)[0] == 60
    assert [d.token for d in store.device_page("ward_3%", 0, 50)[1]] == [f"{7:064x}"]
    assert store.device_page("ward_3_", 0, 50)[0] == 0  # _ is not a wildcard
    assert store.device_page("3%", 0, 50)[0] == 1  # % is a percent sign
    assert store.device_page("\\", 0, 50)[0] == 0
