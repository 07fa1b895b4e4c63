"""SQLite (WAL) persistence: devices and their queued pushes.

Every write that a caller is told about has been committed (synchronous=FULL by default), so
a push the gateway accepted survives SIGKILL and, on a Pi, a pulled plug.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import sqlite3
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from gateway.records import DeviceRecord, StorageFailed, StoredPush, is_token

log = logging.getLogger("lpgw.store")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    token TEXT PRIMARY KEY,
    topic TEXT NOT NULL,
    push_types TEXT NOT NULL,
    user TEXT,
    created_at REAL NOT NULL,
    last_seen REAL NOT NULL,
    acked_seq INTEGER NOT NULL DEFAULT 0,
    next_seq INTEGER NOT NULL DEFAULT 1,
    unregistered_at REAL,
    user_expires REAL
);
CREATE INDEX IF NOT EXISTS devices_user ON devices(user);
CREATE INDEX IF NOT EXISTS devices_last_seen ON devices(last_seen);
CREATE TABLE IF NOT EXISTS pushes (
    token TEXT NOT NULL REFERENCES devices(token) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    push_id TEXT NOT NULL,
    push_type TEXT NOT NULL,
    priority INTEGER NOT NULL,
    expiration INTEGER NOT NULL,
    collapse_id TEXT,
    payload TEXT NOT NULL,
    accepted_at REAL NOT NULL,
    PRIMARY KEY (token, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS pushes_expiration ON pushes(expiration) WHERE expiration > 0;
"""
SCHEMA_VERSION = 2
# what each older schema needs to become this one (run in order, in one transaction)
MIGRATIONS = {
    # 2: a user binding made by a device's assertion ends when the assertion does
    1: "ALTER TABLE devices ADD COLUMN user_expires REAL",
}


_DEVICE_COLUMNS = ("token, topic, push_types, user, created_at, last_seen, acked_seq, next_seq, "
                   "unregistered_at, user_expires")


def _device(row: tuple) -> DeviceRecord:
    return DeviceRecord(row[0], row[1], tuple(json.loads(row[2])), row[3], row[4], row[5],
                        row[6], row[7], row[8], row[9])


# SQLite's own checkpoint, once the WAL is this many pages (~64 MiB), if ours falls behind
BACKSTOP_CHECKPOINT_PAGES = 16384


class StoreError(Exception):
    pass


class DamagedStore(StoreError):
    """The database file is damaged: running on it would serve wrong data or fail later,
    so the gateway refuses to start and says what to do instead."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"the database {path} is damaged: {problem}")
        self.path = path
        self.problem = problem


class SecretMismatch(StoreError):
    """The token-secret file and the database disagree: starting would change every
    phone's device token (app servers would push into the void)."""


