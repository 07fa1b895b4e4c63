"""The heartbeat timer wheel on a real event loop: never early, at most a tick late, one
loop timer for many owners."""

from __future__ import annotations

import asyncio
import itertools
import logging

from gateway.transport.timers import TimerWheel, tick_for

TICK = 0.02


def pending_loop_timers(loop: asyncio.AbstractEventLoop) -> int:
    return sum(1 for h in loop._scheduled if not h.cancelled())


async def test_deadlines_fire_never_early_and_at_most_a_tick_late():
    loop = asyncio.get_running_loop()
    wheel = TimerWheel(loop, TICK)
    fired: dict[int, float] = {}
    start = loop.time()
    wanted = {i: start + 0.01 + i * 0.007 for i in range(30)}
    for i, at in wanted.items():
        wheel.schedule(i, at, lambda i=i: fired.__setitem__(i, loop.time()))
    await asyncio.sleep(0.4)
    assert set(fired) == set(wanted)
    for i, at in wanted.items():
        assert at - 1e-6 <= fired[i] <= at + TICK + 0.05, (i, fired[i] - at)
    assert len(wheel) == 0


async def test_many_owners_share_one_loop_timer():
    loop = asyncio.get_running_loop()
    before = pending_loop_timers(loop)
    wheel = TimerWheel(loop, TICK)
    fired = []
    for i in range(1000):
        wheel.schedule(i, loop.time() + 0.05 + (i % 3) * 0.001, lambda i=i: fired.append(i))
    assert pending_loop_timers(loop) - before == 1
    await asyncio.sleep(0.15)
    assert sorted(fired) == list(range(1000))
    assert pending_loop_timers(loop) - before == 0  # nothing left: no timer armed


async def test_rescheduling_replaces_and_cancel_removes():
    loop = asyncio.get_running_loop()
    wheel = TimerWheel(loop, TICK)
    fired = []
    wheel.schedule("a", loop.time() + 0.03, lambda: fired.append("a-early"))
    wheel.schedule("a", loop.time() + 0.12, lambda: fired.append("a-late"))
    wheel.schedule("b", loop.time() + 0.03, lambda: fired.append("b"))
    wheel.cancel("b")
    wheel.schedule("c", None, lambda: fired.append("c"))  # None: no deadline at all
    await asyncio.sleep(0.08)
    assert fired == []
    await asyncio.sleep(0.12)
    assert fired == ["a-late"]


async def test_an_earlier_deadline_rearms_the_loop_timer():
    loop = asyncio.get_running_loop()
    wheel = TimerWheel(loop, TICK)
    fired = []
    wheel.schedule("late", loop.time() + 5, lambda: fired.append("late"))
    wheel.schedule("soon", loop.time() + 0.03, lambda: fired.append("soon"))
    await asyncio.sleep(0.1)
    assert fired == ["soon"]
    wheel.close()


async def test_a_callback_that_fails_does_not_stop_the_others(caplog):
    loop = asyncio.get_running_loop()
    wheel = TimerWheel(loop, TICK)
    fired = []

    def broken() -> None:
        raise RuntimeError("bug")

    wheel.schedule("x", loop.time() + 0.02, broken)
    wheel.schedule("y", loop.time() + 0.02, lambda: fired.append("y"))
    with caplog.at_level(logging.ERROR, "lpgw.timers"):
        await asyncio.sleep(0.1)
    assert fired == ["y"] and "internal error in timer" in caplog.text


async def test_rescheduling_into_the_past_runs_next_tick_not_in_a_spin():
    loop = asyncio.get_running_loop()
    wheel = TimerWheel(loop, TICK)
    runs = []

    def again() -> None:
        runs.append(loop.time())
        if len(runs) < 5:
            wheel.schedule("p", loop.time() - 1.0, again)  # already due

    wheel.schedule("p", loop.time(), again)
    await asyncio.sleep(0.3)
    assert len(runs) == 5
    gaps = [b - a for a, b in itertools.pairwise(runs)]
    assert all(g >= TICK * 0.5 for g in gaps), gaps  # one tick apart: the loop breathes


async def test_retune_keeps_every_deadline():
    loop = asyncio.get_running_loop()
    wheel = TimerWheel(loop, 0.1)
    fired = {}
    at = loop.time() + 0.15
    wheel.schedule("a", at, lambda: fired.__setitem__("a", loop.time()))
    wheel.retune(0.01)
    await asyncio.sleep(0.3)
    assert at - 1e-6 <= fired["a"] <= at + 0.01 + 0.05


def test_tick_is_a_quarter_heartbeat_at_most():
    assert tick_for(10.0) == 0.1
    assert tick_for(0.2) == 0.05
