"""A DeviceLink for core tests: records what the core asks of a connection."""

from __future__ import annotations

from typing import Any

from gateway.core.delivery import Delivery
from gateway.protocol.messages import Push
from gateway.transport.pump import Pump


class FakeLink:
    """A DeviceLink that records every call, in order."""

    def __init__(self, transport: str = "quic") -> None:
        self.transport = transport
        self.events: list[tuple[Any, ...]] = []

    def welcome(self, token: str, user: str | None) -> None:
        self.events.append(("welcome", token, user))

    def send_push(self, push: Push) -> None:
        self.events.append(("push", push))

    def close(self, reason: str, code: str | None = None, message: str | None = None) -> None:
        self.events.append(("close", reason, code, message))

    @property
    def pushes(self) -> list[Push]:
        return [e[1] for e in self.events if e[0] == "push"]

    @property
    def seqs(self) -> list[int]:
        return [p.seq for p in self.pushes]

    @property
    def closes(self) -> list[tuple[Any, ...]]:
        return [e for e in self.events if e[0] == "close"]

    def clear(self) -> None:
        self.events.clear()


class Driven:
    """Delivery as the shells drive it: every call is followed by the gateway's own pump,
    which carries out what the core returned (on FakeLinks here). The core itself never
    calls a link: `test_one_direction` checks that with links that have no methods."""

    def __init__(self, delivery: Delivery) -> None:
        self.core = delivery
        self.pump = Pump(delivery, delivery.metrics)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.core, name)
        if not callable(attr):
            return attr

        def driven(*args: Any, **kwargs: Any) -> Any:
            try:
                return attr(*args, **kwargs)
            finally:
                self.pump.run()

        return driven