def _failed(exc: sqlite3.Error) -> StorageFailed:
    full = (getattr(exc, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_FULL
    return StorageFailed(str(exc), full)  # SQLite's words: "database or disk is full"


_F = TypeVar("_F", bound=Callable[..., Any])
# programming errors stay what they are; everything else is the storage's state
_OUR_BUGS = (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError,
             sqlite3.NotSupportedError, sqlite3.DataError)


def _storage(method: _F) -> _F:
    """Turn the storage's failures into StorageFailed, so the core can refuse cleanly
    (503, bye unavailable) without knowing SQLite."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, _OUR_BUGS):
                raise
            raise _failed(exc) from None

    return wrapper  # type: ignore[return-value]


SQLITE_MAGIC = b"SQLite format 3\x00"


def check_header(path: Path) -> None:
    """Refuse a database file that is empty or has no SQLite header (DamagedStore).

    SQLite takes an empty file for a new database: the gateway would run on silently with
    every device gone.
    """
    size = path.stat().st_size
    if size == 0:
        raise DamagedStore(path, "the file is empty (0 bytes): every device, queued push "
                                 "and user binding it held is gone")
    with path.open("rb") as f:
        head = f.read(100)
    if len(head) < 100 or not head.startswith(SQLITE_MAGIC):
        raise DamagedStore(path, "it does not start with SQLite's header (overwritten, "
                                 "truncated or not a database)")


def quick_check(db: sqlite3.Connection, path: Path) -> None:
    """SQLite's own check of every page (DamagedStore if it fails or cannot run).

    SQLite reads around a damaged page until a query reaches it: without this the gateway
    would start, then fail on one device's pushes at 3 a.m.
    """
    try:
        rows = [r[0] for r in db.execute("PRAGMA quick_check(20)")]
    except sqlite3.DatabaseError as exc:
        raise DamagedStore(path, f"SQLite cannot read it ({exc})") from None
    if rows != ["ok"]:
        more = f" (and {len(rows) - 1} more problems)" if len(rows) > 1 else ""
        raise DamagedStore(path, f"SQLite's quick_check found: {rows[0]}{more}")


def _create(path: Path) -> None:
    """A new database, made under another name and renamed into place: a file at `path`
    has always been a whole database, so an empty or half-made one is damage to report,
    never a first start to take silently."""
    for suffix in ("-wal", "-shm"):
        orphan = Path(f"{path}{suffix}")
        if orphan.exists():  # its database is gone: SQLite must not apply it to a new one
            aside = orphan.with_name(f"{orphan.name}.orphaned-{int(time.time())}")
            orphan.rename(aside)
            log.warning("%s had no database beside it: moved aside to %s", orphan, aside)
    tmp = path.with_name(path.name + ".new")
    for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
        leftover.unlink(missing_ok=True)
    db = sqlite3.connect(tmp, isolation_level=None)
    try:
        os.chmod(tmp, 0o600)
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(SCHEMA)  # its schema_version is written on opening, as ever
    finally:
        db.close()  # checkpoints: the whole database is in `tmp` now
    _put_in_place(tmp, path)


def _put_in_place(tmp: Path, path: Path) -> None:
    """Rename a finished file over `path`, durably: never a half-written one there."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in `directory` survive a power cut."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Store:
    def __init__(self, path: str | Path, synchronous: str = "FULL") -> None:
        self.path = Path(path)
        self.synchronous = synchronous
        self._checkpointer: tuple[threading.Event, threading.Thread] | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # True when this opening made the file: a database that was there before and is
        # gone now is worth a warning (its queued pushes and bindings went with it)
        self.created = not self.path.exists()
        if self.created:
            _create(self.path)
        else:
            check_header(self.path)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            if not self.created:
                quick_check(self._db, self.path)  # before anything writes to it
            self._open()
        except BaseException:
            self._db.close()
            raise

    def _open(self) -> None:
        os.chmod(self.path, 0o600)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={self.synchronous}")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, "
                         "value BLOB NOT NULL)")
        version = self.get_meta("schema_version")
        if version is not None and int(version) > SCHEMA_VERSION:
            raise StoreError(f"{self.path} was written by a newer lpgw (schema {int(version)})")
        if version is not None and int(version) < SCHEMA_VERSION:
            self._migrate(int(version))
        self._db.executescript(SCHEMA)
        if version is None:
            self.set_meta("schema_version", str(SCHEMA_VERSION).encode())
        # Writes that are worth no fsync (a device seen, an ack) go through a second
        # connection that is always synchronous=NORMAL, rather than switching the main one
        # back and forth around each (two more statements per reconnect). The WAL is one
        # file: the next FULL commit's fsync carries these frames to disk too.
        self._lazy = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._lazy.execute("PRAGMA synchronous=NORMAL")
        self._lazy.execute("PRAGMA foreign_keys=ON")
        self._lazy.execute("PRAGMA busy_timeout=5000")

    def _migrate(self, version: int) -> None:
        """Bring a database an older lpgw wrote up to SCHEMA_VERSION, all or nothing."""
        with self._tx():
            for step in range(version, SCHEMA_VERSION):
                self._db.execute(MIGRATIONS[step])
            self.set_meta("schema_version", str(SCHEMA_VERSION).encode())
        log.info("%s: schema %d brought up to %d", self.path, version, SCHEMA_VERSION)

    def start_checkpointer(self, every: float = 1.0) -> None:
        """Copy the WAL into the database from a thread of its own, every `every` seconds.

        Left to SQLite, a checkpoint runs inside whichever COMMIT crosses 1,000 pages: at
        2,000 pushes/s that was a ~100 ms stall of the event loop every few seconds, seen as
        the API's p99. sqlite3 releases the GIL while it works, so the loop goes on; SQLite's
        own checkpoint stays as a backstop at a much larger WAL.
        """
        if self._checkpointer is not None:
            return
        self._db.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP_CHECKPOINT_PAGES}")
        stop = threading.Event()

        def run() -> None:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            failing = False  # a full disk fails every second: say so once, and when it ends
            try:
                db.execute(f"PRAGMA synchronous={self.synchronous}")
                while not stop.wait(every):
                    try:
                        db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    except sqlite3.Error as exc:  # busy or full disk: the backstop remains
                        if not failing:
                            log.warning("WAL checkpoint failed: %s (retrying every %g s; "
                                        "said once until it works again)", exc, every)
                        failing = True
                    else:
                        if failing:
                            log.warning("WAL checkpoint works again")
                        failing = False
            finally:
                db.close()

        thread = threading.Thread(target=run, name="lpgw-checkpoint", daemon=True)
        thread.start()
        self._checkpointer = (stop, thread)

    def close(self) -> None:
        """Close for good; a checkpoint that cannot run (full disk) leaves the WAL to the
        next start, which reads it back: nothing committed is lost, so nothing raises."""
        if self._checkpointer is not None:
            stop, thread = self._checkpointer
            stop.set()
            thread.join(10)
            self._checkpointer = None
        self._lazy.close()
        try:
            _rollback(self._db)
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            log.warning("closing the store without a final checkpoint (%s): the next start "
                        "reads the WAL back", exc)
        finally:
            self._db.close()

    # meta

    def get_meta(self, key: str) -> bytes | None:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else bytes(row[0]) if isinstance(row[0], bytes) else row[0]

    def set_meta(self, key: str, value: bytes) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def get_or_create_meta(self, key: str, make) -> bytes:
        with self._tx():
            value = self.get_meta(key)
            if value is None:
                value = make()
                self.set_meta(key, value)
        return value

    # devices

    @_storage
    def record_device(self, token: str, topic: str, push_types: tuple[str, ...],
                      user: str | None, now: float,
                      user_expires: float | None = None) -> DeviceRecord:
        """Without an fsync of its own: a reconnect storm must not wait on the disk, and a
        row lost to a power cut is written again when the phone reconnects; every accepted
        push is a FULL commit, which makes this row durable before it.

        `user` with `user_expires` is a binding from the device's assertion, until then;
        without a user, a binding an earlier assertion made ends (one the API made stays)."""
        row = self._relaxed().execute(
            f"""INSERT INTO devices(token, topic, push_types, user, created_at, last_seen,
                                    user_expires)
                VALUES (?, ?, ?, ?, ?, ?, ?)
                ON CONFLICT(token) DO UPDATE SET push_types=excluded.push_types,
                  user=CASE WHEN excluded.user IS NOT NULL THEN excluded.user
                            WHEN devices.user_expires IS NOT NULL THEN NULL
                            ELSE devices.user END,
                  user_expires=CASE WHEN excluded.user IS NOT NULL THEN excluded.user_expires
                                    ELSE NULL END,
                  last_seen=excluded.last_seen, unregistered_at=NULL
                RETURNING {_DEVICE_COLUMNS}""",
            (token, topic, json.dumps(list(push_types)), user, now, now, user_expires),
        ).fetchone()
        return _device(row)

    @_storage
    def mirror_device(self, record: DeviceRecord) -> None:
        """Take a device record as the site has it (another gateway recorded it): this
        gateway's copy, so a push for a device held elsewhere is checked here without I/O.
        Without an fsync: the site keeps the record, and hands it over again at start."""
        self._relaxed().execute(
            """INSERT INTO devices(token, topic, push_types, user, created_at, last_seen,
                                   unregistered_at, user_expires)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT(token) DO UPDATE SET topic=excluded.topic,
                 push_types=excluded.push_types, user=excluded.user,
                 last_seen=max(devices.last_seen, excluded.last_seen),
                 unregistered_at=excluded.unregistered_at,
                 user_expires=excluded.user_expires""",
            (record.token, record.topic, json.dumps(list(record.push_types)), record.user,
             record.created_at, record.last_seen, record.unregistered_at,
             record.user_expires))

    @_storage
    def device(self, token: str) -> DeviceRecord | None:
        row = self._db.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE token=?",
                               (token,)).fetchone()
        return None if row is None else _device(row)

    @_storage
    def devices(self, topics: tuple[str, ...] | None = None,
                     user: str | None = None) -> list[DeviceRecord]:
        """Devices, optionally only those of some topics and/or one user."""
        sql = f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE 1=1"
        args: list = []
        if topics is not None:
            sql += f" AND topic IN ({','.join('?' * len(topics))})"
            args.extend(topics)
        if user is not None:
            sql += " AND user=?"
            args.append(user)
        return [_device(r) for r in self._db.execute(sql + " ORDER BY last_seen DESC", args)]

    @_storage
    def device_page(self, search: str, offset: int, limit: int
                    ) -> tuple[int, list[DeviceRecord]]:
        """One page of devices, the most recently seen first, those whose token, topic or
        user contain `search` (any case): (how many match, the page). For the console: a
        page costs an index walk, not every record."""
        where, args = "", []
        if search:
            pattern = "%" + search.replace("\\", "\\\\").replace("%", "\\%").replace(
                "_", "\\_") + "%"
            where = (" WHERE token LIKE ? ESCAPE '\\' OR topic LIKE ? ESCAPE '\\'"
                     " OR user LIKE ? ESCAPE '\\'")
            args = [pattern] * 3
        total = self._db.execute(f"SELECT count(*) FROM devices{where}", args).fetchone()[0]
        rows = self._db.execute(
            f"SELECT {_DEVICE_COLUMNS} FROM devices{where} ORDER BY last_seen DESC "
            "LIMIT ? OFFSET ?", [*args, limit, offset])
        return total, [_device(r) for r in rows]

    @_storage
    def devices_of_user(self, user: str, now: float | None = None,
                  topics: tuple[str, ...] | None = None) -> list[str]:
        """The registered devices bound to a user, most recently seen first (every call),
        only of `topics` when given; a binding from an assertion that has expired by `now`
        (default: the wall clock) no longer counts."""
        now = time.time() if now is None else now
        sql = """SELECT token FROM devices WHERE user=? AND unregistered_at IS NULL
                 AND (user_expires IS NULL OR user_expires > ?)"""
        args: list = [user, now]
        if topics is not None:
            sql += f" AND topic IN ({','.join('?' * len(topics))})"
            args.extend(topics)
        return [r[0] for r in self._db.execute(sql + " ORDER BY last_seen DESC", args)]

    @_storage
    def bind_user(self, token: str, user: str | None) -> bool:
        """Bind a device to a user (None unbinds) for good; False when there is no such
        device."""
        cur = self._db.execute("UPDATE devices SET user=?, user_expires=NULL WHERE token=?",
                               (user, token))
        return cur.rowcount == 1

    @_storage
    def pending_counts(self) -> dict[str, int]:
        return dict(self._db.execute("SELECT token, count(*) FROM pushes GROUP BY token"))

    @_storage
    def seen(self, token: str, now: float) -> None:
        self._relaxed().execute("UPDATE devices SET last_seen=? WHERE token=?", (now, token))

    @_storage
    def unregister(self, token: str, now: float) -> None:
        with self._tx():
            self._db.execute("UPDATE devices SET unregistered_at=?, last_seen=? WHERE token=?",
                             (now, now, token))
            self._db.execute("DELETE FROM pushes WHERE token=?", (token,))

    @_storage
    def prune_devices(self, unseen_since: float, keep: set[str], limit: int) -> list[str]:
        """Delete up to `limit` devices last seen before `unseen_since` (not those in
        `keep`), with their pushes; the ones that went."""
        with self._tx():
            tokens = [r[0] for r in self._db.execute(
                "SELECT token FROM devices WHERE last_seen < ? ORDER BY last_seen LIMIT ?",
                (unseen_since, limit + len(keep))) if r[0] not in keep][:limit]
            self._db.executemany("DELETE FROM pushes WHERE token=?", [(t,) for t in tokens])
            self._db.executemany("DELETE FROM devices WHERE token=?", [(t,) for t in tokens])
        return tokens

    @_storage
    def count_devices(self) -> int:
        return self._db.execute("SELECT count(*) FROM devices").fetchone()[0]

    # pushes

    @_storage
    def accept_push(self, token: str, push_id: str, push_type: str, priority: int,
                 expiration: int, collapse_id: str | None, payload_json: str, now: float,
                 queue_limit: int) -> tuple[StoredPush, list[str], list[str]]:
        """Queue a push durably; returns it, the ids it collapsed and the ids it evicted."""
        with self._tx():
            collapsed: list[str] = []
            if collapse_id is not None:
                collapsed = [r[0] for r in self._db.execute(
                    "DELETE FROM pushes WHERE token=? AND collapse_id=? RETURNING push_id",
                    (token, collapse_id))]
            row = self._db.execute(
                """UPDATE devices SET next_seq=next_seq+1 WHERE token=?
                   RETURNING next_seq-1, acked_seq""", (token,)).fetchall()
            if not row:
                raise StoreError(f"no device {token[:8]}…")
            seq, acked = row[0]
            self._db.execute(
                """INSERT INTO pushes(token, seq, push_id, push_type, priority, expiration,
                   collapse_id, payload, accepted_at) VALUES (?,?,?,?,?,?,?,?,?)""",
                (token, seq, push_id, push_type, priority, expiration, collapse_id,
                 payload_json, now))
            evicted: list[str] = []
            if seq - acked > queue_limit:  # else fewer are stored than that: nothing to scan
                evicted = [r[0] for r in self._db.execute(
                    """DELETE FROM pushes WHERE token=? AND seq IN (
                         SELECT seq FROM pushes WHERE token=? ORDER BY seq DESC
                         LIMIT -1 OFFSET ?) RETURNING push_id""", (token, token, queue_limit))]
        stored = StoredPush(token, seq, push_id, push_type, priority, expiration, payload_json,
                            collapse_id, now)
        return stored, collapsed, evicted

    @_storage
    def next_seq(self, token: str) -> int:
        """Take a sequence number without storing a push (expiration-0 pushes)."""
        row = self._db.execute(
            "UPDATE devices SET next_seq=next_seq+1 WHERE token=? RETURNING next_seq-1",
            (token,)).fetchall()
        if not row:
            raise StoreError(f"no device {token[:8]}…")
        return row[0][0]

    @_storage
    def pending_after(self, token: str, after_seq: int) -> list[StoredPush]:
        rows = self._db.execute(
            """SELECT token, seq, push_id, push_type, priority, expiration, payload,
                      collapse_id, accepted_at
               FROM pushes WHERE token=? AND seq>? ORDER BY seq""", (token, after_seq))
        return [StoredPush(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8]) for r in rows]

    @_storage
    def count_pending(self, token: str) -> int:
        return self._db.execute("SELECT count(*) FROM pushes WHERE token=?",
                                (token,)).fetchone()[0]

    @_storage
    def ack_through(self, token: str, seq: int, now: float,
            reported_through: int = 0) -> list[tuple[str, float]]:
        """Forget everything up to `seq`; returns (push id, accepted at) of each delivered
        after `reported_through` (those up to it were reported when an ack could not be
        written, see `delivered_through`).

        Without an fsync of its own: an ack lost to a power cut only means a push is sent
        again, and the device drops it by id. The next durable commit carries it to disk.
        """
        db = self._relaxed()
        with _Transaction(db):
            accepted = [(r[0], r[1]) for r in db.execute(
                """DELETE FROM pushes WHERE token=? AND seq<=?
                   RETURNING push_id, accepted_at, seq""", (token, seq))
                        if r[2] > reported_through]
            db.execute(
                """UPDATE devices SET acked_seq=max(acked_seq, min(?, next_seq-1)), last_seen=?
                   WHERE token=?""", (seq, now, token))
        return accepted

    @_storage
    def delivered_through(self, token: str, after: int, seq: int) -> list[tuple[str, float]]:
        """(push id, accepted at) of the stored pushes after `after` up to `seq`: what an
        ack reports when the ack itself cannot be written (full disk)."""
        return [(r[0], r[1]) for r in self._db.execute(
            """SELECT push_id, accepted_at FROM pushes WHERE token=? AND seq>? AND seq<=?
               ORDER BY seq""", (token, after, seq))]

    @_storage
    def probe(self, now: float) -> None:
        """A small write worth no fsync: does the disk take writes again?"""
        self._relaxed().execute(
            "INSERT OR REPLACE INTO meta(key, value) VALUES ('last_write_check', ?)",
            (str(now).encode(),))

    @_storage
    def forget_device(self, token: str) -> bool:
        """Delete a device and its pushes (the self-test's own devices, when done)."""
        with self._tx():
            self._db.execute("DELETE FROM pushes WHERE token=?", (token,))
            return self._db.execute("DELETE FROM devices WHERE token=?",
                                    (token,)).rowcount == 1

    @_storage
    def drop_pushes(self, token: str, seqs: list[int]) -> None:
        with self._tx():
            self._db.executemany("DELETE FROM pushes WHERE token=? AND seq=?",
                                 [(token, s) for s in seqs])

    @_storage
    def shift_times(self, delta: float, expirations: bool) -> None:
        """The wall clock stepped `delta` seconds: move what was stamped before the step
        with it (last seen, unregistered, accepted), so intervals measured from those
        stamps stay true; with `expirations`, the stored pushes' expirations too (a step
        forward: each keeps the time it had left)."""
        with self._tx():
            self._db.execute(
                """UPDATE devices SET last_seen=last_seen+?1, created_at=created_at+?1,
                   unregistered_at=unregistered_at+?1""", (delta,))
            self._db.execute("UPDATE pushes SET accepted_at=accepted_at+?", (delta,))
            if expirations:
                self._db.execute("UPDATE pushes SET expiration=expiration+? WHERE expiration>0",
                                 (round(delta),))

    @_storage
    def expire(self, now: float) -> list[tuple[str, str]]:
        """Drop every stored push whose expiration has passed; returns (token, push id)."""
        with self._tx():
            return [(r[0], r[1]) for r in self._db.execute(
                "DELETE FROM pushes WHERE expiration>0 AND expiration<? RETURNING token, push_id",
                (now,))]

    def integrity(self) -> str:
        return self._db.execute("PRAGMA quick_check").fetchone()[0]

    # group commit: many writes, one fsync

    @_storage
    def begin(self) -> None:
        if not self._db.in_transaction:
            self._db.execute("BEGIN IMMEDIATE")

    @_storage
    def commit(self) -> None:
        """End the open group commit; if it fails, nothing of it stays (rolled back)."""
        if self._db.in_transaction:
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error:
                _rollback(self._db)
                raise

    def rollback(self) -> None:
        _rollback(self._db)

    @property
    def in_group(self) -> bool:
        """A group commit is open (writes wait for `commit`)."""
        return self._db.in_transaction

    # plumbing

    def _tx(self):
        return _Transaction(self._db)

    def _relaxed(self) -> sqlite3.Connection:
        """The connection for a write worth no fsync: the main one inside an open
        transaction (the other would wait on its lock for ever, in this same thread)."""
        return self._db if self._db.in_transaction else self._lazy


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, nestable (inner levels are no-ops)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._outer = False

    def __enter__(self) -> None:
        if not self._db.in_transaction:
            self._db.execute("BEGIN IMMEDIATE")
            self._outer = True

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._outer:
            return
        if exc_type is None:
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error:  # a full disk fails here: leave no transaction open
                _rollback(self._db)
                raise
        else:
            _rollback(self._db)


