"""Requests to responses, for every path the API serves. No sockets: the shells call `handle`."""

from __future__ import annotations

import functools
import importlib.resources
import json
import logging
import urllib.parse
from collections.abc import Callable
from typing import Any

import yaml
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway import faults
from gateway.api import apns
from gateway.api.console import Console
from gateway.api.errors import ApiError
from gateway.api.exchange import JSON, Request, Response
from gateway.api.provider_auth import ProviderAuth, ProviderKey
from gateway.core.delivery import Delivery, Rejected
from gateway.core.metrics import Metrics
from gateway.core.storage import Storage
from gateway.core.tokens import short
from gateway.records import is_token

log = logging.getLogger("lpgw.api")

def error_response(exc: ApiError, metrics: Metrics) -> Response:
    """An API failure as APNs answers it (status, reason, timestamp), counted."""
    metrics.api_errors.labels(exc.reason).inc()
    body: dict[str, Any] = {"reason": exc.reason}
    if exc.timestamp is not None:
        body["timestamp"] = int(exc.timestamp * 1000)
    if exc.reason not in ("Unregistered",) and str(exc) != exc.reason:
        body["message"] = str(exc)  # lpgw's addition: what exactly was wrong
    return Response.json(exc.status, body,
                         [("allow", exc.allow)] if exc.allow is not None else None)


