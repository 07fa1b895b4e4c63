"""Who may add a device record: new installs per source address, and how many records at all.

A device record is made by any hello with an install id the gateway has not seen; without a
limit one client on the Wi-Fi makes hundreds a second with made-up ids. Sans-IO: the caller
passes the source address and the time, and gets back whether and why not.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass

from gateway.core.addresses import Network, networks, within

# source addresses whose buckets are kept at most: past it the longest-unused goes (its
# owner starts again with a full burst, which only costs it the wait it would have had)
MAX_SOURCES = 4096


class InstallVerdict(enum.Enum):
    ALLOWED = "allowed"
    RATE = "rate"  # this source made too many new installs lately
    FULL = "full"  # the device records are at max_devices


@dataclass(frozen=True)
class InstallPolicy:
    rate: float = 0.1  # new installs per second per source, sustained
    burst: int = 20
    max_devices: int = 20000
    exempt: tuple[str, ...] = ("127.0.0.0/8", "::1")


class InstallGate:
    """A token bucket per source address, in a bounded table, and the record cap."""

    def __init__(self, policy: InstallPolicy) -> None:
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self.set_policy(policy)

    def set_policy(self, policy: InstallPolicy) -> None:
        """A reload's limits; the buckets as they are go on."""
        self.policy = policy
        self._exempt: tuple[Network, ...] = networks(policy.exempt)

    def check(self, source: str | None, now: float, devices: int) -> InstallVerdict:
        """May `source` add a record now, with `devices` records kept? Takes a token if so.
        `now` is monotonic seconds; `source` an IP address (None: not from the network)."""
        if devices >= self.policy.max_devices:
            return InstallVerdict.FULL
        if source is None or within(source, self._exempt):
            return InstallVerdict.ALLOWED
        tokens, at = self._buckets.pop(source, (float(self.policy.burst), now))
        tokens = min(float(self.policy.burst), tokens + max(0.0, now - at) * self.policy.rate)
        allowed = tokens >= 1
        self._buckets[source] = (tokens - 1 if allowed else tokens, now)  # most recent last
        while len(self._buckets) > MAX_SOURCES:
            self._buckets.popitem(last=False)
        return InstallVerdict.ALLOWED if allowed else InstallVerdict.RATE

    def sources(self) -> int:
        return len(self._buckets)
