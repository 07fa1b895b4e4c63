"""What one client of the provider API may cost: connections, streams, buffered bytes, resets
and time. Sans-IO: counts and `now` in, verdicts out; api/server.py carries them out.

The API port is reachable from the Wi-Fi unless the site firewalls it (docs/security.md):
before these, a rapid-reset burst stalled other providers for seconds, unfinished bodies on
10 connections held 77 MiB before any authentication, and idle connections were never
closed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ApiLimits:
    handshake_timeout: float = 10.0  # TLS and the first request
    request_timeout: float = 10.0  # a started request's whole body
    idle_timeout: float = 3600.0
    max_connections: int = 256
    max_connections_per_source: int = 32
    max_concurrent_streams: int = 128
    max_buffered_bytes: int = 1 << 20  # request bytes held per connection
    reset_rate: float = 20.0  # stream resets per second a connection may cause, sustained
    reset_burst: int = 200


class TokenBucket:
    """`burst` tokens, refilled at `rate` a second; `now` is monotonic seconds."""

    __slots__ = ("at", "burst", "rate", "tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.at = float(burst), now

    def take(self, now: float) -> bool:
        self.tokens = min(float(self.burst), self.tokens + max(0.0, now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class ConnectionGate:
    """API connections open now, in all and per source address; refuses past the caps so
    that the descriptors left are the devices'."""

    def __init__(self, limits: ApiLimits) -> None:
        self.limits = limits
        self.open = 0
        self._by_source: dict[str, int] = {}

    def admit(self, source: str) -> str | None:
        """None when `source` may open one more (it is counted), else why not."""
        if self.open >= self.limits.max_connections:
            return "max_connections"
        if self._by_source.get(source, 0) >= self.limits.max_connections_per_source:
            return "max_connections_per_source"
        self.open += 1
        self._by_source[source] = self._by_source.get(source, 0) + 1
        return None

    def release(self, source: str) -> None:
        self.open -= 1
        left = self._by_source.get(source, 1) - 1
        if left > 0:
            self._by_source[source] = left
        else:
            self._by_source.pop(source, None)  # the table holds open sources only


def descriptor_split(open_files: int, limits: ApiLimits, reserved: int = 64) -> tuple[int, int]:
    """(API connections, devices) the open-file limit allows: the API's cap comes first,
    `reserved` go to the store, sockets and logs, the rest are the devices'."""
    api = min(limits.max_connections, max(0, open_files - reserved))
    return api, max(0, open_files - reserved - api)
