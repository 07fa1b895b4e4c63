"""The operator console at /console/ on the API port: for the admin token's holder only.

Signing in exchanges the admin token (api.admin_token_file) for a session: a random id in
a cookie (HttpOnly, Secure, SameSite=Strict, Path=/console, expiring) and a CSRF token
the page sends back in a header with every action. Sessions live in memory, at most
MAX_SESSIONS, each for SESSION_TTL; sign-in attempts are limited per minute. The page is
static (gateway/console/: HTML, one script, one style sheet, served with a strict
Content-Security-Policy: no inline script, nothing from elsewhere); it reads
/console/api/state every 2 s. Actions go through the same core paths as the API and the
CLI (Delivery.submit, Storage.bind_user). Nothing runs while nobody looks.
"""

from __future__ import annotations

import hmac
import importlib.resources
import json
import secrets
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.api.exchange import JSON, Request, Response
from gateway.api.provider_auth import ProviderAuth
from gateway.core.delivery import Delivery, Rejected
from gateway.core.metrics import Metrics
from gateway.core.model import PushRequest
from gateway.core.storage import Storage
from gateway.records import is_token

COOKIE = "lpgw_console"
SESSION_TTL = 8 * 3600.0  # seconds a sign-in lasts
MAX_SESSIONS = 32  # more sign-ins push the oldest session out
SIGN_INS_PER_MINUTE = 10  # attempts (right or wrong) per minute, for the whole gateway
PAGE_SIZE = 50
SECURITY_HEADERS = [
    ("content-security-policy", "default-src 'none'; script-src 'self'; style-src 'self'; "
                                "connect-src 'self'; img-src 'self'; form-action 'self'; "
                                "frame-ancestors 'none'; base-uri 'none'"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("cache-control", "no-store"),
]
ASSETS = {"console.js": "text/javascript; charset=utf-8",
          "console.css": "text/css; charset=utf-8"}


@dataclass
class Session:
    csrf: str
    expires: float


class Sessions:
    """Sign-ins, in memory (a restart signs everyone out), bounded."""

    def __init__(self) -> None:
        self._by_id: dict[str, Session] = {}
        self._attempts: list[float] = []

    def allow_attempt(self, now: float) -> bool:
        self._attempts = [t for t in self._attempts if now - t < 60]
        if len(self._attempts) >= SIGN_INS_PER_MINUTE:
            return False
        self._attempts.append(now)
        return True

    def create(self, now: float) -> tuple[str, Session]:
        self._drop_expired(now)
        while len(self._by_id) >= MAX_SESSIONS:
            oldest = min(self._by_id, key=lambda sid: self._by_id[sid].expires)
            del self._by_id[oldest]
        sid = secrets.token_urlsafe(32)
        session = self._by_id[sid] = Session(secrets.token_urlsafe(32), now + SESSION_TTL)
        return sid, session

    def get(self, sid: str | None, now: float) -> Session | None:
        session = self._by_id.get(sid or "")
        if session is None or session.expires <= now:
            return None
        return session

    def drop(self, sid: str | None) -> None:
        self._by_id.pop(sid or "", None)

    def _drop_expired(self, now: float) -> None:
        for sid in [s for s, v in self._by_id.items() if v.expires <= now]:
            del self._by_id[sid]

    def __len__(self) -> int:
        return len(self._by_id)


def _asset(name: str) -> bytes:
    return importlib.resources.files("gateway").joinpath("console", name).read_bytes()


def _cookie_of(req: Request) -> str | None:
    for key, value in req.headers:
        if key.lower() == "cookie":
            for part in value.split(";"):
                name, _, val = part.strip().partition("=")
                if name == COOKIE:
                    return val
    return None


def _header(req: Request, name: str) -> str | None:
    return next((v for k, v in req.headers if k.lower() == name), None)


def _page(status: int, body: bytes, kind: str = "text/html; charset=utf-8",
          extra: list[tuple[str, str]] | None = None) -> Response:
    return Response(status, [("content-type", kind), *SECURITY_HEADERS, *(extra or [])], body)


def _json(status: int, value: Any) -> Response:
    return Response(status, [("content-type", JSON), *SECURITY_HEADERS],
                    json.dumps(value).encode())


class Console:
    def __init__(self, delivery: Delivery, storage: Storage,
                 status: Callable[[], dict], metrics: Metrics) -> None:
        self.metrics = metrics
        self.delivery = delivery
        self.storage = storage
        self.status = status
        self.sessions = Sessions()
        # the pushes of the last hour, sampled by the gateway (Gateway.push_history)
        self.history: Callable[[], dict] = lambda: {}
        # starts the self-test inside the gateway (Gateway.start_selftest); False: one runs
        self.selftest: Callable[[], bool] = lambda: False

    def handle(self, req: Request, path: str, query: str, now: float,
               auth: ProviderAuth) -> Response:
        """`auth`: the API's keys as now (a reload may change the admin token)."""
        if path in ("/console", "/console/"):
            if self._session(req, now) is None:
                return Response(303, [("location", "/console/sign-in"), *SECURITY_HEADERS])
            return _page(200, _asset("index.html"))
        if path == "/console/sign-in":
            if req.method == "POST":
                return self._sign_in(req, now, auth)
            return _page(200, _asset("sign-in.html"))
        name = path.removeprefix("/console/")
        if name in ASSETS:
            return _page(200, _asset(name), ASSETS[name])
        session = self._session(req, now)
        if session is None:
            return _json(401, {"reason": "SignInRequired",
                               "message": "sign in at /console/sign-in first"})
        if path == "/console/api/state":
            return _json(200, self._state(session, query, now))
        if path == "/console/api/device":
            return self._device(query)
        if req.method != "POST":
            return _json(405, {"reason": "MethodNotAllowed", "message": "use POST"})
        sent = _header(req, "x-csrf-token") or ""
        if not hmac.compare_digest(sent.encode(), session.csrf.encode()):
            return _json(403, {"reason": "BadCsrfToken",
                               "message": "the page's CSRF token is missing or wrong"})
        if path == "/console/api/sign-out":
            self.sessions.drop(_cookie_of(req))
            self.metrics.console_sessions.set(len(self.sessions))
            return _json(200, {"ok": True})
        try:
            body = json.loads(req.body or b"{}")
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return _json(400, {"reason": "BadRequest", "message": "a JSON object"})
        if path == "/console/api/push":
            return self._push(body, now)
        if path == "/console/api/bind":
            return self._bind(body)
        if path == "/console/api/disconnect":
            return self._disconnect(body)
        if path == "/console/api/selftest":
            started = self.selftest()
            return _json(202 if started else 409, {
                "ok": started, "message": "the self-test runs; the page shows it when done"
                if started else "a self-test is under way"})
        return _json(404, {"reason": "BadPath", "message": "no such path"})

    # --- signing in -----------------------------------------------------------------

    def _session(self, req: Request, now: float) -> Session | None:
        return self.sessions.get(_cookie_of(req), now)

    def _sign_in(self, req: Request, now: float, auth: ProviderAuth) -> Response:
        if not self.sessions.allow_attempt(now):
            self.metrics.console_sign_ins.labels("limited").inc()
            return _page(429, b"Too many sign-in attempts: wait a minute.\n",
                         "text/plain; charset=utf-8")
        form = urllib.parse.parse_qs((req.body or b"").decode("utf-8", "replace"))
        given = (form.get("token") or [""])[0].strip()
        if not auth.is_admin(given):
            self.metrics.console_sign_ins.labels("refused").inc()
            why = ("that is not the admin token" if auth.has_admin
                   else "this gateway has no admin token (api.admin_token_file)")
            return _page(403, f"Not signed in: {why}. Go back and try again.\n".encode(),
                         "text/plain; charset=utf-8")
        sid, _ = self.sessions.create(now)
        self.metrics.console_sign_ins.labels("ok").inc()
        self.metrics.console_sessions.set(len(self.sessions))
        cookie = (f"{COOKIE}={sid}; Path=/console; Max-Age={int(SESSION_TTL)}; HttpOnly; "
                  "Secure; SameSite=Strict")
        return Response(303, [("location", "/console/"), ("set-cookie", cookie),
                              *SECURITY_HEADERS])

    # --- what the page shows --------------------------------------------------------

    def _state(self, session: Session, query: str, now: float) -> dict[str, Any]:
        params = urllib.parse.parse_qs(query)
        search = (params.get("q") or [""])[0].strip().lower()[:128]
        try:
            page = max(0, int((params.get("page") or ["0"])[0]))
        except ValueError:
            page = 0
        connected = self.delivery.connected()
        total, shown = self.storage.device_page(search, page * PAGE_SIZE, PAGE_SIZE)
        last = self.delivery.last_fates({d.token for d in shown})
        return {"now": now, "gateway": self.status(), "pushes": self.history(),
                "devices": {"total": total, "page": page, "page_size": PAGE_SIZE,
                            "items": [{"token": d.token, "topic": d.topic, "user": d.user,
                                       "transport": connected.get(d.token),
                                       "last_seen": d.last_seen,
                                       "queued": self.storage.count_pending(d.token),
                                       "last_push": last.get(d.token)}
                                      for d in shown]},
                "csrf": session.csrf}

    def _device(self, query: str) -> Response:
        token = (urllib.parse.parse_qs(query).get("token") or [""])[0].lower()
        device = self.storage.device(token) if is_token(token) else None
        if device is None:
            return _json(404, {"reason": "BadDeviceToken", "message": "no such device"})
        return _json(200, {
            "token": device.token, "topic": device.topic, "user": device.user,
            "push_types": list(device.push_types),
            "transport": self.delivery.connected().get(device.token),
            "created": device.created_at, "last_seen": device.last_seen,
            "unregistered": device.unregistered_at,
            "queued": self.storage.count_pending(device.token),
            "pushes": self.delivery.pushes_of(device.token)})

    # --- actions: the core's own paths ----------------------------------------------

    def _push(self, body: dict[str, Any], now: float) -> Response:
        token = body.get("token")
        if not isinstance(token, str) or not is_token(token):
            return _json(400, {"reason": "BadDeviceToken", "message": "a device token"})
        request = PushRequest(push_type="alert", payload={"aps": {
            "alert": {"title": "lpgw", "body": "A test push from the console"}}},
            priority=None, expiration=None, collapse_id=None, push_id=None, topic=None)
        try:
            accepted = self.delivery.submit(token, request, now)
        except Rejected as exc:
            return _json(400, {"reason": exc.reason, "message": str(exc)})
        reply = {"ok": True, "push_id": accepted.push_id, "sent": accepted.sent}
        return Response(200, [("content-type", JSON), *SECURITY_HEADERS],
                        json.dumps(reply).encode(), ticket=accepted.ticket,
                        after_commit=accepted.ticket is not None)  # a site keeps it first

    def _disconnect(self, body: dict[str, Any]) -> Response:
        token = body.get("token")
        if not isinstance(token, str) or not is_token(token):
            return _json(400, {"reason": "BadDeviceToken", "message": "a device token"})
        if not self.delivery.disconnect(token, "disconnected by an operator (console)"):
            return _json(400, {"reason": "NotConnected",
                               "message": "the device is not connected to this gateway"})
        return _json(200, {"ok": True})

    def _bind(self, body: dict[str, Any]) -> Response:
        token, user = body.get("token"), body.get("user")
        if not isinstance(token, str) or not is_token(token) or not (
                user is None or (isinstance(user, str) and 0 < len(user) <= 128)):
            return _json(400, {"reason": "BadRequest",
                               "message": "token, and user (1 to 128 characters, or null)"})
        if not self.storage.bind_user(token, user):
            return _json(400, {"reason": "BadDeviceToken", "message": "no such device"})
        self.delivery.device_changed(token)
        return _json(200, {"ok": True, "token": token, "user": user})
