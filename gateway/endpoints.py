"""Which gateway of a site a device tries next.

A site's gateways share one id (`welcome.gateway_id`), one key pair and one device token
per install, so a device may use any of them. After a connection to one fails (or one
goes silent), the next attempt goes to another: the least recently failed, in the order
given (discovery's: best address first). Used with Bonjour (net.browse.Locator) and with
a fixed list of the site's gateways (`lpgw device --gateway`, SiteLocator).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

FAILED_FOR = 60.0  # seconds a failed gateway is tried only if every other failed too

Endpoint = tuple[str, int]  # address, port


def normalize_pin(pin: str) -> str:
    """A pin as `lpgw pin` prints it (sha256/<base64>) or bare: the base64."""
    return pin.removeprefix("sha256/")


@dataclass
class Endpoints:
    failed: dict[Endpoint, float] = field(default_factory=dict)  # -> when (monotonic)

    def choose(self, candidates: list[Endpoint], avoid: Endpoint | None = None,
               now: float | None = None) -> Endpoint:
        """The endpoint to try: `avoid` just failed (noted); of the rest, the first that
        has not failed lately, else the one that failed longest ago."""
        if not candidates:
            raise LookupError("no gateway of the site is known")
        now = time.monotonic() if now is None else now
        if avoid is not None:
            self.failed[avoid] = now
        for endpoint in list(self.failed):
            if now - self.failed[endpoint] > FAILED_FOR:
                del self.failed[endpoint]
        fresh = [c for c in candidates if c not in self.failed]
        if fresh:
            return fresh[0]
        return min(candidates, key=lambda c: self.failed[c])


class SiteLocator:
    """A fixed list of the site's gateways (address, port), all with the site's pin."""

    def __init__(self, gateways: list[Endpoint], pin: str) -> None:
        self.gateways = list(gateways)
        self.pin = pin
        self.endpoints = Endpoints()

    async def __call__(self, avoid: Endpoint | None = None) -> tuple[str, int, str]:
        host, port = self.endpoints.choose(self.gateways, avoid)
        return host, port, self.pin
