"""The wall clock's steps, seen against the monotonic clock (sans-IO: both readings in).

A Raspberry Pi has no real-time clock: it boots with the time it last saved (or 1970),
and NTP steps it, days forward, when it first syncs; an operator may set it back by hand.
Intervals (last seen, heartbeats, ring windows, rate limits) are measured on the monotonic
clock, which never steps. Absolute times that come from outside (APNs expirations, JWT
`iat`/`exp`) and what is kept across restarts (a device's last-seen time) stay in wall-clock
seconds; when the wall clock steps, what was stamped before the step is moved with it
(Delivery.clock_stepped), so a device seen a minute ago is still seen a minute ago.
"""

from __future__ import annotations

from dataclasses import dataclass

# NTP slews offsets under 128 ms and steps larger ones; chrony's makestep commonly allows
# a 1 s step. Anything this large between two readings is a step, not drift or scheduling.
STEP_THRESHOLD = 2.0


@dataclass(frozen=True)
class ClockStep:
    """The wall clock moved `delta` seconds (positive: forward) more than the monotonic."""

    delta: float
    wall: float  # the wall clock just after the step
    mono: float


class ClockWatch:
    """Tells, reading by reading, whether the wall clock stepped since the last reading.

    The offset wall - monotonic is constant while both run freely (NTP slewing moves it by
    at most ~0.5 ms per second); a jump of STEP_THRESHOLD or more is a step.
    """

    def __init__(self, wall: float, mono: float, threshold: float = STEP_THRESHOLD) -> None:
        self.offset = wall - mono
        self.threshold = threshold
        self.steps = 0

    def observe(self, wall: float, mono: float) -> ClockStep | None:
        offset = wall - mono
        delta = offset - self.offset
        self.offset = offset  # slewing follows along; a step is reported once
        if abs(delta) < self.threshold:
            return None
        self.steps += 1
        return ClockStep(delta, wall, mono)
