"""Which gateway of the site holds which device, and which gateways are alive.

Two R3 KV buckets of the site:

- `lpgw_<site>_presence`: token -> {"gateway", "transport", "since"}. The revision of this
  gateway's own write is its *epoch* for that device: it deletes the entry only if the
  revision is still its own (`last=`), so a gateway whose phone has moved on (a stale
  owner) cannot erase the new holder's entry.
- `lpgw_<site>_gateways`: gateway id -> {"name", "devices", "at"}, rewritten every
  GATEWAY_EVERY seconds; the bucket's TTL drops a gateway that stopped (SIGKILL, power)
  after GATEWAY_TTL, and presence entries naming a gateway that is gone are not believed.

The shell reports arrivals and departures (from the pump, never blocking it); a few
workers write them, newest state first: for each token only what is wanted *now* is
written, so a phone that flaps costs one write, not a backlog, and memory is bounded by
the devices this gateway holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

import nats
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from gateway import faults
from gateway.cluster.site import Site, open_bucket
from gateway.cluster.writes import NewestWrites, wrong_last_sequence
from gateway.core.metrics import Metrics
from gateway.core.site import SiteView

log = logging.getLogger("lpgw.cluster")

GATEWAY_EVERY = 5.0  # seconds between a gateway's "alive" writes
GATEWAY_TTL = 15.0  # a gateway unheard of this long is gone
WORKERS = 8  # presence writes in flight at most


def presence_bucket(site: str) -> str:
    return f"lpgw_{site}_presence"


def gateways_bucket(site: str) -> str:
    return f"lpgw_{site}_gateways"


class Presence:
    def __init__(self, site: Site, gateway_id: str, name: str, metrics: Metrics,
                 replicas: int, view: SiteView | None = None) -> None:
        """`view`, when given, is kept up to date with where the site's devices are held
        and which gateways are alive (the core decides with it)."""
        self.site = site
        self.view = view
        self.gateway_id = gateway_id
        self.name = name
        self.metrics = metrics
        self.replicas = replicas
        self._kv: KeyValue | None = None
        self._alive: KeyValue | None = None
        self._wanted: dict[str, str | None] = {}  # token -> transport held here, None: gone
        self._epochs: dict[str, int] = {}  # token -> revision of our entry
        self._writes = NewestWrites(self._write, metrics, "presence", WORKERS)
        self._tasks: list[asyncio.Task] = []
        self.known: dict[str, dict[str, Any]] = {}  # the site's gateways, as last read

    async def start(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self._kv = await open_bucket(self.site.js, presence_bucket(self.site.name),
                                     self.replicas, deadline)
        self._alive = await open_bucket(self.site.js, gateways_bucket(self.site.name),
                                        self.replicas, deadline, ttl=GATEWAY_TTL)
        self._writes.start()
        if self.view is not None:
            self.view.alive = set(await self.gateways()) | {self.gateway_id}
            watcher = await self._kv.watchall()
            while (entry := await watcher.updates(
                    timeout=max(0.5, deadline - time.monotonic()))) is not None:
                self._take(entry)
            self._tasks.append(asyncio.create_task(self._watch(watcher)))
        self._tasks.append(asyncio.create_task(self._beat()))

    async def stop(self) -> None:
        """Write what is still wanted (bounded), then say this gateway is gone."""
        await self._writes.stop(within=2.0)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._alive is not None:
            with contextlib.suppress(Exception):
                await self._alive.delete(self.gateway_id)

    async def _watch(self, watcher: KeyValue.KeyWatcher) -> None:
        try:
            while True:
                try:
                    entry = await watcher.updates(timeout=5.0)
                except nats.errors.TimeoutError:
                    continue
                if entry is not None:
                    self._take(entry)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()

    def _take(self, entry: KeyValue.Entry) -> None:
        """Where the site says a device is held now (deleted: nowhere)."""
        assert self.view is not None
        if entry.operation is not None or not entry.value:
            self.view.holders.pop(entry.key, None)
            return
        try:
            gateway = json.loads(entry.value)["gateway"]
        except (ValueError, KeyError, TypeError):
            self.metrics.cluster_errors.labels("presence_entry").inc()
            return
        self.view.holders[entry.key] = str(gateway)

    # --- from the shell (the pump): never blocks ------------------------------------

    def arrived(self, token: str, transport: str) -> None:
        self._want(token, transport)

    def left(self, token: str) -> None:
        if token in self._wanted or token in self._epochs:
            self._want(token, None)

    def _want(self, token: str, transport: str | None) -> None:
        self._wanted[token] = transport
        self._writes.want(token)

    # --- the writers ----------------------------------------------------------------

    async def _write(self, token: str) -> None:
        assert self._kv is not None
        transport = self._wanted.get(token)
        if transport is not None:
            value = json.dumps({"gateway": self.gateway_id, "transport": transport,
                                "since": round(time.time(), 3)}).encode()
            self._epochs[token] = await self._kv.put(token, value)
            return
        epoch = self._epochs.get(token)
        if epoch is None:
            self._wanted.pop(token, None)
            return
        try:
            await self._kv.delete(token, last=epoch)
        except nats.js.errors.APIError as exc:
            if not wrong_last_sequence(exc):
                raise
            self.metrics.cluster_presence_moved.inc()  # another gateway holds it now
        # gone for the site (or someone else's now); a failure above keeps both, retried
        self._epochs.pop(token, None)
        if self._wanted.get(token, "") is None:
            self._wanted.pop(token, None)

    async def _beat(self) -> None:
        assert self._alive is not None
        while True:
            value = json.dumps({"name": self.name, "at": round(time.time(), 3),
                                "devices": sum(1 for t in self._wanted.values()
                                               if t is not None)}).encode()
            try:
                await self._alive.put(self.gateway_id, value)
                self.known = await self.gateways()
                self.metrics.cluster_gateways.set(len(self.known))
                if self.view is not None:
                    self.view.alive = set(self.known) | {self.gateway_id}
            except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
                self.metrics.cluster_errors.labels("gateways").inc()
                faults.bounded(log, "gateways", "site heartbeat not written: %s", exc)
            self.metrics.cluster_connected.set(1 if self.site.nc.is_connected else 0)
            await asyncio.sleep(GATEWAY_EVERY)

    # --- reading the site -----------------------------------------------------------

    async def gateways(self) -> dict[str, dict[str, Any]]:
        """The site's gateways heard of within GATEWAY_TTL: id -> name, devices, at."""
        assert self._alive is not None
        out: dict[str, dict[str, Any]] = {}
        try:
            keys = await self._alive.keys()
        except nats.js.errors.NoKeysError:
            return out
        for key in keys:
            with contextlib.suppress(KeyNotFoundError):
                entry = await self._alive.get(key)
                if entry.value:
                    out[key] = json.loads(entry.value)
        return out

    async def holder(self, token: str) -> tuple[str, int] | None:
        """(gateway id, epoch) of the gateway that holds the device now, if it is alive."""
        assert self._kv is not None
        try:
            entry = await self._kv.get(token)
        except KeyNotFoundError:
            return None
        if not entry.value:
            return None
        gateway = json.loads(entry.value)["gateway"]
        if gateway != self.gateway_id and gateway not in await self.gateways():
            return None  # its gateway is gone: not believed
        return gateway, entry.revision or 0

    def status(self) -> dict[str, Any]:
        return {"held_here": sum(1 for t in self._wanted.values() if t is not None),
                "writes_waiting": len(self._writes.queued),
                "gateways": {gid: {"name": g.get("name"), "devices": g.get("devices"),
                                   "seconds_ago": round(max(0.0, time.time() - g["at"]), 1)
                                   if isinstance(g.get("at"), int | float) else None}
                             for gid, g in sorted(self.known.items())}}
