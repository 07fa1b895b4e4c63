"""The two ends of an lpgw/1 connection as state machines: bytes and `now` in, events out.

Both the gateway and the reference device drive these; neither knows about sockets or clocks.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any

from gateway.protocol import VERSIONS
from gateway.protocol.frames import (
    DEFAULT_MAX_FRAME,
    FrameDecoder,
    FrameError,
    MessageError,
    decode_body,
    encode_frame,
    encode_frame_spliced,
)
from gateway.protocol.messages import (
    DEVICE_MESSAGES,
    GATEWAY_MESSAGES,
    Ack,
    Bye,
    ByeReason,
    CallAction,
    Error,
    Hello,
    Ping,
    Pong,
    Push,
    Unregister,
    Welcome,
    parse_message,
)

MAX_OWED = 100_000

# --- events --------------------------------------------------------------------------


class SessionEvent:
    """What a session returns from an input: every event of either side is one."""

    __slots__ = ()


class GatewayEvent(SessionEvent):
    """An event of the gateway's side of a session (GatewaySession returns these)."""

    __slots__ = ()


class DeviceEvent(SessionEvent):
    """An event of the device's side of a session (DeviceSession returns these)."""

    __slots__ = ()


@dataclass(frozen=True)
class HelloReceived(GatewayEvent):
    hello: Hello


@dataclass(frozen=True)
class AckReceived(GatewayEvent):
    seq: int


@dataclass(frozen=True)
class CallActionReceived(GatewayEvent):
    action: CallAction


@dataclass(frozen=True)
class UnregisterReceived(GatewayEvent):
    pass


@dataclass(frozen=True)
class FrameRejected(GatewayEvent):
    """A frame was refused with an `error`; counted by the shell."""

    code: str
    message: str


@dataclass(frozen=True)
class PingDue(GatewayEvent):
    """A heartbeat for a transport with pings of its own (QUIC's PING frame, which the
    device's stack acknowledges without waking the app): the shell sends it and reports
    the acknowledgement with `GatewaySession.pinged_back`."""

    nonce: int


@dataclass(frozen=True)
class Closed(GatewayEvent, DeviceEvent):
    """The session is over; the shell closes the transport after flushing."""

    reason: str
    code: str | None = None
    message: str | None = None
    by_peer: bool = False


@dataclass(frozen=True)
class Welcomed(DeviceEvent):
    welcome: Welcome


@dataclass(frozen=True)
class PushReceived(DeviceEvent):
    push: Push
    duplicate: bool


@dataclass(frozen=True)
class ErrorReceived(DeviceEvent):
    error: Error


# --- shared machinery ----------------------------------------------------------------


class _Session:
    """Frame in, frame out, and the bookkeeping of ending."""

    def __init__(self, max_frame: int) -> None:
        self._decoder = FrameDecoder(max_frame)
        self._out = bytearray()
        self.closed: Closed | None = None

    def data_to_send(self) -> bytes:
        data = bytes(self._out)
        self._out = bytearray()
        return data

    def _send(self, message: dict[str, Any]) -> None:
        if self.closed is None:
            self._out += encode_frame(message)

    def close(self, reason: str, code: str | None = None, message: str | None = None,
              **extra: Any) -> Closed:
        """Say `bye` (once) and end; returns the Closed event."""
        if self.closed is not None:
            return self.closed
        bye = Bye(reason=reason, code=code, message=message, versions=extra.get("versions"))
        self._send(bye.to_dict())
        self.closed = Closed(reason=reason, code=code, message=message)
        return self.closed

    def _peer_closed(self, bye: Bye) -> Closed:
        self.closed = Closed(reason=bye.reason, code=bye.code, message=bye.message, by_peer=True)
        return self.closed


@dataclass(frozen=True)
class SessionSettings:
    max_frame: int = DEFAULT_MAX_FRAME
    heartbeat: float = 10.0
    heartbeat_misses: int = 3
    hello_timeout: float = 10.0
    frame_rate: float = 50.0  # sustained frames per second a device may send
    frame_burst: int = 200
    error_budget: int = 5  # refused frames before the connection is closed
    # bytes a transport may hold for one device that it has not taken (TCP: not yet in the
    # kernel; QUIC: not yet acknowledged). Above it the device is closed with `bye`
    # slow_reader and its pushes wait in the store. Room for a reconnect's whole queue
    # (256 pushes of up to 5 KiB) to be written at once to a phone that does read.
    send_buffer_limit: int = 2 * 1024 * 1024


