"""Device tokens: unguessable, and stable per install and topic without storing install ids."""

from __future__ import annotations

import hashlib
import hmac
import uuid


def derive_token(secret: bytes, install_id: str, topic: str) -> str:
    """HMAC so that a token reveals nothing and the install id never has to be kept."""
    message = f"lpgw-token\x00{install_id.lower()}\x00{topic}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def short(token: str) -> str:
    """What logs may show of a token."""
    return token[:8] + "…"


# `lpgw selftest` connects test devices of its own: the gateway knows them by install id, so
# it can keep them out of the operators' counters and delete them once they leave
SELFTEST_NS = uuid.UUID("6c7067772d73656c66746573742d6964")
SELFTEST_TOPIC = "lpgw.selftest"
SELFTEST_TRANSPORTS = ("quic", "tls")


def selftest_install(gateway_id: str, transport: str) -> str:
    """The install id of the self-test's device over `transport` on this gateway."""
    return str(uuid.uuid5(SELFTEST_NS, f"{gateway_id}/{transport}"))


def selftest_tokens(secret: bytes, gateway_id: str) -> frozenset[str]:
    """The tokens the self-test's devices get on this gateway."""
    return frozenset(derive_token(secret, selftest_install(gateway_id, t), SELFTEST_TOPIC)
                     for t in SELFTEST_TRANSPORTS)
