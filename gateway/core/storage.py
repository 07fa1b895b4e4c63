"""What the core and the API need from storage, named for the domain, not for SQL.

`gateway.store.Store` (SQLite, one file) implements it; the site cluster adds a second
backend behind the same interface. A backend raises `records.StorageFailed` for anything
it cannot do now (a full disk, a lost quorum): the core turns that into 503 or `bye
unavailable`, never into a lost push.
"""

from __future__ import annotations

from typing import Protocol

from gateway.records import DeviceRecord, StoredPush


class Storage(Protocol):
    # --- devices ---------------------------------------------------------------------

    def record_device(self, token: str, topic: str, push_types: tuple[str, ...],
                      user: str | None, now: float,
                      user_expires: float | None = None) -> DeviceRecord:
        """A device said hello: create or refresh its record (not fsynced on its own)."""
        ...

    def mirror_device(self, record: DeviceRecord) -> None:
        """Take the site's record of a device (in a site of gateways; not fsynced)."""
        ...

    def device(self, token: str) -> DeviceRecord | None: ...

    def devices(self, topics: tuple[str, ...] | None = None,
                user: str | None = None) -> list[DeviceRecord]:
        """Device records, of some topics and/or one user, most recently seen first."""
        ...

    def devices_of_user(self, user: str, now: float | None = None,
                        topics: tuple[str, ...] | None = None) -> list[str]:
        """Tokens of the registered devices bound to `user` (bindings valid at `now`)."""
        ...

    def bind_user(self, token: str, user: str | None) -> bool:
        """Bind a device to a user for good (None unbinds); False: no such device."""
        ...

    def seen(self, token: str, now: float) -> None:
        """The device was last seen at `now` (not fsynced)."""
        ...

    def unregister(self, token: str, now: float) -> None:
        """The app unregistered: refuse pushes to it (410) and drop its queue."""
        ...

    def forget_device(self, token: str) -> bool: ...

    def prune_devices(self, unseen_since: float, keep: set[str], limit: int) -> list[str]:
        """Delete up to `limit` devices unseen since then (not `keep`); the ones that went."""
        ...

    def count_devices(self) -> int: ...

    def device_page(self, search: str, offset: int, limit: int
                    ) -> tuple[int, list[DeviceRecord]]:
        """(how many devices match `search` in token, topic or user, one page of them)."""
        ...

    # --- pushes ----------------------------------------------------------------------

    def accept_push(self, token: str, push_id: str, push_type: str, priority: int,
                    expiration: int, collapse_id: str | None, payload_json: str,
                    now: float, queue_limit: int) -> tuple[StoredPush, list[str], list[str]]:
        """Keep a push durably (inside an open group, durable at `commit`); returns it, the
        ids it collapsed and the ids the queue limit evicted."""
        ...

    def next_seq(self, token: str) -> int:
        """A sequence number for a push that is not kept (expiration 0)."""
        ...

    def pending_after(self, token: str, after_seq: int) -> list[StoredPush]:
        """The device's kept pushes after `after_seq`, in order."""
        ...

    def count_pending(self, token: str) -> int: ...

    def pending_counts(self) -> dict[str, int]: ...

    def ack_through(self, token: str, seq: int, now: float,
                    reported_through: int = 0) -> list[tuple[str, float]]:
        """The device has everything up to `seq`: forget it; (push id, accepted at) of each
        after `reported_through`."""
        ...

    def delivered_through(self, token: str, after: int, seq: int) -> list[tuple[str, float]]:
        """(push id, accepted at) of kept pushes in (after, seq]: an ack not yet written."""
        ...

    def drop_pushes(self, token: str, seqs: list[int]) -> None: ...

    def expire(self, now: float) -> list[tuple[str, str]]:
        """Drop pushes past their expiration; (token, push id) of each."""
        ...

    def shift_times(self, delta: float, expirations: bool) -> None:
        """The wall clock stepped `delta` s: move stored times with it (core.clock)."""
        ...

    def probe(self, now: float) -> None:
        """A small write: does the storage take writes again?"""
        ...

    # --- group commit: many pushes, one durable write ----------------------------------

    def begin(self) -> None: ...

    def commit(self) -> None:
        """Make the open group durable; on failure none of it stays."""
        ...

    def rollback(self) -> None: ...

    @property
    def in_group(self) -> bool: ...