class GatewaySession(_Session):
    """The gateway's end: admits a hello, heartbeats, and turns frames into events."""

    def __init__(self, settings: SessionSettings, now: float,
                 transport_pings: bool = False) -> None:
        super().__init__(settings.max_frame)
        self.settings = settings
        self.transport_pings = transport_pings
        self.hello: Hello | None = None
        self.welcomed = False
        self._deadline: float | None = now + settings.hello_timeout
        self._next_ping: float | None = None
        self._nonce = 0
        self._awaiting_pong = False
        self.misses = 0
        self._errors = 0
        self._tokens = float(settings.frame_burst)
        self._tokens_at = now
        self._owed = 0  # acks and pongs the device may send without being rate-limited

    # input

    def receive_data(self, data: bytes, now: float) -> list[GatewayEvent]:
        if self.closed is not None:
            return []
        try:
            bodies = self._decoder.feed(data)
        except FrameError as exc:
            return [self.close(ByeReason.PROTOCOL_ERROR, exc.code, str(exc))]
        events: list[GatewayEvent] = []
        for body in bodies:
            events.extend(self._receive_frame(body, now))
            if self.closed is not None:
                break
        return events

    def _charge(self, message: Any, now: float) -> bool:
        """Rate-limit what the device says of its own accord; answers to our pushes and
        pings are owed to us and free, so a backlog of acks is never taken for a flood."""
        if isinstance(message, Ack | Pong) and self._owed > 0:
            self._owed -= 1
            return True
        return self._take_token(now)

    def _flood(self) -> list[GatewayEvent]:
        return [self.close(ByeReason.FLOOD, "flood",
                           "more frames than the gateway accepts per second")]

    def _take_token(self, now: float) -> bool:
        s = self.settings
        self._tokens = min(s.frame_burst, self._tokens + (now - self._tokens_at) * s.frame_rate)
        self._tokens_at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def _receive_frame(self, body: bytes, now: float) -> list[GatewayEvent]:
        try:
            raw = decode_body(body)
            if self.hello is None and raw.get("type") == "hello" \
                    and raw.get("version") not in VERSIONS:
                # before any other field: a newer hello may differ in all of them
                return [self.close(ByeReason.UNSUPPORTED_VERSION, "unsupported_version",
                                   f"version {str(raw.get('version'))[:20]} is not spoken here",
                                   versions=VERSIONS)]
            message = parse_message(raw, DEVICE_MESSAGES)
        except MessageError as exc:
            if not self._take_token(now):
                return self._flood()
            if self.hello is None:
                return [self.close(ByeReason.PROTOCOL_ERROR, exc.code, str(exc))]
            return self._reject(exc.code, str(exc))
        if not self._charge(message, now):
            return self._flood()
        self.misses = 0
        self._awaiting_pong = False
        if isinstance(message, Bye):
            return [self._peer_closed(message)]
        if self.hello is None:
            if not isinstance(message, Hello):
                return [self.close(ByeReason.PROTOCOL_ERROR, "hello_required",
                                   "the first message must be hello")]
            self.hello = message
            self._deadline = None
            return [HelloReceived(message)]
        if isinstance(message, Hello):
            return [self.close(ByeReason.PROTOCOL_ERROR, "duplicate_hello",
                               "hello was already received on this connection")]
        if not self.welcomed:
            return self._reject("not_welcomed", "wait for welcome before sending this")
        if isinstance(message, Ack):
            return [AckReceived(message.seq)]
        if isinstance(message, Pong):
            return []
        if isinstance(message, CallAction):
            return [CallActionReceived(message)]
        if isinstance(message, Unregister):
            return [UnregisterReceived()]
        return self._reject("unknown_type", "message not valid here")  # pragma: no cover

    def _reject(self, code: str, message: str) -> list[GatewayEvent]:
        self._errors += 1
        if self._errors > self.settings.error_budget:
            return [FrameRejected(code, message),
                    self.close(ByeReason.PROTOCOL_ERROR, code,
                               f"too many refused frames; last: {message}")]
        self._send(Error(code=code, message=message).to_dict())
        return [FrameRejected(code, message)]

    # output, driven by the core

    def welcome(self, welcome: Welcome, now: float) -> None:
        self._send(welcome.to_dict())
        self.welcomed = True
        self._next_ping = now + self.settings.heartbeat

    def push(self, push: Push) -> None:
        if push.payload_json is None:
            self._send(push.to_dict())
        elif self.closed is None:
            head = push.to_dict()
            del head["payload"]
            self._out += encode_frame_spliced(head, "payload", push.payload_json)
        self._owed = min(self._owed + 1, MAX_OWED)

    # time

    def next_timer(self) -> float | None:
        if self.closed is not None:
            return None
        return self._deadline if self._deadline is not None else self._next_ping

    def handle_timer(self, now: float) -> list[GatewayEvent]:
        if self.closed is not None:
            return []
        if self._deadline is not None:
            if now >= self._deadline:
                return [self.close(ByeReason.HELLO_TIMEOUT, "hello_timeout",
                                   "no hello within the time allowed")]
            return []
        if self._next_ping is None or now < self._next_ping:
            return []
        if self._awaiting_pong:
            self.misses += 1
            if self.misses >= self.settings.heartbeat_misses:
                return [self.close(ByeReason.HEARTBEAT_TIMEOUT, "heartbeat_timeout",
                                   f"{self.misses} heartbeats unanswered")]
        self._nonce += 1
        self._awaiting_pong = True
        self._next_ping = now + self.settings.heartbeat
        if self.transport_pings:
            return [PingDue(self._nonce)]
        self._send(Ping(self._nonce).to_dict())
        self._owed = min(self._owed + 1, MAX_OWED)
        return []

    def pinged_back(self, nonce: int) -> None:
        """The device's transport acknowledged the `PingDue` with this nonce: it is there.
        Like any frame from it, an older ping's acknowledgement counts too."""
        if self.closed is None and 0 < nonce <= self._nonce:
            self.misses = 0
            self._awaiting_pong = False


