"""One loop timer per tick for every connection's heartbeat and hello deadline.

A gateway with 10,000 phones pings 1,000 of them a second. With a loop timer each, every
ping is its own wake-up of the event loop (an epoll_wait that times out, then a send) and
every pong its own read: measured, the wake-ups were most of the idle CPU. Grouped into
ticks, a tick's pings go out together and their pongs come back together, so one
wake-up serves a hundred phones. A deadline fires at most one tick late, never early.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
from collections.abc import Callable

from gateway import faults
from gateway.core.metrics import Metrics

log = logging.getLogger("lpgw.timers")

DEFAULT_TICK = 0.1


def tick_for(heartbeat: float) -> float:
    """Late by at most a quarter of the heartbeat, and never finer than needed."""
    return min(DEFAULT_TICK, heartbeat / 4)


class TimerWheel:
    """Deadlines of many owners; each owner has at most one, and `fire` is called at it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tick: float = DEFAULT_TICK,
                 metrics: Metrics | None = None) -> None:
        self._loop = loop
        self.metrics = metrics
        self.tick = tick
        self._slots: dict[int, dict[object, Callable[[], None]]] = {}
        self._order: list[int] = []  # heap of the slot numbers in _slots
        self._slot_of: dict[object, int] = {}
        self._at: dict[object, float] = {}
        self._handle: asyncio.TimerHandle | None = None
        self._armed_slot: int | None = None
        self._running = False
        self._done = math.floor(loop.time() / tick)  # slots up to this one have run

    def __len__(self) -> int:
        return len(self._slot_of)

    def schedule(self, owner: object, at: float | None, fire: Callable[[], None]) -> None:
        """Call `fire` at `at` (None: never) instead of whatever this owner had."""
        self._remove(owner)
        if at is None:
            return
        slot = max(math.ceil(at / self.tick), self._done + 1)
        members = self._slots.get(slot)
        if members is None:
            members = self._slots[slot] = {}
            heapq.heappush(self._order, slot)
        members[owner] = fire
        self._slot_of[owner] = slot
        self._at[owner] = at
        if not self._running and (self._armed_slot is None or slot < self._armed_slot):
            self._arm(slot)

    def cancel(self, owner: object) -> None:
        self._remove(owner)

    def retune(self, tick: float) -> None:
        """A new tick (the heartbeat was reloaded): every deadline is kept."""
        if tick == self.tick:
            return
        pending = [(owner, self._at[owner], self._slots[slot][owner])
                   for owner, slot in self._slot_of.items()]
        self.close()
        self.tick = tick
        self._done = math.floor(self._loop.time() / tick)
        for owner, at, fire in pending:
            self.schedule(owner, at, fire)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = None
        self._armed_slot = None
        self._slots.clear()
        self._order.clear()
        self._slot_of.clear()
        self._at.clear()

    def _remove(self, owner: object) -> None:
        slot = self._slot_of.pop(owner, None)
        if slot is None:
            return
        del self._at[owner]
        members = self._slots[slot]
        del members[owner]
        if not members:
            del self._slots[slot]  # its number stays in the heap; _run skips it

    def _arm(self, slot: int) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._armed_slot = slot
        self._handle = self._loop.call_at(slot * self.tick, self._run)

    def _run(self) -> None:
        self._handle = None
        self._armed_slot = None
        # asyncio may run a timer up to its clock resolution early: no slot is missed for it
        now_slot = math.floor(self._loop.time() / self.tick + 1e-6)
        self._running = True
        try:
            while self._order and self._order[0] <= now_slot:
                slot = heapq.heappop(self._order)
                self._done = max(self._done, slot)
                members = self._slots.pop(slot, None)
                if not members:
                    continue
                for owner in members:
                    del self._slot_of[owner]
                    del self._at[owner]
                for fire in members.values():
                    try:
                        fire()  # may schedule again, into a later slot
                    except Exception as exc:  # one owner's failure: the others' still run
                        faults.record(self.metrics, "timer", exc)
            self._done = max(self._done, now_slot)
        finally:
            self._running = False
            while self._order and self._order[0] not in self._slots:
                heapq.heappop(self._order)
            if self._order:
                self._arm(self._order[0])
