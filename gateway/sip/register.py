"""lpgw registers with the PBX as an extra contact for configured accounts, so the PBX forks
their calls to it like to a desk phone; and pings the PBX with OPTIONS. Sans-IO.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import secrets
from dataclasses import dataclass, field

from sipmessage import AuthChallenge, AuthCredentials
from sipmessage.auth import AuthParameters

from gateway.sip.message import SipError, SipMessage
from gateway.sip.transaction import MAGIC, Peer

log = logging.getLogger("lpgw.sip.register")

BACKOFF_MIN, BACKOFF_MAX = 5.0, 300.0
REFRESH_AT = 0.8  # of the granted lifetime
HASHES = {"MD5": hashlib.md5, "SHA-256": hashlib.sha256}


class RegState(enum.StrEnum):
    """One account's registration with the PBX (a str, so `lpgw status` reads as before)."""

    UNREGISTERED = "unregistered"
    REGISTERING = "registering"
    REGISTERED = "registered"
    FAILED = "failed"


@dataclass(frozen=True)
class Account:
    user: str
    password: str = field(repr=False)
    domain: str
    auth_user: str = ""
    expires: int = 600


def digest(challenge: AuthChallenge, account: Account, method: str, uri: str,
           nc: int) -> AuthCredentials:
    """RFC 2617 / RFC 8760 digest credentials for one challenge (MD5 or SHA-256, qop=auth)."""
    p = challenge.parameters
    algorithm = (p.get("algorithm") or "MD5").upper()
    if algorithm not in HASHES:
        raise SipError(f"digest algorithm {algorithm} is not supported", 0)
    h = HASHES[algorithm]

    def hx(text: str) -> str:
        return h(text.encode()).hexdigest()

    user = account.auth_user or account.user
    realm, nonce = p.get("realm") or "", p.get("nonce") or ""
    ha1 = hx(f"{user}:{realm}:{account.password}")
    ha2 = hx(f"{method}:{uri}")
    params = {"username": user, "realm": realm, "nonce": nonce, "uri": uri,
              "algorithm": algorithm}
    qops = [q.strip() for q in (p.get("qop") or "").split(",") if q.strip()]
    if "auth" in qops:
        cnonce = secrets.token_hex(8)
        params.update(qop="auth", nc=f"{nc:08x}", cnonce=cnonce,
                      response=hx(f"{ha1}:{nonce}:{nc:08x}:{cnonce}:auth:{ha2}"))
    elif qops:
        raise SipError(f"qop {qops} is not supported", 0)
    else:
        params["response"] = hx(f"{ha1}:{nonce}:{ha2}")
    if p.get("opaque") is not None:
        params["opaque"] = p["opaque"]
    return AuthCredentials(scheme="Digest", parameters=AuthParameters(**params))


@dataclass(eq=False)
class Registration:
    """One account: REGISTER, answer the challenge, refresh before expiry, back off."""

    account: Account
    state: RegState = RegState.UNREGISTERED
    due: float = 0.0
    expires_at: float = 0.0
    last_error: str = ""
    call_id: str = field(default_factory=lambda: secrets.token_hex(8) + "@lpgw")
    cseq: int = 0
    backoff: float = BACKOFF_MIN
    challenge: AuthChallenge | None = None
    challenge_header: str = "authorization"
    nc: int = 0
    answered_nonce: str | None = None
    tag: str = field(default_factory=lambda: secrets.token_hex(4))

    def status(self, now: float) -> dict:
        return {"user": self.account.user, "state": self.state,
                "expires_in": round(self.expires_at - now) if self.state == RegState.REGISTERED
                else None, "error": self.last_error or None}


