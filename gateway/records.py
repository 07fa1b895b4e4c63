"""What storage keeps and returns, shared by the core and every storage backend.

Below both: the core's storage interface (`core.storage.Storage`) speaks in these types, and
a backend (the SQLite `store`, later the site cluster's) returns them without importing the
core.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

TOKEN_RE = re.compile(r"^[0-9a-f]{64}$")


def is_token(value: str) -> bool:
    """A device token: 64 lowercase hex characters (an HMAC-SHA256, see core.tokens)."""
    return bool(TOKEN_RE.fullmatch(value))


class StorageFailed(Exception):
    """A read or write the storage could not do now (full disk, I/O error, damage).

    `full` marks the case callers can explain and that heals by itself once space is free;
    `detail` is the backend's own words ("database or disk is full").
    """

    def __init__(self, detail: str, full: bool = False) -> None:
        self.full = full
        self.detail = detail
        super().__init__(f"{'storage full' if full else 'storage failing'}: {detail}")


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
