"""What a push is, before and after it is accepted."""

from __future__ import annotations

from dataclasses import dataclass, field
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
    topic: str | None = None


@dataclass(frozen=True)
class StoredPush:
    token: str
    seq: int
    push_id: str
    push_type: str
    priority: int
    expiration: int
    payload_json: str
    collapse_id: str | None
    accepted_at: float


@dataclass(frozen=True)
class DeviceRecord:
    token: str
    topic: str
    push_types: tuple[str, ...]
    user: str | None
    created_at: float
    last_seen: float
    acked_seq: int
    next_seq: int
    unregistered_at: float | None = None
    user_expires: float | None = None  # a binding from an assertion ends then
    extra: dict[str, Any] = field(default_factory=dict)
