"""SQLite (WAL) persistence: devices and their queued pushes.

Every write that a caller is told about has been committed (synchronous=FULL by default), so
a push the gateway accepted survives SIGKILL and, on a Pi, a pulled plug.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from pathlib import Path

from gateway.core.model import DeviceRecord, StoredPush

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
    unregistered_at REAL
);
CREATE INDEX IF NOT EXISTS devices_user ON devices(user);
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
SCHEMA_VERSION = 1


_DEVICE_COLUMNS = ("token, topic, push_types, user, created_at, last_seen, acked_seq, next_seq, "
                   "unregistered_at")


def _device(row: tuple) -> DeviceRecord:
    return DeviceRecord(row[0], row[1], tuple(json.loads(row[2])), row[3], row[4], row[5],
                        row[6], row[7], row[8])


# SQLite's own checkpoint, once the WAL is this many pages (~64 MiB), if ours falls behind
BACKSTOP_CHECKPOINT_PAGES = 16384


class StoreError(Exception):
    pass


class Store:
    def __init__(self, path: str | Path, synchronous: str = "FULL") -> None:
        self.path = Path(path)
        self.synchronous = synchronous
        self._checkpointer: tuple[threading.Event, threading.Thread] | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        os.chmod(self.path, 0o600)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, "
                         "value BLOB NOT NULL)")
        version = self.get_meta("schema_version")
        if version is not None and int(version) > SCHEMA_VERSION:
            self._db.close()
            raise StoreError(f"{self.path} was written by a newer lpgw (schema {int(version)})")
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
            try:
                db.execute(f"PRAGMA synchronous={self.synchronous}")
                while not stop.wait(every):
                    try:
                        db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    except sqlite3.Error as exc:  # busy or full disk: the backstop remains
                        log.warning("WAL checkpoint failed: %s", exc)
            finally:
                db.close()

        thread = threading.Thread(target=run, name="lpgw-checkpoint", daemon=True)
        thread.start()
        self._checkpointer = (stop, thread)

    def close(self) -> None:
        if self._checkpointer is not None:
            stop, thread = self._checkpointer
            stop.set()
            thread.join(10)
            self._checkpointer = None
        self._lazy.close()
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
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

    def upsert_device(self, token: str, topic: str, push_types: tuple[str, ...],
                      user: str | None, now: float) -> DeviceRecord:
        """Without an fsync of its own: a reconnect storm must not wait on the disk, and a
        row lost to a power cut is written again when the phone reconnects; every accepted
        push is a FULL commit, which makes this row durable before it."""
        row = self._relaxed().execute(
            f"""INSERT INTO devices(token, topic, push_types, user, created_at, last_seen)
                VALUES (?, ?, ?, ?, ?, ?)
                ON CONFLICT(token) DO UPDATE SET push_types=excluded.push_types,
                  user=COALESCE(excluded.user, devices.user), last_seen=excluded.last_seen,
                  unregistered_at=NULL
                RETURNING {_DEVICE_COLUMNS}""",
            (token, topic, json.dumps(list(push_types)), user, now, now),
        ).fetchone()
        return _device(row)

    def get_device(self, token: str) -> DeviceRecord | None:
        row = self._db.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE token=?",
                               (token,)).fetchone()
        return None if row is None else _device(row)

    def list_devices(self, topics: tuple[str, ...] | None = None,
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

    def tokens_of(self, user: str) -> list[str]:
        """The registered devices bound to a user, most recently seen first (every call)."""
        return [r[0] for r in self._db.execute(
            """SELECT token FROM devices WHERE user=? AND unregistered_at IS NULL
               ORDER BY last_seen DESC""", (user,))]

    def set_user(self, token: str, user: str | None) -> bool:
        """Bind a device to a user (None unbinds); False when there is no such device."""
        cur = self._db.execute("UPDATE devices SET user=? WHERE token=?", (user, token))
        return cur.rowcount == 1

    def pending_counts(self) -> dict[str, int]:
        return dict(self._db.execute("SELECT token, count(*) FROM pushes GROUP BY token"))

    def touch(self, token: str, now: float) -> None:
        self._relaxed().execute("UPDATE devices SET last_seen=? WHERE token=?", (now, token))

    def unregister(self, token: str, now: float) -> None:
        with self._tx():
            self._db.execute("UPDATE devices SET unregistered_at=?, last_seen=? WHERE token=?",
                             (now, now, token))
            self._db.execute("DELETE FROM pushes WHERE token=?", (token,))

    def count_devices(self) -> int:
        return self._db.execute("SELECT count(*) FROM devices").fetchone()[0]

    # pushes

    def add_push(self, token: str, push_id: str, push_type: str, priority: int,
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

    def next_seq(self, token: str) -> int:
        """Take a sequence number without storing a push (expiration-0 pushes)."""
        row = self._db.execute(
            "UPDATE devices SET next_seq=next_seq+1 WHERE token=? RETURNING next_seq-1",
            (token,)).fetchall()
        if not row:
            raise StoreError(f"no device {token[:8]}…")
        return row[0][0]

    def pending(self, token: str, after_seq: int) -> list[StoredPush]:
        rows = self._db.execute(
            """SELECT token, seq, push_id, push_type, priority, expiration, payload,
                      collapse_id, accepted_at
               FROM pushes WHERE token=? AND seq>? ORDER BY seq""", (token, after_seq))
        return [StoredPush(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8]) for r in rows]

    def count_pending(self, token: str) -> int:
        return self._db.execute("SELECT count(*) FROM pushes WHERE token=?",
                                (token,)).fetchone()[0]

    def ack(self, token: str, seq: int, now: float) -> list[tuple[str, float]]:
        """Forget everything up to `seq`; returns (push id, accepted at) of each delivered.

        Without an fsync of its own: an ack lost to a power cut only means a push is sent
        again, and the device drops it by id. The next durable commit carries it to disk.
        """
        db = self._relaxed()
        with _Transaction(db):
            accepted = [(r[0], r[1]) for r in db.execute(
                "DELETE FROM pushes WHERE token=? AND seq<=? RETURNING push_id, accepted_at",
                (token, seq))]
            db.execute(
                """UPDATE devices SET acked_seq=max(acked_seq, min(?, next_seq-1)), last_seen=?
                   WHERE token=?""", (seq, now, token))
        return accepted

    def delete_pushes(self, token: str, seqs: list[int]) -> None:
        with self._tx():
            self._db.executemany("DELETE FROM pushes WHERE token=? AND seq=?",
                                 [(token, s) for s in seqs])

    def expire(self, now: float) -> list[tuple[str, str]]:
        """Drop every stored push whose expiration has passed; returns (token, push id)."""
        with self._tx():
            return [(r[0], r[1]) for r in self._db.execute(
                "DELETE FROM pushes WHERE expiration>0 AND expiration<? RETURNING token, push_id",
                (now,))]

    def integrity(self) -> str:
        return self._db.execute("PRAGMA quick_check").fetchone()[0]

    # group commit: many writes, one fsync

    def begin(self) -> None:
        if not self._db.in_transaction:
            self._db.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        if self._db.in_transaction:
            self._db.execute("COMMIT")

    def rollback(self) -> None:
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

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
            self._db.execute("COMMIT")
        else:
            self._db.execute("ROLLBACK")