class RateLimiter:
    """A token bucket per provider key; `now` is monotonic time (see Request.mono)."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, key: str, now: float) -> bool:
        tokens, at = self._buckets.get(key, (float(self.burst), now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (tokens - 1, now)
        return True


class Router:
    def __init__(self, delivery: Delivery, storage: Storage, auth: ProviderAuth,
                 metrics: Metrics, status: Callable[[], dict], limiter: RateLimiter,
                 metrics_need_auth: bool = False) -> None:
        self.delivery = delivery
        self.storage = storage  # device records for /v1 (pushes go through delivery)
        self.auth = auth
        self.metrics = metrics
        self.status = status
        self.limiter = limiter
        self.metrics_need_auth = metrics_need_auth
        self.draining = False
        self.group_commit = False  # the transport commits groups of pushes (one fsync each)
        self.console = Console(delivery, storage, status, metrics)  # /console/

    def handle(self, req: Request, now: float) -> Response:
        """The answer to one request; never raises. The shell adds the request's apns-id."""
        try:
            response = self._route(req, now)
            log.debug("%s: %d", loggable(req.method, req.path), response.status)
            return response
        except ApiError as exc:
            log.debug("%s: %d %s", loggable(req.method, req.path), exc.status, exc.reason)
            return error_response(exc, self.metrics)
        except Exception as exc:  # a bug: this request alone gets 500, the rest go on
            faults.record(self.metrics, "api_request", exc, loggable(req.method, req.path))
            return internal_error(self.metrics)

    def _route(self, req: Request, now: float) -> Response:
        path, _, query = req.path.partition("?")
        if path == "/3/device" or path.startswith("/3/device/"):
            return self._push(req, path, now)
        if path == "/console" or path.startswith("/console/"):
            return self.console.handle(req, path, query, now, self.auth)
        if path == "/openapi.json":
            self._method(req, "GET")
            return Response(200, [("content-type", JSON)], openapi_json())
        if path == "/v1/health":
            self._method(req, "GET")
            return Response.json(200, {"status": "draining" if self.draining else "ok"})
        if path == "/metrics":
            self._method(req, "GET")
            if self.metrics_need_auth:
                self._principal(req, now)
            return Response(200, [("content-type", CONTENT_TYPE_LATEST)],
                            generate_latest(self.metrics.exposed))
        if path == "/status":
            self._method(req, "GET")
            key = self._principal(req, now)
            return Response.json(200, self.status() if key.admin else self._status_of(key))
        if path == "/v1/devices":
            self._method(req, "GET")
            key = self._principal(req, now)
            user = urllib.parse.parse_qs(query).get("user", [None])[0]
            return Response.json(200, {"devices": self._devices(key, user or None)})
        if path.startswith("/v1/devices/"):
            return self._device(req, path.removeprefix("/v1/devices/"), now)
        raise ApiError("BadPath", "no such path")

    # --- APNs -----------------------------------------------------------------------

    def _push(self, req: Request, path: str, now: float) -> Response:
        if not req.http2:
            raise ApiError("HTTP2Required", "APNs requests need HTTP/2 (ALPN h2 or prior "
                                            "knowledge)")
        self._method(req, "POST")
        token = path.removeprefix("/3/device").removeprefix("/")
        if not token:
            raise ApiError("MissingDeviceToken", "the path is /3/device/<token>")
        if "/" in token:
            raise ApiError("BadPath", "the push path is /3/device/<token>")
        if self.draining:
            raise ApiError("Shutdown", "the gateway is stopping; send to another")
        headers = apns.single_headers(req.headers)
        key = self.auth.authenticate(headers.get("authorization"), now)
        if not self.limiter.allow(key.name, now if req.mono is None else req.mono):
            raise ApiError("TooManyRequests", "this key is over its rate limit")
        push = apns.push_request(headers, req.body, key)
        try:
            accepted = self.delivery.submit(token.lower(), push, now, group=self.group_commit)
        except Rejected as exc:
            raise ApiError(exc.reason, str(exc), exc.timestamp) from None
        # the shell echoes a sent apns-id; when none was sent, the id the device sees
        made = [] if "apns-id" in headers else [("apns-id", accepted.push_id)]
        waits = accepted.stored or accepted.ticket is not None
        return Response(200, made, after_commit=self.group_commit and waits,
                        ticket=accepted.ticket)

    # --- lpgw /v1 ---------------------------------------------------------------------

    def _device(self, req: Request, rest: str, now: float) -> Response:
        token, _, sub = rest.partition("/")
        token = token.lower()
        # the path and its method first: a method a path does not take is 405 whatever
        # the token (RFC 9110), before anything is looked up
        if sub == "":
            self._method(req, "GET")
        elif sub != "user":
            raise ApiError("BadPath", "no such path")
        elif req.method not in ("PUT", "DELETE"):
            raise ApiError("MethodNotAllowed", "use PUT or DELETE", allow="PUT, DELETE")
        key = self._principal(req, now)
        if not is_token(token):
            raise ApiError("BadDeviceToken", "a device token is 64 hex characters")
        device = self.storage.device(token)
        if device is None or not self._may_see(key, device.topic):
            raise ApiError("BadDeviceToken", "no device has this token")
        if sub == "":
            return Response.json(200, self._describe(device, self.delivery.connected(), None))
        if req.method == "PUT":
            body = apns.json_body(req.body or b"null")
            user = body.get("user") if isinstance(body, dict) else None
            if not isinstance(user, str) or not 0 < len(user) <= 128:
                raise ApiError("BadPayload", 'the body is {"user": "<1 to 128 characters>"}')
            self.storage.bind_user(token, user)
            self.delivery.device_changed(token)
            log.info("device %s bound to user %s by %s", short(token), user, key.name)
            return Response.json(200, {"token": token, "user": user})
        self.storage.bind_user(token, None)  # DELETE
        self.delivery.device_changed(token)
        log.info("device %s unbound by %s", short(token), key.name)
        return Response(204)

    def _status_of(self, key: ProviderKey) -> dict:
        """/status as a provider key sees it: the gateway, and its own apps' devices only
        (calls, the PBX, storage and the other apps are the site's: the admin token's)."""
        full = self.status()
        connected = self.delivery.connected()
        by_transport: dict[str, int] = {"quic": 0, "tls": 0}
        devices = self.storage.devices(key.topics)
        for device in devices:
            if device.token in connected:
                by_transport[connected[device.token]] += 1
        return {**{k: full.get(k) for k in ("version", "gateway_id", "name", "pin", "listen",
                                             "api", "uptime")},
                "topics": list(key.topics),
                "devices": {"connected": by_transport, "known": len(devices)}}

    def _devices(self, key: ProviderKey, user: str | None) -> list[dict]:
        store = self.storage
        devices = store.devices(None if key.admin else key.topics, user)
        connected = self.delivery.connected()
        queued = store.pending_counts()
        return [self._describe(d, connected, queued) for d in devices]

    def _describe(self, device, connected: dict[str, str], queued: dict | None) -> dict:
        pending = (queued.get(device.token, 0) if queued is not None
                   else self.storage.count_pending(device.token))
        return {"token": device.token, "topic": device.topic, "user": device.user,
                "push_types": list(device.push_types),
                "connected": connected.get(device.token), "queued": pending,
                "last_seen": device.last_seen, "created": device.created_at,
                "unregistered": device.unregistered_at}

    # --- helpers ----------------------------------------------------------------------

    def _principal(self, req: Request, now: float) -> ProviderKey:
        return self.auth.authenticate(_header(req, "authorization"), now, allow_admin=True)

    @staticmethod
    def _may_see(key: ProviderKey, topic: str) -> bool:
        return key.admin or topic in key.topics

    @staticmethod
    def _method(req: Request, allowed: str) -> None:
        if req.method != allowed:
            raise ApiError("MethodNotAllowed", f"use {allowed}", allow=allowed)


@functools.cache
def openapi_json() -> bytes:
    """This API's OpenAPI 3.1 description (gateway/openapi.yaml, also docs/openapi.yaml),
    as JSON: read once, when first asked for."""
    text = importlib.resources.files("gateway").joinpath("openapi.yaml").read_text()
    return json.dumps(yaml.safe_load(text)).encode()


def internal_error(metrics: Metrics) -> Response:
    """The answer to a request that met a bug (counted; the shell adds its apns-id)."""
    metrics.api_errors.labels("InternalServerError").inc()
    return Response.json(500, {"reason": "InternalServerError",
                               "message": "an internal error in the gateway (logged)"})


def loggable(method: str, path: str) -> str:
    """A request as a log line may show it: no query, no token or other long part in full."""
    parts = (p if len(p) <= 8 else p[:8] + "…" for p in path.split("?")[0].split("/"))
    return f"{method[:16]} {'/'.join(parts)[:96]}"


def _header(req: Request, name: str) -> str | None:
    for key, value in req.headers:
        if key.lower() == name:
            return value
    return None
