"""What a provider asks for; what storage keeps is in `gateway.records`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PushRequest:
    """A push as a provider asks for it (APNs semantics)."""

    push_type: str
    payload: dict[str, Any]
    priority: int | None = None  # None: the push type's default (core.push_rules)
    expiration: int | None = None  # epoch seconds; 0 = now or never; None = store default
    collapse_id: str | None = None
    push_id: str | None = None  # apns-id; made when absent
    # the APNs topic as the provider named it (`<bundle id>`, or `<bundle id>.voip` for a
    # voip push: core.push_rules.app_topic); None: not checked against the device's app
    topic: str | None = None
