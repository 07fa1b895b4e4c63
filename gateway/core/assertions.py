"""User assertions: a JWT from the app's backend that binds a device to a user."""

from __future__ import annotations

from dataclasses import dataclass

import jwt


class AssertionRejected(Exception):
    pass


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
        raise AssertionRejected(f"assertion algorithm {alg!r} is not accepted here")
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
    exp = claims["exp"]
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        raise AssertionRejected("assertion 'exp' is not a number")
    if now > exp + policy.leeway:
        raise AssertionRejected("assertion has expired")
    nbf = claims.get("nbf")
    if isinstance(nbf, int | float) and now + policy.leeway < nbf:
        raise AssertionRejected("assertion is not valid yet")
    sub = claims["sub"]
    if not isinstance(sub, str) or not 0 < len(sub) <= 128:
        raise AssertionRejected("assertion 'sub' must be a user name of 1 to 128 characters")
    return sub
