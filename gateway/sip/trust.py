"""Who may send the SIP bridge requests: trusted source addresses, and optionally digest
authentication of INVITE and MESSAGE (RFC 3261 22.4, RFC 2617 with qop=auth). Sans-IO:
addresses, messages and `now` in, verdicts and header values out.

The SIP port sits on a Wi-Fi shared with strangers; before this any host could ring a nurse
or put "CODE BLUE" on every phone.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
from dataclasses import dataclass, field

from sipmessage import AuthChallenge, AuthCredentials
from sipmessage.auth import AuthParameters

from gateway.core.addresses import Network, networks, within
from gateway.sip.message import SipMessage

LOOPBACK = ("127.0.0.0/8", "::1")
NONCE_LIFETIME = 300.0  # seconds a nonce is good for; older ones are answered stale=true


class Verdict(enum.Enum):
    OK = "ok"
    CHALLENGE = "challenge"  # no credentials: 401 with a fresh nonce
    STALE = "stale"  # good credentials on an old nonce: 401 stale=true
    BAD = "bad"  # wrong user, password, realm or nonce: 403


@dataclass(frozen=True)
class SourcePolicy:
    """The addresses and networks SIP requests are taken from; `reply`: "403" or "none"."""

    trusted: tuple[Network, ...]
    reply: str = "403"

    def allows(self, host: str) -> bool:
        return within(host, self.trusted)


def source_policy(trusted: tuple[str, ...], pbx_addresses: tuple[str, ...],
                  reply: str) -> SourcePolicy:
    """`sip.trusted`, or when it is empty loopback and the PBX's addresses."""
    return SourcePolicy(networks(trusted or (*LOOPBACK, *pbx_addresses)), reply)


@dataclass(frozen=True)
class DigestPolicy:
    """Inbound digest authentication: `credentials` maps user -> password."""

    realm: str
    credentials: dict[str, str] = field(repr=False)
    key: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)

    def challenge(self, now: float, stale: bool = False) -> str:
        """A WWW-Authenticate value with a nonce only this gateway can have made, when."""
        issued = f"{int(now):x}"
        nonce = f"{issued}.{self._mac(issued)}"
        params = {"realm": self.realm, "nonce": nonce, "qop": "auth", "algorithm": "MD5"}
        if stale:
            params["stale"] = "true"
        return str(AuthChallenge(scheme="Digest", parameters=AuthParameters(**params)))

    def check(self, request: SipMessage, now: float) -> Verdict:
        header = request.get("authorization")
        if not header:
            return Verdict.CHALLENGE
        try:
            creds = AuthCredentials.parse(header)
        except Exception:  # the peer's text: any failure to parse it is just "bad"
            return Verdict.BAD
        p = creds.parameters
        if p is None:
            return Verdict.BAD
        user, nonce = p.get("username") or "", p.get("nonce") or ""
        password = self.credentials.get(user)
        if (creds.scheme.lower() != "digest" or password is None
                or p.get("realm") != self.realm
                or (p.get("algorithm") or "MD5").upper() != "MD5"):
            return Verdict.BAD
        issued, _, mac = nonce.partition(".")
        if not hmac.compare_digest(mac.encode(), self._mac(issued).encode()):
            return Verdict.BAD
        # the digest-uri is hashed as given: PBXs and SIPp name the gateway's address there
        # rather than the Request-URI (what binds the answer to this gateway is the nonce)
        uri = p.get("uri") or ""
        ha1 = _md5(f"{user}:{self.realm}:{password}")
        ha2 = _md5(f"{request.method}:{uri}")
        if p.get("qop") == "auth":
            expected = _md5(f"{ha1}:{nonce}:{p.get('nc') or ''}:{p.get('cnonce') or ''}:auth:"
                            f"{ha2}")
        elif p.get("qop") is None:
            expected = _md5(f"{ha1}:{nonce}:{ha2}")
        else:
            return Verdict.BAD
        if not hmac.compare_digest((p.get("response") or "").lower().encode(),
                                   expected.encode()):
            return Verdict.BAD
        try:
            age = now - int(issued, 16)
        except ValueError:
            return Verdict.BAD
        return Verdict.OK if 0 <= age <= NONCE_LIFETIME else Verdict.STALE

    def _mac(self, issued: str) -> str:
        return hmac.new(self.key, issued.encode(), hashlib.sha256).hexdigest()[:32]


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()  # RFC 2617: what PBXs speak


def read_credentials(text: str) -> dict[str, str]:
    """'user:password' lines; blank lines and '#' comments skipped."""
    found = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and ":" in line:
            user, _, password = line.partition(":")
            found[user.strip()] = password.strip()
    return found
