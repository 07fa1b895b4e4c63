"""User assertions: a JWT from the app's backend that binds a device to a user.

Also the one rule for a JWT's time claims, which provider tokens (gateway/api) share.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt

# the end of year 9999: a JWT time past it is garbage, not "valid for ever"
MAX_NUMERIC_DATE = 253402300799


class AssertionRejected(Exception):
    pass


class BadClaim(ValueError):
    """A JWT claim of the wrong type or out of range."""


def numeric_date(claims: Mapping[str, Any], name: str) -> float | None:
    """A time claim (iat, exp, nbf) as epoch seconds, None when absent; raises BadClaim.

    PyJWT's json accepts NaN and Infinity and ints of any size: NaN compares false to every
    time (a token that never expires), and a huge int overflowed float() into a 500.
    """
    if name not in claims:
        return None
    value = claims[name]
    # NaN fails the range test too
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not 0 <= value <= MAX_NUMERIC_DATE:
        raise BadClaim(f"'{name}' must be a number of seconds since 1970, at most "
                       f"{MAX_NUMERIC_DATE} (year 9999)")
    return float(value)


@dataclass(frozen=True)
class AssertionPolicy:
    hs256_secret: bytes | None = None
    es256_public_key: str | None = None  # PEM
    audience: str | None = None
    issuer: str | None = None
    leeway: float = 30.0
    required: bool = False

    @property
    def enabled(self) -> bool:
        return bool(self.hs256_secret or self.es256_public_key)


def verify_assertion(policy: AssertionPolicy, token: str, now: float) -> str:
    """Return the user (`sub`); `now` is passed in so expiry is testable without waiting."""
    return verified_binding(policy, token, now)[0]


def verified_binding(policy: AssertionPolicy, token: str, now: float) -> tuple[str, float]:
    """The user (`sub`) and until when the assertion holds (`exp` plus the leeway): a
    binding it makes ends then."""
    if not policy.enabled:
        raise AssertionRejected("this gateway has no assertion key configured")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise AssertionRejected(f"assertion is not a JWT: {exc}") from None
    alg = header.get("alg")
    if alg == "HS256" and policy.hs256_secret:
        key: bytes | str = policy.hs256_secret
    elif alg == "ES256" and policy.es256_public_key:
        key = policy.es256_public_key
    else:
        raise AssertionRejected(f"assertion algorithm {str(alg)[:16]!r} is not accepted here")
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=[alg],
            audience=policy.audience,
            issuer=policy.issuer,
            options={
                "require": ["exp", "sub"],
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
                "verify_aud": policy.audience is not None,
                "verify_iss": policy.issuer is not None,
            },
        )
    except jwt.PyJWTError as exc:
        raise AssertionRejected(f"assertion refused: {exc}") from None
    try:
        exp = numeric_date(claims, "exp")
        nbf = numeric_date(claims, "nbf")
        numeric_date(claims, "iat")  # not used, but never garbage
    except BadClaim as exc:
        raise AssertionRejected(f"assertion refused: {exc}") from None
    assert exp is not None  # required above
    if now > exp + policy.leeway:
        raise AssertionRejected("assertion has expired")
    if nbf is not None and now + policy.leeway < nbf:
        raise AssertionRejected("assertion is not valid yet")
    sub = claims["sub"]
    if not isinstance(sub, str) or not 0 < len(sub) <= 128:
        raise AssertionRejected("assertion 'sub' must be a user name of 1 to 128 characters")
    return sub, exp + policy.leeway
