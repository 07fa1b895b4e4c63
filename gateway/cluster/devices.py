"""The site's device registry: every gateway's copy of every device record of the site.

A push for a device is checked (token known, topic, push types, unregistered, bound user)
on whichever gateway takes it, and checking must take no I/O: so each gateway keeps the
site's records in its own SQLite file (`Storage.mirror_device`), fed by a watch of the R3
KV bucket `lpgw_<site>_devices` (token -> record). A gateway that records a device (a
hello, a departure, an unregistration, a binding) writes it there; the others hear of it
within milliseconds. At start the whole bucket is read before the gateway serves.

Writes are newest-state only (a phone that flaps costs one write), by a few workers that
never block the pump; a record unchanged since the last write is not written again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time

import nats
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from gateway import faults
from gateway.cluster.site import Site, open_bucket
from gateway.cluster.writes import NewestWrites, wrong_last_sequence
from gateway.core.metrics import Metrics
from gateway.core.storage import Storage
from gateway.core.tokens import short
from gateway.records import DeviceRecord, StorageFailed, is_token

log = logging.getLogger("lpgw.cluster")

WORKERS = 4


def devices_bucket(site: str) -> str:
    return f"lpgw_{site}_devices"


def encode(device: DeviceRecord, last_seen: bool = True) -> bytes:
    """The record as the site keeps it (not this gateway's seqs: they are the stream's);
    without `last_seen`, what a push is checked against."""
    fields = {"topic": device.topic, "push_types": list(device.push_types),
              "user": device.user, "created_at": device.created_at,
              "unregistered_at": device.unregistered_at, "user_expires": device.user_expires}
    if last_seen:
        fields["last_seen"] = device.last_seen
    return json.dumps(fields, separators=(",", ":")).encode()


def decode(token: str, value: bytes) -> DeviceRecord:
    """A record from the bucket; ValueError (or KeyError, TypeError) when damaged."""
    d = json.loads(value)
    push_types = tuple(str(t) for t in d["push_types"])
    user = d.get("user")
    return DeviceRecord(token=token, topic=str(d["topic"]), push_types=push_types,
                        user=None if user is None else str(user),
                        created_at=float(d["created_at"]), last_seen=float(d["last_seen"]),
                        acked_seq=0, next_seq=1,
                        unregistered_at=_number(d.get("unregistered_at")),
                        user_expires=_number(d.get("user_expires")))


def _number(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]


def _digest(value: bytes) -> bytes:
    return hashlib.blake2b(value, digest_size=8).digest()


class SiteDevices:
    def __init__(self, site: Site, storage: Storage, metrics: Metrics, replicas: int) -> None:
        self.site = site
        self.storage = storage
        self.metrics = metrics
        self.replicas = replicas
        self._kv: KeyValue | None = None
        self._watcher: KeyValue.KeyWatcher | None = None
        self._same: dict[str, bytes] = {}  # token -> digest of the site's record as known
        self._known: dict[str, bytes] = {}  # the same, but for the last-seen time
        self._revision: dict[str, int] = {}  # token -> the site's revision of it, as known
        self._writes = NewestWrites(self._write, metrics, "device", WORKERS)
        self._unmirrored: dict[str, DeviceRecord] = {}  # the local store failed: again later
        self._tasks: list[asyncio.Task] = []
        self.mirrored = 0

    async def start(self, timeout: float) -> None:
        """Open the bucket and take every record in it before serving."""
        deadline = time.monotonic() + timeout
        self._kv = await open_bucket(self.site.js, devices_bucket(self.site.name),
                                     self.replicas, deadline)
        self._watcher = await self._kv.watchall()
        while True:  # the current records, then a None: from there on, changes
            entry = await self._watcher.updates(timeout=max(0.5, deadline - time.monotonic()))
            if entry is None:
                break
            self._take(entry)
        self._tasks = [asyncio.create_task(self._watch())]
        self._writes.start()

    async def stop(self) -> None:
        await self._writes.stop(within=1.0)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                await self._watcher.stop()

    def status(self) -> dict[str, int]:
        return {"site_devices": len(self._same), "records_waiting": len(self._writes.queued)}

    # --- this gateway's changes, to the site -----------------------------------------

    def changed(self, token: str) -> None:
        self._writes.want(token)

    async def record(self, token: str) -> None:
        """Write the device's record now (a hello waits for it), unless the site has it
        as it is but for its last-seen time (written when it leaves); raises nats errors."""
        device = self.storage.device(token)
        if device is not None and self._known.get(token) == _digest(encode(device, False)):
            return
        await self._write(token)

    async def _write(self, token: str) -> None:
        assert self._kv is not None
        device = self.storage.device(token)
        if device is None:  # forgotten here (pruned, a self-test's device): for the site too
            self._known.pop(token, None)
            revision = self._revision.pop(token, None)
            if self._same.pop(token, None) is not None:
                await self._delete(token, revision)
            return
        value = encode(device)
        digest = _digest(value)
        if self._same.get(token) == digest:
            return
        self._revision[token] = await self._kv.put(token, value)
        self._same[token] = digest
        self._known[token] = _digest(encode(device, False))

    async def _delete(self, token: str, revision: int | None) -> None:
        """Delete the site's record only if it is still the one this gateway knew: every
        gateway prunes the same unseen devices, and the phone may have just come back
        to another gateway, whose newer record must stay (it comes back here through the
        watch). The bucket keeps a small delete marker per token (history 1)."""
        assert self._kv is not None
        try:
            await self._kv.delete(token, last=revision)
        except nats.js.errors.APIError as exc:
            if not wrong_last_sequence(exc):
                raise
            log.debug("%s written again in the site meanwhile: kept", short(token))

    # --- the site's records, here ----------------------------------------------------

    async def _watch(self) -> None:
        assert self._watcher is not None
        while True:
            try:
                entry = await self._watcher.updates(timeout=5.0)
            except nats.errors.TimeoutError:
                self._retry_unmirrored()
                continue
            if entry is not None:
                self._take(entry)

    def _take(self, entry: KeyValue.Entry) -> None:
        token = entry.key
        if not is_token(token):
            return
        if entry.operation is not None or not entry.value:  # deleted: forgotten
            self._known.pop(token, None)
            self._revision.pop(token, None)
            if self._same.pop(token, None) is not None:
                self._forget(token)
            return
        self._revision[token] = entry.revision or 0
        digest = _digest(entry.value)
        if self._same.get(token) == digest:
            return  # ours, or known already
        try:
            record = decode(token, entry.value)
        except (ValueError, KeyError, TypeError) as exc:
            self.metrics.cluster_errors.labels("device_record").inc()
            faults.bounded(log, "device_record", "a damaged record for %s in the site's "
                           "registry: %s", short(token), exc)
            return
        self._same[token] = digest
        self._known[token] = _digest(encode(record, False))
        self._mirror(record)

    def _mirror(self, record: DeviceRecord) -> None:
        try:
            self.storage.mirror_device(record)
        except StorageFailed as exc:
            self.metrics.cluster_errors.labels("device_mirror").inc()
            faults.bounded(log, "device_mirror", "the site's record of %s not kept here: %s",
                           short(record.token), exc)
            self._unmirrored[record.token] = record
            return
        self._unmirrored.pop(record.token, None)
        self.mirrored += 1

    async def look_up(self, token: str) -> bool:
        """Ask the site for a device this gateway has no record of (yet): True, and its
        record kept here, if the site has it. Raises nats errors (the caller: 503)."""
        assert self._kv is not None
        try:
            entry = await self._kv.get(token)
        except KeyNotFoundError:
            return False
        if not entry.value:
            return False
        self._take(entry)
        return self.storage.device(token) is not None

    def _forget(self, token: str) -> None:
        try:
            self.storage.forget_device(token)
        except StorageFailed as exc:
            self.metrics.cluster_errors.labels("device_mirror").inc()
            faults.bounded(log, "device_mirror", "%s not forgotten here: %s", short(token),
                           exc)

    def _retry_unmirrored(self) -> None:
        for record in list(self._unmirrored.values()):
            self._mirror(record)
