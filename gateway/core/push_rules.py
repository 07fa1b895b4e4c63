"""What makes a push well-formed, by APNs' rules, in one place: the HTTP API, the control
socket (`lpgw send`) and the SIP bridge all submit through Delivery, which checks these;
the API uses the same values to answer early (before the body is parsed) with APNs' reasons.
"""

from __future__ import annotations

import re

# the topic an APNs push type is sent to, as a suffix of the app's bundle id
TOPIC_SUFFIX = {
    "voip": ".voip",
    "pushtotalk": ".voip-ptt",
    "complication": ".complication",
    "fileprovider": ".pushkit.fileprovider",
    "liveactivity": ".push-type.liveactivity",
    "location": ".location-query",
    "widgets": ".push-type.widgets",
}
PAYLOAD_LIMITS = {"voip": 5120}  # bytes of JSON payload, by push type
DEFAULT_PAYLOAD_LIMIT = 4096
MAX_PAYLOAD = max(PAYLOAD_LIMITS.values())  # the most any push may carry
MAX_COLLAPSE_ID = 64  # bytes (UTF-8)
PRIORITIES = (10, 5, 1)
# a push id is a UUID written 8-4-4-4-12, as apns-id
PUSH_ID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


class PushRuleBroken(ValueError):
    """A push that breaks one of the rules; `reason` is APNs' word for it."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def payload_limit(push_type: str) -> int:
    return PAYLOAD_LIMITS.get(push_type, DEFAULT_PAYLOAD_LIMIT)


def default_priority(push_type: str) -> int:
    """APNs: background pushes go at 5, everything else at 10."""
    return 5 if push_type == "background" else 10


def app_topic(topic: str, push_type: str) -> str:
    """The app's bundle id an APNs topic names for `push_type`: `<bundle id><suffix>` for
    the push types that have one (voip: `.voip`, ...), the topic itself for the others.
    PushRuleBroken (BadTopic) when a suffix is missing, or names another push type's."""
    suffix = TOPIC_SUFFIX.get(push_type, "")
    if suffix:
        if not topic.endswith(suffix) or topic == suffix:
            raise PushRuleBroken("BadTopic", f"{push_type} pushes go to '<bundle id>{suffix}'")
        return topic[: -len(suffix)]
    return topic


def names_another_push_type(topic: str) -> bool:
    """The topic ends with a push type's suffix (a voip topic on an alert push, say)."""
    return any(topic.endswith(s) for s in TOPIC_SUFFIX.values())


def apns_topic(bundle_id: str, push_type: str) -> str:
    """The APNs topic for an app's pushes of `push_type` (app_topic's inverse)."""
    return bundle_id + TOPIC_SUFFIX.get(push_type, "")


def check(push_type: str, priority: int, collapse_id: str | None, expiration: int | None,
          push_id: str | None) -> None:
    """Raise PushRuleBroken for the first rule the push breaks (the payload's size is
    checked where its bytes are known: payload_limit)."""
    if priority not in PRIORITIES:
        raise PushRuleBroken("BadPriority", "priority must be 10, 5 or 1")
    if push_type == "background" and priority == 10:
        raise PushRuleBroken("BadPriority", "background pushes must have priority 5 (or 1)")
    if collapse_id is not None and len(collapse_id.encode()) > MAX_COLLAPSE_ID:
        raise PushRuleBroken("BadCollapseId", f"a collapse id is at most {MAX_COLLAPSE_ID} "
                                              "bytes")
    if expiration is not None and expiration < 0:
        raise PushRuleBroken("BadExpirationDate", "expiration is epoch seconds, or 0")
    if push_id is not None and not PUSH_ID.fullmatch(push_id):
        raise PushRuleBroken("BadMessageId", "a push id is a UUID (8-4-4-4-12 hex)")