class DeviceSession(_Session):
    """The phone's end: says hello, answers pings, reports pushes once, acks on request."""

    def __init__(self, hello: Hello, now: float, max_frame: int = DEFAULT_MAX_FRAME,
                 remember: int = 1024, welcome_timeout: float = 10.0) -> None:
        super().__init__(max_frame)
        self._welcome_deadline = now + welcome_timeout
        self.hello = hello
        self.welcome: Welcome | None = None
        self.last_ack = hello.last_ack
        self._seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._remember = remember
        self._last_heard = now
        self._send(hello.to_dict())

    def remember_ids(self, ids: list[str]) -> None:
        """Carry the duplicate filter across reconnects (the app keeps it in its container)."""
        for push_id in ids:
            self._mark_seen(push_id)

    @property
    def seen_ids(self) -> list[str]:
        return list(self._seen)

    def _mark_seen(self, push_id: str) -> bool:
        if push_id in self._seen:
            return False
        self._seen[push_id] = None
        if len(self._seen) > self._remember:
            self._seen.popitem(last=False)
        return True

    def receive_data(self, data: bytes, now: float) -> list[DeviceEvent]:
        if self.closed is not None:
            return []
        try:
            bodies = self._decoder.feed(data)
        except FrameError as exc:
            return [self.close(ByeReason.PROTOCOL_ERROR, exc.code, str(exc))]
        events: list[DeviceEvent] = []
        for body in bodies:
            self._last_heard = now
            try:
                message = parse_message(decode_body(body), GATEWAY_MESSAGES)
            except MessageError as exc:
                events.append(ErrorReceived(Error(exc.code, f"from gateway: {exc}")))
                continue
            if isinstance(message, Welcome):
                self.welcome = message
                self._decoder.max_frame = message.max_frame
                events.append(Welcomed(message))
            elif isinstance(message, Push):
                fresh = self._mark_seen(message.id)
                events.append(PushReceived(message, duplicate=not fresh))
            elif isinstance(message, Ping):
                self._send(Pong(message.nonce).to_dict())
            elif isinstance(message, Error):
                events.append(ErrorReceived(message))
            elif isinstance(message, Bye):
                events.append(self._peer_closed(message))
                break
        return events

    def ack(self, seq: int) -> None:
        if seq > self.last_ack:
            self.last_ack = seq
            self._send(Ack(seq).to_dict())

    def call(self, action: str, call_id: str) -> None:
        self._send(CallAction(action=action, call_id=call_id).to_dict())

    def unregister(self) -> None:
        self._send(Unregister().to_dict())

    def next_timer(self) -> float | None:
        if self.closed is not None:
            return None
        if self.welcome is None:
            return self._welcome_deadline
        return self._last_heard + self.welcome.heartbeat * 3

    def heard(self, now: float) -> None:
        """The transport heard from the gateway without a frame: over QUIC the heartbeat
        is a PING frame, acknowledged by the QUIC stack and never shown as a `ping`."""
        self._last_heard = max(self._last_heard, now)

    def handle_timer(self, now: float) -> list[DeviceEvent]:
        """A gateway that does not welcome or stops pinging is gone: end, to reconnect."""
        deadline = self.next_timer()
        if deadline is None or now < deadline:
            return []
        if self.welcome is None:
            self.closed = Closed(reason=ByeReason.HELLO_TIMEOUT, code="welcome_timeout",
                                 message="the gateway did not answer hello in time")
        else:
            self.closed = Closed(reason=ByeReason.HEARTBEAT_TIMEOUT, code="gateway_silent",
                                 message="no frame from the gateway for three heartbeats")
        return [self.closed]
