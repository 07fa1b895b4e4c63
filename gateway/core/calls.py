"""Calls: one incoming SIP call becomes voip pushes, and what devices do becomes its answer.

Flexisip's rule for iOS, kept here: a device that comes back within the ring window gets the
call, and if the call ended meanwhile, the call and then its end, so the app can always
report it to CallKit and end it. Both pushes are stored until the window closes.
"""

from __future__ import annotations

import enum
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.core.delivery import Delivery, Rejected
from gateway.core.events import CallActionTaken, PushDelivered
from gateway.core.model import PushRequest
from gateway.core.tokens import short

log = logging.getLogger("lpgw.calls")


class CallOutcome(enum.Enum):
    """What became of a call, in the domain's words; the SIP bridge says it in SIP's."""

    RINGING = "ringing"  # a device has it (not final)
    DECLINED = "declined"
    BUSY = "busy"
    UNREACHABLE = "unreachable"  # no device took it in time, or the gateway stops
    CANCELLED = "cancelled"  # the caller hung up, or it was answered elsewhere
    UNAVAILABLE = "unavailable"  # the site could not keep the call's pushes (no quorum)


@dataclass(frozen=True, slots=True)
class CallAnswered:
    """What the origin of `call` (the PBX) is to be told: ringing, or how it ended."""

    call: Call
    outcome: CallOutcome
    reason: str
    at: float


END_GRACE = 30.0  # the end of a call is kept this much longer than the call itself


@dataclass(frozen=True)
class CallSettings:
    ring_window: float = 45.0  # longest a call rings on lpgw's branch
    reach_timeout: float = 10.0  # no device acknowledged the call by then: 480


@dataclass(frozen=True)
class Caller:
    uri: str
    display_name: str
    callee: str
    # what the origin adds to the call push for the app (the SIP bridge: its Call-ID)
    details: Mapping[str, str] = field(default_factory=dict)


@dataclass(eq=False)
class Call:
    id: str
    user: str
    caller: Caller
    started: float
    reach_deadline: float
    ring_deadline: float
    pushes: dict[str, str] = field(default_factory=dict)  # push id -> device token
    # in a site: the call's pushes are being kept by the site (Delivery's KeepPush); the
    # PBX hears 100 Trying only once one is, and 503 if none could be
    tickets: list[int] = field(default_factory=list)
    reached: set[str] = field(default_factory=set)  # tokens that acknowledged the call
    ringing: bool = False
    final: CallOutcome | None = None


