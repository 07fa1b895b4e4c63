"""An API request and its answer, as the router and its parts see them (the HTTP/1.1 and
HTTP/2 shell in api/server.py makes the one and writes the other)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

JSON = "application/json"


@dataclass
class Request:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    http2: bool = True
    # when it arrived on the monotonic clock (rate limits are intervals: a step of the wall
    # clock must not empty every bucket for an hour); None: use the wall-clock `now`
    mono: float | None = None


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    after_commit: bool = False  # send only once the open group commit is on disk
    ticket: int | None = None  # in a site: send once the site has kept this push

    @classmethod
    def json(cls, status: int, value: Any, headers: list | None = None) -> Response:
        return cls(status, [("content-type", JSON), *(headers or [])],
                   json.dumps(value).encode())
