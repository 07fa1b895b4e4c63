"""`POST /3/device/<token>`: APNs headers and body to a PushRequest, by APNs' rules."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from gateway.api.errors import ApiError
from gateway.api.provider_auth import ProviderKey
from gateway.core import push_rules
from gateway.core.model import PushRequest
from gateway.protocol.messages import PUSH_TYPES

MAX_BODY = push_rules.MAX_PAYLOAD  # the most any push may carry
# objects and arrays inside one another in a request body; real payloads use a handful.
# Python's json gives up (RecursionError) near 1,000, and phones parse what we pass on.
MAX_JSON_DEPTH = 64


def single_headers(headers: list[tuple[str, str]]) -> dict[str, str]:
    """Header name -> value; a repeated apns-* or authorization header is an error."""
    out: dict[str, str] = {}
    for name, value in headers:
        name = name.lower()
        if name in out and (name.startswith("apns-") or name == "authorization"):
            raise ApiError("DuplicateHeaders", f"{name} appears twice")
        out[name] = value
    return out


def push_request(headers: Mapping[str, str], body: bytes, key: ProviderKey) -> PushRequest:
    push_type = headers.get("apns-push-type", "alert")
    if push_type not in PUSH_TYPES:
        raise ApiError("InvalidPushType", f"apns-push-type must be one of {PUSH_TYPES}")
    topic = _topic(headers.get("apns-topic"), push_type, key)  # the APNs topic, checked

    raw_priority = headers.get("apns-priority")
    priority = push_rules.default_priority(push_type)
    if raw_priority is not None:
        if raw_priority not in ("10", "5", "1"):
            raise ApiError("BadPriority", "apns-priority must be 10, 5 or 1")
        priority = int(raw_priority)

    expiration = None
    if "apns-expiration" in headers:
        raw = headers["apns-expiration"].strip()
        if not (raw.isascii() and raw.isdigit()) or len(raw) > 12:
            raise ApiError("BadExpirationDate", "apns-expiration is epoch seconds, or 0")
        expiration = int(raw)

    push_id = headers.get("apns-id")
    collapse_id = headers.get("apns-collapse-id")
    try:  # before the body: APNs answers these whatever the body holds
        push_rules.check(push_type, priority, collapse_id, expiration, push_id)
    except push_rules.PushRuleBroken as exc:
        raise ApiError(exc.reason, f"apns-*: {exc}") from None

    if not body.strip():
        raise ApiError("PayloadEmpty", "the body is empty")
    limit = push_rules.payload_limit(push_type)
    if len(body) > limit:
        raise ApiError("PayloadTooLarge", f"payload over {limit} bytes")
    payload = json_body(body)
    if not isinstance(payload, dict):
        raise ApiError("BadPayload", "the body must be a JSON object")
    if not payload:
        raise ApiError("PayloadEmpty", "the payload is an empty object")
    return PushRequest(push_type=push_type, payload=payload, priority=priority,
                       expiration=expiration, collapse_id=collapse_id,
                       push_id=push_id.lower() if push_id else None, topic=topic)


def json_body(body: bytes) -> Any:
    """A request body's JSON value, or 400 BadPayload: never NaN or a number out of a
    double's range (1e999 was read as Infinity and passed on to the phone as a frame that is
    not JSON), never deeper than MAX_JSON_DEPTH (a deep body was a RecursionError: a 500)."""
    try:
        value = json.loads(body, parse_constant=_no_constants, parse_float=_finite)
    except ValueError as exc:
        raise ApiError("BadPayload", f"the body is not JSON: {exc}") from None
    except RecursionError:
        value = None
        deep = True
    else:
        # fewer brackets than the limit cannot nest past it: most bodies stop here
        deep = (body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH
                and _deeper_than(value, MAX_JSON_DEPTH))
    if deep:
        raise ApiError("BadPayload", f"the body nests objects and arrays deeper than "
                                     f"{MAX_JSON_DEPTH} levels")
    return value


def _deeper_than(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = (node.values() if isinstance(node, dict) else node
                    if isinstance(node, list) else None)
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"{text[:24]} is out of range")
    return value


def _topic(header: str | None, push_type: str, key: ProviderKey) -> str:
    """The APNs topic of this push (core.push_rules says what it must look like), its app
    checked against the key's topics; without the header, the key's one app's."""
    if header is None:
        if len(key.topics) != 1:
            raise ApiError("MissingTopic", "apns-topic is required: this key has several topics")
        return push_rules.apns_topic(key.topics[0], push_type)
    try:
        app = push_rules.app_topic(header, push_type)
    except push_rules.PushRuleBroken as exc:
        raise ApiError(exc.reason, str(exc)) from None
    if app not in key.topics:
        if app == header and push_rules.names_another_push_type(header):
            raise ApiError("BadTopic", f"apns-topic {header} is not for {push_type} pushes")
        raise ApiError("TopicDisallowed", f"this key may not push to {app}")
    return header
