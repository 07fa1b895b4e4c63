"""What the gateway says of its own state when /metrics is read, and only then.

The alerts an operator loads (contrib/prometheus/lpgw-alerts.yml) need the certificate's
expiry, the disk, whether the clock is synchronised, the PBX registrations and the last
self-test as series. They are read at scrape time by this collector, so nothing runs
while nobody looks.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric

TIMESYNC = Path("/run/systemd/timesync")  # systemd-timesyncd's (Debian, Raspberry Pi OS)


def clock_synchronised(timesync: Path = TIMESYNC) -> bool | None:
    """Whether the clock is synchronised, as systemd-timesyncd says (it touches
    `synchronized` there once it has synchronised the clock); None without timesyncd.
    Not adjtimex(2), though it would ask the kernel itself: under the unit's ProtectClock=
    its seccomp filter kills the process that calls it, read-only or not (the systemd
    test found the gateway dead on its first /status)."""
    if not timesync.is_dir():
        return None
    return (timesync / "synchronized").exists()


@dataclass
class SelfTestResult:
    at: float  # wall-clock seconds
    ok: bool
    failed: list[str] = field(default_factory=list)  # names of the checks that failed
    # each check (name, ok, detail), when the console ran it; `lpgw selftest` prints its own
    checks: list[dict] = field(default_factory=list)
    running: bool = False  # the console's run is under way


@dataclass
class State:
    """Where the collector reads from: set by the gateway as it starts and reloads."""

    version: str
    state_dir: Path
    cert_not_after: float = 0.0
    registrations: Callable[[], list[tuple[str, bool]]] = lambda: []  # (user, registered)
    pbx_reachable: Callable[[], bool | None] = lambda: None
    last_selftest: SelfTestResult | None = None


class StateCollector:
    def __init__(self, state: State) -> None:
        self.state = state

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        families = self._families()
        s = self.state
        info, expiry, free, size, clock, regs, pbx, tested, test_ok = families
        info.add_metric([], {"version": s.version})
        if s.cert_not_after:
            expiry.add_metric([], s.cert_not_after)
        try:
            usage = shutil.disk_usage(s.state_dir)
        except OSError:
            pass
        else:
            free.add_metric([], usage.free)
            size.add_metric([], usage.total)
        synced = clock_synchronised()
        if synced is not None:
            clock.add_metric([], 1.0 if synced else 0.0)
        for user, registered in s.registrations():
            regs.add_metric([user], 1.0 if registered else 0.0)
        reachable = s.pbx_reachable()
        if reachable is not None:
            pbx.add_metric([], 1.0 if reachable else 0.0)
        if s.last_selftest is not None:
            tested.add_metric([], s.last_selftest.at)
            test_ok.add_metric([], 1.0 if s.last_selftest.ok else 0.0)
        return iter(families)

    @staticmethod
    def _families() -> tuple[InfoMetricFamily, GaugeMetricFamily, GaugeMetricFamily,
                             GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily,
                             GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            InfoMetricFamily("lpgw_build", "The gateway's version"),
            GaugeMetricFamily("lpgw_certificate_expiry_timestamp_seconds",
                              "When the gateway's certificate expires (Unix time)"),
            GaugeMetricFamily("lpgw_state_disk_free_bytes",
                              "Free bytes on the file system of the state directory"),
            GaugeMetricFamily("lpgw_state_disk_size_bytes",
                              "Size of the file system of the state directory"),
            GaugeMetricFamily("lpgw_clock_synchronised",
                              "1 once systemd-timesyncd has synchronised the clock, 0 "
                              "before; absent without timesyncd"),
            GaugeMetricFamily("lpgw_sip_registration_up",
                              "1 while the account is registered with the PBX",
                              labels=["user"]),
            GaugeMetricFamily("lpgw_sip_pbx_reachable",
                              "1 while the PBX answers the gateway's keepalives; absent "
                              "without a PBX"),
            GaugeMetricFamily("lpgw_selftest_last_run_timestamp_seconds",
                              "When `lpgw selftest` last reported to this gateway"),
            GaugeMetricFamily("lpgw_selftest_ok",
                              "1 if the last self-test passed every check, else 0"),
        )
