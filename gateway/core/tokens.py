"""Device tokens: unguessable, and stable per install and topic without storing install ids."""

from __future__ import annotations

import hashlib
import hmac
import re

TOKEN_RE = re.compile(r"^[0-9a-f]{64}$")


def derive_token(secret: bytes, install_id: str, topic: str) -> str:
    """HMAC so that a token reveals nothing and the install id never has to be kept."""
    message = f"lpgw-token\x00{install_id.lower()}\x00{topic}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def is_token(value: str) -> bool:
    return bool(TOKEN_RE.fullmatch(value))


def short(token: str) -> str:
    """What logs may show of a token."""
    return token[:8] + "…"