class PbxLink:
    """Registrations and keepalives toward one PBX."""

    def __init__(self, accounts: list[Account], pbx: Peer, contact: tuple[str, int],
                 keepalive: float, now: float) -> None:
        self.pbx = pbx
        self.contact = contact
        self.keepalive = keepalive
        self.registrations = [Registration(a, due=now) for a in accounts]
        self.next_ping = now + keepalive  # registering shows reachability sooner
        self.pbx_ok: bool | None = None
        self.last_ping_ok = 0.0
        self._ping_cseq = 0
        self._ping_call_id = secrets.token_hex(8) + "@lpgw"

    # --- what to send, when -----------------------------------------------------------

    def clock_stepped(self, delta: float) -> None:
        """The wall clock jumped `delta` s: refreshes and keepalives keep their intervals
        (a step back of an hour would otherwise let every registration lapse)."""
        self.next_ping += delta
        self.last_ping_ok += delta
        for reg in self.registrations:
            reg.due += delta
            reg.expires_at += delta

    def next_timer(self) -> float | None:
        times = [r.due for r in self.registrations if r.state != RegState.REGISTERING]
        times.append(self.next_ping)
        return min(times)

    def due_requests(self, now: float) -> list[tuple[SipMessage, object]]:
        """Requests to send now, each with the context its response must come back with."""
        out: list[tuple[SipMessage, object]] = []
        for reg in self.registrations:
            if reg.state != RegState.REGISTERING and now >= reg.due:
                try:
                    out.append((self._register(reg), reg))
                except SipError as exc:  # a challenge we cannot answer (algorithm, qop)
                    reg.challenge = None
                    self._failed(reg, str(exc), now)
                except Exception:
                    # never left "registering" with nothing in flight (it would never be
                    # tried again); the bridge counts and logs what raised
                    reg.challenge = None
                    self._failed(reg, "internal error", now)
                    raise
        if now >= self.next_ping:
            self.next_ping = now + self.keepalive
            out.append((self._options(), self))
        return out

    def _register(self, reg: Registration) -> SipMessage:
        reg.state = RegState.REGISTERING
        reg.cseq += 1
        a = reg.account
        uri = f"sip:{a.domain}"
        msg = self._base("REGISTER", uri, f"sip:{a.user}@{a.domain}", reg.call_id, reg.cseq,
                         reg.tag)
        host, port = self.contact
        transport = "" if self.pbx.transport == "udp" else f";transport={self.pbx.transport}"
        msg.headers.append(("contact", f"<sip:{a.user}@{_hostport(host, port)}{transport}>"))
        msg.headers.append(("expires", str(a.expires)))
        if reg.challenge is not None:
            reg.nc += 1
            creds = digest(reg.challenge, a, "REGISTER", uri, reg.nc)
            msg.headers.append((reg.challenge_header, str(creds)))
            reg.answered_nonce = reg.challenge.parameters.get("nonce")
        return msg

    def _options(self) -> SipMessage:
        self._ping_cseq += 1
        return self._base("OPTIONS", f"sip:{self.pbx.host}:{self.pbx.port}",
                          f"sip:lpgw@{self.pbx.host}", self._ping_call_id, self._ping_cseq,
                          "ka")

    def _base(self, method: str, uri: str, to: str, call_id: str, cseq: int,
              tag: str) -> SipMessage:
        host, port = self.contact
        msg = SipMessage(method=method, uri=uri)
        msg.headers += [
            ("via", f"SIP/2.0/{self.pbx.transport.upper()} {_hostport(host, port)};"
                    f"branch={MAGIC}{secrets.token_hex(8)};rport"),
            ("max-forwards", "70"),
            ("from", f"<{to}>;tag={tag}"),
            ("to", f"<{to}>"),
            ("call-id", call_id),
            ("cseq", f"{cseq} {method}"),
            ("user-agent", "lpgw"),
        ]
        return msg

    # --- what came back ---------------------------------------------------------------

    def on_response(self, context: object, response: SipMessage | None, now: float) -> None:
        """A final response to one of our requests, or None when it timed out."""
        if context is self:
            ok = response is not None and response.status < 500
            if ok != self.pbx_ok:
                log.info("PBX %s:%s %s", self.pbx.host, self.pbx.port,
                         "answers" if ok else "does not answer")
            self.pbx_ok = ok
            if ok:
                self.last_ping_ok = now
            return
        if not isinstance(context, Registration):
            return
        reg = context
        if response is None:
            self._failed(reg, "no answer from the PBX", now)
        elif response.status in (401, 407):
            header = "www-authenticate" if response.status == 401 else "proxy-authenticate"
            try:
                challenge = AuthChallenge.parse(response.get(header) or "")
            except ValueError:
                self._failed(reg, f"unreadable {header}", now)
                return
            nonce = challenge.parameters.get("nonce")
            if reg.answered_nonce == nonce and not _stale(response):
                reg.challenge = None
                self._failed(reg, "the PBX refused the credentials", now)
                return
            reg.challenge, reg.nc = challenge, 0  # a first or a fresh challenge: answer it
            reg.challenge_header = ("authorization" if response.status == 401
                                    else "proxy-authorization")
            reg.state, reg.due = RegState.UNREGISTERED, now
        elif 200 <= response.status < 300:
            granted = _granted(response, reg.account)
            reg.state = RegState.REGISTERED
            reg.expires_at = now + granted
            reg.due = now + granted * REFRESH_AT
            reg.backoff = BACKOFF_MIN
            reg.last_error = ""
            log.info("registered %s with the PBX for %d s", reg.account.user, granted)
        else:
            self._failed(reg, f"{response.status} {response.reason}".strip(), now)

    def _failed(self, reg: Registration, why: str, now: float) -> None:
        reg.state = RegState.FAILED
        reg.last_error = why
        reg.due = now + reg.backoff
        log.warning("registering %s failed (%s); again in %.0f s", reg.account.user, why,
                    reg.backoff)
        reg.backoff = min(reg.backoff * 2, BACKOFF_MAX)

    def status(self, now: float) -> dict:
        return {"pbx": f"{self.pbx.transport}:{self.pbx.host}:{self.pbx.port}",
                "reachable": self.pbx_ok,
                "last_answer_ago": round(now - self.last_ping_ok, 1) if self.last_ping_ok
                else None,
                "registrations": [r.status(now) for r in self.registrations]}


def _granted(response: SipMessage, account: Account) -> int:
    """The lifetime the registrar granted: our Contact's expires, else Expires."""
    for contact in response.get_all("contact"):
        if f"sip:{account.user}@" in contact:
            for param in contact.split(";")[1:]:
                name, _, value = param.partition("=")
                if name.strip().lower() == "expires" and value.strip().isdigit():
                    return max(1, int(value))
    expires = response.get("expires")
    if expires and expires.isdigit():
        return max(1, int(expires))
    return account.expires


def _stale(response: SipMessage) -> bool:
    header = response.get("www-authenticate") or response.get("proxy-authenticate") or ""
    return "stale=true" in header.replace(" ", "").lower()


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