def _rollback(db: sqlite3.Connection) -> None:
    """ROLLBACK if a transaction is open (SQLite ends some itself on a full disk)."""
    if db.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")


# --- the token secret: a file of its own, so that a lost database keeps every token --------

SECRET_FILE = "token.secret"


def read_secret_file(path: Path) -> bytes | None:
    """The secret in `path` (64 hex characters), None when there is no such file."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        secret = b""
    if len(secret) < 16:
        raise StoreError(f"{path} does not hold a token secret (64 hex characters): restore "
                         "it from the backup of the state directory")
    return secret


def write_secret_file(path: Path, secret: bytes) -> None:
    """Owner-only, written whole or not at all (a half-written secret would be a new one)."""
    tmp = path.with_name(f".{path.name}.new")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secret.hex().encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def token_secret(store: Store, path: Path) -> bytes:
    """The secret every device token is derived from, kept in `path` beside the TLS key.

    In the database alone, losing the database (or finding it empty) meant a new secret:
    every phone's token changed and app servers pushed into the void. Databases of older
    versions hold it: it is copied to the file once. A file and a database that disagree
    are refused (SecretMismatch): one of them belongs to another gateway or another time.
    """
    in_db = store.get_meta("token_secret")
    in_file = read_secret_file(path)
    if in_file is None:
        secret = in_db if in_db is not None else os.urandom(32)
        write_secret_file(path, secret)
        log.info("token secret %s %s", "moved from the database to" if in_db else "made in",
                 path)
    elif in_db is not None and in_db != in_file:
        raise SecretMismatch(
            f"{path} and the database {store.path} hold different token secrets, so devices "
            "would get other tokens than app servers know. Put back this gateway's "
            f"{path.name} from the backup (the one taken with this database), or, if the "
            f"database is the right one, move {path} away: the next start writes it again "
            "from the database")
    else:
        secret = in_file
    if in_db is None:
        store.set_meta("token_secret", secret)  # a restored file is checked against it later
    return secret


# --- backup: a consistent copy of the live database ----------------------------------------


def backup(source: Path, target: Path) -> int:
    """Copy the database to `target` (replaced whole, 0600) while the gateway may be
    writing to it: SQLite's online backup reads one consistent state, the WAL included,
    where a plain `cp` of a live file can copy half of a write. Returns its devices."""
    tmp = target.with_name(f".{target.name}.new")
    tmp.unlink(missing_ok=True)
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        dst = sqlite3.connect(tmp)
        try:
            src.backup(dst)
            dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
            devices = dst.execute("SELECT count(*) FROM devices").fetchone()[0]
        finally:
            dst.close()
    finally:
        src.close()
    _put_in_place(tmp, target)
    return devices


# --- salvage: what a damaged database still holds, into a new one -------------------------


@dataclass
class Salvaged:
    """What `salvage` read, for the operator to judge."""

    meta: list[str] = field(default_factory=list)
    devices: int = 0
    pushes: int = 0
    unreadable: int = 0  # stretches of rows that could not be read and were stepped over
    bad_rows: int = 0  # rows read but not what lpgw writes (garbled by the damage)
    header_rebuilt: bool = False


def salvage(source: Path, target: Path) -> Salvaged:
    """Copy every row that can still be read from the damaged `source` into a new database
    at `target` (which must not exist); `source` is only read (a copy is worked on).

    SQLite stops a query at the first damaged page: this reads each table in key order
    and steps over what cannot be read, so one bad page costs the rows on it, not the
    rest. An overwritten file header is rebuilt on the copy.
    """
    if target.exists():
        raise StoreError(f"{target} exists already: move it away or name another --output")
    if not source.exists():
        raise StoreError(f"there is no database at {source}")
    found = Salvaged()
    with tempfile.TemporaryDirectory(prefix=".salvage-", dir=target.parent) as work:
        copy = Path(work) / "damaged.sqlite3"
        shutil.copyfile(source, copy)
        wal = Path(f"{source}-wal")
        if wal.exists():  # the last commits: read them too
            shutil.copyfile(wal, f"{copy}-wal")
        db = _open_damaged(copy, found)
        try:
            meta = _valid(_scan(db, "SELECT rowid, key, value FROM meta WHERE rowid>? "
                                "ORDER BY rowid", (), -(2**62), found), _meta_row, found)
            columns = _DEVICE_COLUMNS if _has_column(db, "devices", "user_expires") else (
                _DEVICE_COLUMNS.replace("user_expires", "NULL"))  # schema 1
            devices = _valid(_scan(db, f"SELECT rowid, {columns} FROM devices "
                                   "WHERE rowid>? ORDER BY rowid", (), -(2**62), found),
                             _device_row, found)
            pushes = []
            for device in devices:
                pushes += [(device[1], *row) for row in _valid(_scan(
                    db, "SELECT seq, push_id, push_type, priority, expiration, collapse_id, "
                        "payload, accepted_at FROM pushes WHERE token=? AND seq>? ORDER BY seq",
                    (device[1],), -1, found), _push_row, found)]
        finally:
            db.close()
    out = Store(target)
    try:
        with out._tx():
            for _, key, value in meta:
                if key != "schema_version":
                    out.set_meta(key, value)
            next_seq: dict[str, int] = {}
            for p in pushes:  # a push kept whose device row said less: seqs must go on rising
                next_seq[p[0]] = max(next_seq.get(p[0], 0), p[1] + 1)
            out._db.executemany(
                f"INSERT OR IGNORE INTO devices({_DEVICE_COLUMNS}) VALUES "
                "(?,?,?,?,?,?,?,?,?,?)",
                [(*d[1:8], max(d[8], next_seq.get(d[1], 0)), *d[9:]) for d in devices])
            out._db.executemany(
                """INSERT OR IGNORE INTO pushes(token, seq, push_id, push_type, priority,
                   expiration, collapse_id, payload, accepted_at) VALUES (?,?,?,?,?,?,?,?,?)""",
                pushes)
    finally:
        out.close()
    owner = source.stat()
    if os.geteuid() == 0 and (owner.st_uid, owner.st_gid) != (0, 0):
        os.chown(target, owner.st_uid, owner.st_gid)  # the service's user must open it
    found.meta = sorted(k for _, k, _ in meta)
    found.devices, found.pushes = len(devices), len(pushes)
    return found


def _open_damaged(path: Path, found: Salvaged) -> sqlite3.Connection:
    """A connection that can read the schema, rebuilding the file header if it must."""
    problem = _schema_problem(path)
    if problem is None:
        return sqlite3.connect(path)
    if _pad_to_header_size(path) and _schema_problem(path) is None:
        return sqlite3.connect(path)
    wal = Path(f"{path}-wal").exists()
    for page_size in (4096, 1024, 2048, 8192, 16384, 32768, 65536, 512):
        if _write_header(path, page_size, wal) and _schema_problem(path) is None:
            found.header_rebuilt = True
            return sqlite3.connect(path)
    raise StoreError(f"nothing can be read: the list of tables is damaged ({problem}); "
                     "restore the state directory from a backup")


def _schema_problem(path: Path) -> str | None:
    db = sqlite3.connect(path)
    try:
        names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        missing = {"meta", "devices", "pushes"} - names
        return f"no table {', '.join(sorted(missing))}" if missing else None
    except sqlite3.DatabaseError as exc:
        return str(exc)
    finally:
        db.close()


def _pad_to_header_size(path: Path) -> bool:
    """Give a truncated file back the length its header says, in zeros: SQLite refuses a
    file shorter than that outright, but reads the pages that are there."""
    with path.open("rb") as f:
        head = f.read(100)
    if len(head) < 100 or not head.startswith(SQLITE_MAGIC):
        return False
    (page_size,) = struct.unpack(">H", head[16:18])
    page_size = 65536 if page_size == 1 else page_size
    (pages,) = struct.unpack(">I", head[28:32])
    size = path.stat().st_size
    want = max(pages * page_size, -(-size // page_size) * page_size)
    if want <= size:
        return False
    os.truncate(path, want)
    return True


def _write_header(path: Path, page_size: int, wal: bool) -> bool:
    """Put a plausible SQLite header (https://sqlite.org/fileformat.html) on `path`."""
    size = path.stat().st_size
    if size < page_size or size % page_size:
        return False
    version = 2 if wal else 1  # 2: WAL, so the copied -wal is read too
    header = struct.pack(
        ">16sH6B12I20x2I", SQLITE_MAGIC, 1 if page_size == 65536 else page_size,
        version, version, 0, 64, 32, 32,
        1, size // page_size, 0, 0,  # change counter, pages, no freelist (lost with it)
        1, 4, 0, 0, 1, 0, 0, 0,  # schema cookie, format 4, UTF-8
        1, sqlite3.sqlite_version_info[0] * 1_000_000
        + sqlite3.sqlite_version_info[1] * 1000 + sqlite3.sqlite_version_info[2])
    with path.open("r+b") as f:
        f.write(header)
    return True


def _scan(db: sqlite3.Connection, sql: str, args: tuple, start: int,
          found: Salvaged) -> list[tuple]:
    """Rows of `sql` (`args`, then `key > ?`, ordered by that key, which comes first in each
    row), stepping over every stretch that cannot be read."""
    rows: list[tuple] = []
    after = start
    while True:
        try:
            for row in db.execute(sql, (*args, after)):
                rows.append(row)
                after = row[0]
            return rows
        except sqlite3.DatabaseError:
            found.unreadable += 1
            resume = _readable_after(db, sql, args, after)
            if resume is None:
                return rows
            after = max(resume, after + 1)


def _readable_after(db: sqlite3.Connection, sql: str, args: tuple, after: int) -> int | None:
    """The smallest key past `after` from which reading works again (None: nowhere)."""

    def readable(key: int) -> bool:
        try:
            db.execute(sql + " LIMIT 1", (*args, key)).fetchall()
            return True
        except sqlite3.DatabaseError:
            return False

    step = 1
    while not readable(after + step):
        if step > 2**61:
            return None
        step *= 2
    low, high = after + step // 2, after + step  # low cannot be read (or is `after`)
    while high - low > 1:
        middle = (low + high) // 2
        if readable(middle):
            high = middle
        else:
            low = middle
    return high


def _valid(rows: list[tuple], check: Callable[[tuple], bool], found: Salvaged) -> list[tuple]:
    good = []
    for row in rows:
        try:
            ok = check(row)
        except (TypeError, ValueError):
            ok = False
        if ok:
            good.append(row)
        else:
            found.bad_rows += 1
    return good


def _meta_row(row: tuple) -> bool:
    return isinstance(row[1], str) and isinstance(row[2], (bytes, str))


def _has_column(db: sqlite3.Connection, table: str, column: str) -> bool:
    try:
        return any(r[1] == column for r in db.execute(f"PRAGMA table_info({table})"))
    except sqlite3.DatabaseError:
        return False


def _device_row(row: tuple) -> bool:
    _, token, topic, push_types, user, created, seen, acked, next_seq, gone, expires = row
    return (isinstance(token, str) and is_token(token) and isinstance(topic, str)
            and isinstance(json.loads(push_types), list)
            and (user is None or isinstance(user, str))
            and all(isinstance(v, (int, float)) for v in (created, seen))
            and isinstance(acked, int) and isinstance(next_seq, int) and next_seq > acked >= 0
            and (gone is None or isinstance(gone, (int, float)))
            and (expires is None or isinstance(expires, (int, float))))


def _push_row(row: tuple) -> bool:
    seq, push_id, push_type, priority, expiration, collapse_id, payload, accepted = row
    return (isinstance(seq, int) and seq > 0 and isinstance(push_id, str)
            and isinstance(push_type, str) and isinstance(priority, int)
            and isinstance(expiration, int)
            and (collapse_id is None or isinstance(collapse_id, str))
            and isinstance(json.loads(payload), dict) and isinstance(accepted, (int, float)))
