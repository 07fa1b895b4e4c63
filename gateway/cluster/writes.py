"""Writes to the site's buckets of what changed here, newest state only.

A device record or a presence entry changes many times while a write is in flight (a
phone that flaps, a storm of arrivals). Only the key is queued, once; the writer reads
the state wanted *now* when its turn comes, so a flapping phone costs one write, not a
backlog, and memory is bounded by the keys there are. A write that fails (NATS away) is
tried again after RETRY_AFTER; a bug costs that key only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import nats

from gateway import faults
from gateway.core.metrics import Metrics
from gateway.core.tokens import short

log = logging.getLogger("lpgw.cluster")

RETRY_AFTER = 1.0  # seconds before a write that failed (NATS away) is tried again
# JetStream's codes for "the subject's last sequence is not the one expected"
WRONG_LAST_SEQUENCE = (10071, 10164)


def wrong_last_sequence(exc: Exception) -> bool:
    """A write that named a revision (`last=`) found a newer one. nats-py 2.16 says so
    with KeyWrongLastSequenceError for create and update, but not for delete: there it
    is an APIError with JetStream's code."""
    return isinstance(exc, nats.js.errors.KeyWrongLastSequenceError) or (
        isinstance(exc, nats.js.errors.APIError) and exc.err_code in WRONG_LAST_SEQUENCE)


class NewestWrites:
    def __init__(self, write: Callable[[str], Awaitable[None]], metrics: Metrics,
                 kind: str, workers: int) -> None:
        """`write(key)` writes the key's state as wanted when it is called; `kind` names
        it in logs and in lpgw_cluster_errors_total / lpgw_faults_total."""
        self._write = write
        self.metrics = metrics
        self.kind = kind
        self.workers = workers
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self.queued: set[str] = set()
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._work()) for _ in range(self.workers)]

    def want(self, key: str) -> None:
        """The key's state changed: write it (once, however often this is called first)."""
        if key not in self.queued:
            self.queued.add(key)
            self._queue.put_nowait(key)

    async def stop(self, within: float) -> None:
        """Write what is still wanted, for up to `within` seconds, then stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drain(), within)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _drain(self) -> None:
        while self.queued:
            await asyncio.sleep(0.02)

    async def _work(self) -> None:
        while True:
            key = await self._queue.get()
            try:
                await self._write(key)
            except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
                self.metrics.cluster_errors.labels(self.kind).inc()
                faults.bounded(log, self.kind, "%s of %s not written: %s", self.kind,
                               short(key), exc)
                await asyncio.sleep(RETRY_AFTER)
                self._queue.put_nowait(key)  # still queued: tried again
                continue
            except Exception as exc:  # a bug, or the local store failing: this key only
                faults.record(self.metrics, f"cluster_{self.kind}", exc, short(key))
            self.queued.discard(key)
