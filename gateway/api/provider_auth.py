"""Provider authentication the APNs way: ES256 JWTs (kid, iss = team, iat), keys per team.

Servers keep the .p8 private key; the gateway needs only its public half. Verified tokens
are cached, since a provider reuses one token for up to an hour.
"""

from __future__ import annotations

import hmac
from collections import OrderedDict
from dataclasses import dataclass

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.api.errors import ApiError
from gateway.core.assertions import BadClaim, numeric_date

MAX_AGE = 3600.0
CLOCK_SKEW = 60.0


@dataclass(frozen=True)
class ProviderKey:
    team_id: str
    key_id: str
    public_key: ec.EllipticCurvePublicKey
    topics: tuple[str, ...]
    admin: bool = False

    @property
    def name(self) -> str:
        return "admin" if self.admin else f"{self.team_id}/{self.key_id}"


ADMIN = ProviderKey("", "", None, (), admin=True)  # type: ignore[arg-type]


class ProviderAuth:
    def __init__(self, keys: list[ProviderKey], admin_token: str | None = None,
                 cache_size: int = 1024) -> None:
        self._keys = {(k.team_id, k.key_id): k for k in keys}
        self._by_kid = {k.key_id: k for k in keys}
        self._admin = admin_token
        self._cache: OrderedDict[str, tuple[ProviderKey, float]] = OrderedDict()
        self._cache_size = cache_size

    @property
    def has_admin(self) -> bool:
        return bool(self._admin)

    def is_admin(self, token: str) -> bool:
        """The admin token (the console's sign-in), compared in constant time."""
        admin = self._admin
        return admin is not None and admin != "" and hmac.compare_digest(
            token.encode(), admin.encode())

    def authenticate(self, authorization: str | None, now: float,
                     allow_admin: bool = False) -> ProviderKey:
        if not authorization:
            raise ApiError("MissingProviderToken", "no authorization header")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiError("MissingProviderToken", "authorization must be 'bearer <JWT>'")
        if self._admin and hmac.compare_digest(token.encode(), self._admin.encode()):
            if allow_admin:
                return ADMIN
            raise ApiError("InvalidProviderToken", "the admin token cannot push")
        cached = self._cache.get(token)
        if cached is None:
            cached = self._verify(token)
            self._cache[token] = cached
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        key, iat = cached
        if now - iat > MAX_AGE:
            raise ApiError("ExpiredProviderToken", "the token's iat is over an hour old")
        if iat > now + CLOCK_SKEW:
            raise ApiError("InvalidProviderToken", "the token's iat is in the future")
        return key

    def _verify(self, token: str) -> tuple[ProviderKey, float]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise ApiError("InvalidProviderToken", "not a JWT") from None
        if header.get("alg") != "ES256":
            raise ApiError("InvalidProviderToken", "the token must be signed with ES256")
        kid = header.get("kid")
        key = self._by_kid.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise ApiError("InvalidProviderToken", "unknown key id")
        try:
            claims = jwt.decode(token, key.public_key, algorithms=["ES256"],
                                options={"require": ["iss", "iat"], "verify_exp": False,
                                         "verify_iat": False, "verify_nbf": False})
        except jwt.PyJWTError as exc:
            raise ApiError("InvalidProviderToken", f"token refused: {exc}") from None
        iss = claims["iss"]
        if not isinstance(iss, str):
            raise ApiError("InvalidProviderToken", "iss must be a string: the team id")
        if (iss, key.key_id) not in self._keys:
            raise ApiError("InvalidProviderToken", "the key does not belong to that team")
        try:
            iat = numeric_date(claims, "iat")
            numeric_date(claims, "exp")  # exp and nbf are not enforced, but never garbage
            numeric_date(claims, "nbf")
        except BadClaim as exc:
            raise ApiError("InvalidProviderToken", str(exc)) from None
        assert iat is not None  # required above
        return key, iat
