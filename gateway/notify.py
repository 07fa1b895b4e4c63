"""Telling systemd the truth: READY, STATUS, RELOADING, STOPPING and the watchdog.

sdnotify swallows every error unless `debug=True`; here it runs with debug on and each
failure is logged, so a broken NOTIFY_SOCKET shows up in the journal instead of as a
mysterious watchdog restart.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping

import sdnotify

log = logging.getLogger("lpgw.notify")


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self.env = os.environ if env is None else env
        self.failures = 0
        self._notifier: sdnotify.SystemdNotifier | None = None
        if self.env.get("NOTIFY_SOCKET"):
            try:
                self._notifier = sdnotify.SystemdNotifier(debug=True)
            except (OSError, TypeError, IndexError) as exc:  # sdnotify reads os.environ
                log.error("cannot reach systemd's NOTIFY_SOCKET %s: %s",
                          self.env["NOTIFY_SOCKET"], exc)

    @property
    def enabled(self) -> bool:
        return self._notifier is not None

    def send(self, *lines: str) -> bool:
        if self._notifier is None:
            return False
        try:
            self._notifier.notify("\n".join(lines))
            return True
        except OSError as exc:
            self.failures += 1
            if self.failures <= 3 or self.failures % 100 == 0:
                log.error("sd_notify %r failed (%d so far): %s", lines[0], self.failures, exc)
            return False

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def reloading(self) -> None:
        self.send("RELOADING=1", "STATUS=reloading the configuration")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=draining")

    def watchdog_interval(self) -> float | None:
        """Half of WatchdogSec, when the watchdog is on and meant for this process."""
        usec = self.env.get("WATCHDOG_USEC")
        pid = self.env.get("WATCHDOG_PID")
        if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
            return None
        return int(usec) / 2 / 1_000_000

    async def watchdog(self) -> None:
        """Pet the watchdog from the event loop itself: a blocked loop stops the pings."""
        interval = self.watchdog_interval()
        if interval is None or not self.enabled:
            return
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(interval)