class Calls:
    """The ring window of every call in progress."""

    def __init__(self, delivery: Delivery, settings: CallSettings,
                 end_status: Mapping[CallOutcome, int] | None = None) -> None:
        """`end_status`: the number the origin answered for each outcome, given to the
        app in `call_ended.status` (docs/protocol.md: the SIP bridge's final status)."""
        self.delivery = delivery
        self.settings = settings
        self.end_status = dict(end_status or {})
        self.calls: dict[str, Call] = {}
        self._by_push: dict[str, Call] = {}
        self._out: list[CallAnswered] = []

    def answers_to_send(self) -> list[CallAnswered]:
        """What each call's origin is to be told since the last call, in order."""
        out, self._out = self._out, []
        return out

    def offer(self, user: str, caller: Caller, now: float, devices: list[str]) -> Call | None:
        """Push the call to `devices` (the caller's router chose them: the user's, of the
        apps its route allows); None when there is none to push to.

        The pushes are written to connected devices before they are fsynced: the caller
        must call `delivery.commit()` next (the SIP shell does, after timing the write).
        """
        s = self.settings
        call = Call(id=str(uuid.uuid4()), user=user, caller=caller, started=now,
                    reach_deadline=now + s.reach_timeout, ring_deadline=now + s.ring_window)
        payload = {"call": {"id": call.id, "from": caller.uri,
                            "display_name": caller.display_name, "to": caller.callee,
                            "user": user, **caller.details}}
        for token in devices:
            push = PushRequest(push_type="voip", payload=payload, priority=10,
                               expiration=int(call.ring_deadline) + 1)
            try:  # rings at once; the caller commits right after (see Delivery.submit)
                accepted = self.delivery.submit(token, push, now, group=True, send_first=True)
            except Rejected as exc:
                log.info("call %s: not pushed to %s: %s", call.id, short(token), exc.reason)
                continue
            call.pushes[accepted.push_id] = token
            self._by_push[accepted.push_id] = call
            if accepted.ticket is not None:
                call.tickets.append(accepted.ticket)
        if not call.pushes:
            return None
        self.calls[call.id] = call
        log.info("call %s from %s to %s: pushed to %d device(s)", call.id, caller.uri, user,
                 len(call.pushes))
        return call

    def cancel(self, call: Call, reason: str, now: float) -> None:
        """The caller hung up, or the call was answered elsewhere (RFC 3326 Reason)."""
        self._finish(call, CallOutcome.CANCELLED, reason or "caller cancelled", now)

    def unavailable(self, call: Call, reason: str, now: float) -> None:
        """The site kept none of the call's pushes: the PBX is to try another branch."""
        self._finish(call, CallOutcome.UNAVAILABLE, reason, now)

    def shutdown(self, now: float) -> None:
        """The gateway stops: every ringing call ends, so the PBX and the phones know."""
        for call in list(self.calls.values()):
            self._finish(call, CallOutcome.UNREACHABLE, "gateway stopping", now)

    def clock_stepped(self, delta: float) -> None:
        """The wall clock jumped `delta` seconds: every call keeps the time it has left.

        A ring window is an interval, not a date: without this a +40-day NTP step would
        end every ringing call at once, and a step back would let them ring for an hour.
        """
        for call in self.calls.values():
            call.started += delta
            call.reach_deadline += delta
            call.ring_deadline += delta

    def next_timer(self) -> float | None:
        times = [c.ring_deadline if c.reached else min(c.reach_deadline, c.ring_deadline)
                 for c in self.calls.values()]
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        for call in list(self.calls.values()):
            if now >= call.ring_deadline:
                self._finish(call, CallOutcome.UNREACHABLE, "ring window over", now)
            elif not call.reached and now >= call.reach_deadline:
                self._finish(call, CallOutcome.UNREACHABLE, "no device reachable", now)

    # --- from devices -----------------------------------------------------------------

    def device_event(self, event: PushDelivered | CallActionTaken) -> None:
        """What Delivery returned about a device: an ack of a call's push, a call action."""
        if isinstance(event, PushDelivered):
            self._delivered(event.token, event.push_id, event.at)
        else:
            self._action(event, event.at)

    def _delivered(self, token: str, push_id: str, now: float) -> None:
        call = self._by_push.get(push_id)
        if call is None or call.final is not None:
            return
        call.reached.add(token)
        if not call.ringing:
            call.ringing = True
            self._out.append(CallAnswered(call, CallOutcome.RINGING, "", now))

    def _action(self, event: CallActionTaken, now: float) -> None:
        token, action = event.token, event.action
        call = self.calls.get(action.call_id)
        if call is None or token not in call.pushes.values():
            return
        if action.action == "ringing":
            self._delivered(token, next(p for p, t in call.pushes.items() if t == token), now)
        elif action.action == "decline":
            self._finish(call, CallOutcome.DECLINED, "declined on a device", now)
        elif action.action == "busy":
            self._finish(call, CallOutcome.BUSY, "busy on a device", now)

    # --- ending -----------------------------------------------------------------------

    def _finish(self, call: Call, outcome: CallOutcome, reason: str, now: float) -> None:
        if call.final is not None:
            return
        call.final = outcome
        self.calls.pop(call.id, None)
        for push_id in call.pushes:
            self._by_push.pop(push_id, None)
        ended = {"call_ended": {"id": call.id, "reason": reason,
                                "status": self.end_status.get(outcome)}}
        for token in dict.fromkeys(call.pushes.values()):
            push = PushRequest(push_type="voip", payload=ended, priority=10,
                               expiration=int(call.ring_deadline + END_GRACE))
            try:
                self.delivery.submit(token, push, now)
            except Rejected as exc:
                log.info("call %s: end not pushed to %s: %s", call.id, short(token), exc.reason)
        log.info("call %s ended: %s (%s)", call.id, outcome.value, reason)
        self._out.append(CallAnswered(call, outcome, reason, now))

    def describe(self) -> list[dict]:
        return [{"id": c.id, "user": c.user, "from": c.caller.uri, "ringing": c.ringing,
                 "devices": len(c.pushes), "reached": len(c.reached)}
                for c in self.calls.values()]
