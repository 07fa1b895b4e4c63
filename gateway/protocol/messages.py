"""Every lpgw/1 message, with validation of what arrives from the other side.

Only property-list-safe JSON (strings, numbers, booleans, arrays, objects) travels, so the
extension can hand `payload` straight to `reportIncomingCall(userInfo:)`.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from typing import Any, overload

from gateway.protocol.frames import DEFAULT_MAX_FRAME, MessageError

PUSH_TYPES = (
    "alert",
    "background",
    "voip",
    "pushtotalk",
    "complication",
    "fileprovider",
    "liveactivity",
    "location",
    "mdm",
    "widgets",
)
CALL_ACTIONS = ("ringing", "decline", "busy")
TOPIC_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.\-]{0,154}$")
MAX_ID = 128


class ByeReason:
    """Why a connection ends; sent in `bye.reason`."""

    REPLACED = "replaced"
    SHUTDOWN = "shutdown"
    UNAUTHORIZED = "unauthorized"
    PROTOCOL_ERROR = "protocol_error"
    UNSUPPORTED_VERSION = "unsupported_version"
    HEARTBEAT_TIMEOUT = "heartbeat_timeout"
    HELLO_TIMEOUT = "hello_timeout"
    FLOOD = "flood"
    UNREGISTERED = "unregistered"
    CLIENT = "client"
    # the gateway cannot take this device now (its storage is full or failing): come back
    # later, with backoff; nothing of the device's is lost
    UNAVAILABLE = "unavailable"
    # the device stopped reading: its outgoing buffer passed the limit; its pushes stay
    # queued and go again when it reconnects
    SLOW_READER = "slow_reader"
    # a new install (an install id the gateway has not seen) refused: too many lately from
    # this address, or the gateway keeps all the device records it may; come back later
    RATE_LIMITED = "rate_limited"
    DEVICE_LIMIT = "device_limit"


def _field(d: dict[str, Any], key: str, kind: type | tuple[type, ...], required: bool = True):
    if key not in d or d[key] is None:
        if required:
            raise MessageError("missing_field", f"'{key}' is required")
        return None
    value = d[key]
    if isinstance(value, bool) and kind is not bool and kind != (bool,):
        raise MessageError("bad_field", f"'{key}' must be {_kind_name(kind)}, not a boolean")
    if not isinstance(value, kind):
        raise MessageError("bad_field", f"'{key}' must be {_kind_name(kind)}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", list: "an array", dict: "an object"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


@overload
def _number(d: dict[str, Any], key: str) -> float: ...
@overload
def _number(d: dict[str, Any], key: str, required: bool) -> float | None: ...


def _number(d: dict[str, Any], key: str, required: bool = True) -> float | None:
    value = _field(d, key, (int, float), required)
    if value is None:
        return None
    try:
        return float(value)
    except OverflowError:
        raise MessageError("bad_field", f"'{key}' is too large") from None


@overload
def _seq(d: dict[str, Any], key: str) -> int: ...
@overload
def _seq(d: dict[str, Any], key: str, required: bool) -> int | None: ...


def _seq(d: dict[str, Any], key: str, required: bool = True) -> int | None:
    value = _field(d, key, int, required)
    if value is not None and not 0 <= value < 2**53:
        raise MessageError("bad_field", f"'{key}' must be between 0 and 2^53-1")
    return value


# --- device -> gateway ---------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    version: int
    install_id: str
    topic: str
    push_types: tuple[str, ...]
    assertion: str | None = None
    last_ack: int = 0
    gateway_id: str | None = None  # the gateway that last_ack counts on
    client: str | None = None

    @classmethod
    def parse(cls, d: dict[str, Any]) -> Hello:
        version = _field(d, "version", int)
        install_id = _field(d, "install_id", str)
        try:
            parsed = uuid.UUID(install_id)
        except ValueError:
            raise MessageError("bad_field", "'install_id' must be a UUID") from None
        topic = _field(d, "topic", str)
        if not TOPIC_RE.fullmatch(topic):
            raise MessageError("bad_field", "'topic' must be a bundle id like com.example.app")
        types = _field(d, "push_types", list)
        if not types or not all(isinstance(t, str) for t in types):
            raise MessageError("bad_field", "'push_types' must be a non-empty array of strings")
        # types this gateway does not know yet are ignored, so newer apps still connect
        types = [t for t in types if t in PUSH_TYPES]
        if not types:
            raise MessageError("bad_field", f"'push_types' names none of {PUSH_TYPES}")
        assertion = _field(d, "assertion", str, required=False)
        if assertion is not None and len(assertion) > 8192:
            raise MessageError("bad_field", "'assertion' is longer than 8192 characters")
        client = _field(d, "client", str, required=False)
        return cls(
            version=version,
            install_id=str(parsed),
            topic=topic,
            push_types=tuple(dict.fromkeys(types)),
            assertion=assertion,
            last_ack=_seq(d, "last_ack", required=False) or 0,
            gateway_id=(_field(d, "gateway_id", str, required=False) or "")[:MAX_ID] or None,
            client=client[:MAX_ID] if client else None,
        )

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "type": "hello",
            "version": self.version,
            "install_id": self.install_id,
            "topic": self.topic,
            "push_types": list(self.push_types),
            "last_ack": self.last_ack,
        }
        if self.assertion:
            d["assertion"] = self.assertion
        if self.gateway_id:
            d["gateway_id"] = self.gateway_id
        if self.client:
            d["client"] = self.client
        return d


@dataclass(frozen=True)
class Ack:
    seq: int

    @classmethod
    def parse(cls, d: dict[str, Any]) -> Ack:
        return cls(seq=_seq(d, "seq"))

    def to_dict(self) -> dict[str, Any]:
        return {"type": "ack", "seq": self.seq}


@dataclass(frozen=True)
class Pong:
    nonce: int

    @classmethod
    def parse(cls, d: dict[str, Any]) -> Pong:
        return cls(nonce=_seq(d, "nonce"))

    def to_dict(self) -> dict[str, Any]:
        return {"type": "pong", "nonce": self.nonce}


@dataclass(frozen=True)
class CallAction:
    action: str
    call_id: str

    @classmethod
    def parse(cls, d: dict[str, Any]) -> CallAction:
        action = _field(d, "action", str)
        if action not in CALL_ACTIONS:
            raise MessageError("bad_field", f"'action' must be one of {CALL_ACTIONS}")
        call_id = _field(d, "call_id", str)
        if not 0 < len(call_id) <= MAX_ID * 2:
            raise MessageError("bad_field", "'call_id' must be 1 to 256 characters")
        return cls(action=action, call_id=call_id)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "call", "action": self.action, "call_id": self.call_id}


@dataclass(frozen=True)
class Unregister:
    """The app no longer wants pushes for this install and topic (APNs: 410 Unregistered)."""

    @classmethod
    def parse(cls, d: dict[str, Any]) -> Unregister:
        return cls()

    def to_dict(self) -> dict[str, Any]:
        return {"type": "unregister"}


@dataclass(frozen=True)
class Bye:
    reason: str
    code: str | None = None
    message: str | None = None
    versions: tuple[int, ...] | None = None

    @classmethod
    def parse(cls, d: dict[str, Any]) -> Bye:
        reason = _field(d, "reason", str, required=False) or ByeReason.CLIENT
        versions = d.get("versions")
        return cls(
            reason=reason[:MAX_ID],
            code=_field(d, "code", str, required=False),
            message=_field(d, "message", str, required=False),
            versions=tuple(versions) if isinstance(versions, list) else None,
        )

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": "bye", "reason": self.reason}
        if self.code:
            d["code"] = self.code
        if self.message:
            d["message"] = self.message
        if self.versions:
            d["versions"] = list(self.versions)
        return d


DEVICE_MESSAGES: dict[str, type] = {
    "hello": Hello,
    "ack": Ack,
    "pong": Pong,
    "call": CallAction,
    "unregister": Unregister,
    "bye": Bye,
}


# --- gateway -> device ---------------------------------------------------------------


@dataclass(frozen=True)
class Welcome:
    version: int
    token: str
    heartbeat: float
    gateway_id: str
    user: str | None = None
    max_frame: int = DEFAULT_MAX_FRAME

    @classmethod
    def parse(cls, d: dict[str, Any]) -> Welcome:
        return cls(
            version=_field(d, "version", int),
            token=_field(d, "token", str),
            heartbeat=_number(d, "heartbeat"),
            gateway_id=_field(d, "gateway_id", str),
            user=_field(d, "user", str, required=False),
            max_frame=max(_field(d, "max_frame", int, required=False) or DEFAULT_MAX_FRAME,
                          DEFAULT_MAX_FRAME),
        )

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "type": "welcome",
            "version": self.version,
            "token": self.token,
            "heartbeat": self.heartbeat,
            "gateway_id": self.gateway_id,
            "max_frame": self.max_frame,
        }
        if self.user:
            d["user"] = self.user
        return d


@dataclass(frozen=True)
class Push:
    seq: int
    id: str
    push_type: str
    priority: int
    expiration: int
    payload: dict[str, Any]
    collapse_id: str | None = None
    sent_at: float = field(default=0.0, compare=False)
    # the payload as the gateway stored it (canonical JSON of `payload`), written as is
    payload_json: str | None = field(default=None, compare=False, repr=False)

    @classmethod
    def parse(cls, d: dict[str, Any]) -> Push:
        return cls(
            seq=_seq(d, "seq"),
            id=_field(d, "id", str),
            push_type=_field(d, "push_type", str),
            priority=_field(d, "priority", int),
            expiration=_field(d, "expiration", int),
            payload=_field(d, "payload", dict),
            collapse_id=_field(d, "collapse_id", str, required=False),
            sent_at=_number(d, "sent_at", required=False) or 0.0,
        )

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "type": "push",
            "seq": self.seq,
            "id": self.id,
            "push_type": self.push_type,
            "priority": self.priority,
            "expiration": self.expiration,
            "payload": self.payload,
            "sent_at": round(self.sent_at, 3),
        }
        if self.collapse_id:
            d["collapse_id"] = self.collapse_id
        return d


@dataclass(frozen=True)
class Ping:
    nonce: int

    @classmethod
    def parse(cls, d: dict[str, Any]) -> Ping:
        return cls(nonce=_seq(d, "nonce"))

    def to_dict(self) -> dict[str, Any]:
        return {"type": "ping", "nonce": self.nonce}


@dataclass(frozen=True)
class Error:
    """A frame was refused; the connection stays up (a `bye` follows if it cannot)."""

    code: str
    message: str

    @classmethod
    def parse(cls, d: dict[str, Any]) -> Error:
        return cls(code=_field(d, "code", str), message=_field(d, "message", str))

    def to_dict(self) -> dict[str, Any]:
        return {"type": "error", "code": self.code, "message": self.message}


GATEWAY_MESSAGES: dict[str, type] = {
    "welcome": Welcome,
    "push": Push,
    "ping": Ping,
    "bye": Bye,
    "error": Error,
}


def parse_message(d: dict[str, Any], table: dict[str, Any]) -> Any:
    kind = d.get("type")
    if not isinstance(kind, str):
        raise MessageError("missing_field", "'type' is required and must be a string")
    cls = table.get(kind)
    if cls is None:
        raise MessageError("unknown_type", f"unknown message type {kind[:40]!r}")
    return cls.parse(d)
