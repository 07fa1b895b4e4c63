"""Carries out what the core and the SIP bridge return, after every input.

The one place where the layers' outputs meet: `Delivery` returns frames for devices and
links to close (written here through each link) and what devices did (handed to `Calls`);
`Calls` returns what each call's PBX is to hear (handed to the SIP bridge); the bridge
returns SIP messages (written by the SIP transport). Every shell input (device bytes, an
API request, a control request, a SIP datagram, a timer) ends with `run()`. Nothing below
calls up: a call walks down through the core and its answer comes back out of this loop.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Protocol

from gateway import faults
from gateway.core.events import (
    CallActionTaken,
    CloseLink,
    DeliveryOutput,
    DeviceLeft,
    Kept,
    PushDelivered,
    SendPush,
    SiteWork,
    WelcomeDevice,
)
from gateway.protocol.messages import Push

if TYPE_CHECKING:
    from gateway.core.calls import Calls
    from gateway.core.delivery import Delivery
    from gateway.core.metrics import Metrics
    from gateway.sip.bridge import SipBridge, SipOutput

log = logging.getLogger("lpgw.pump")

# rounds of "carry out, then see what that produced" in one run at most: each round is
# bounded by its input, and a loop between layers must not hang the event loop
MAX_ROUNDS = 16


class Carrier(Protocol):
    """A device connection as the shell drives it (transport.link.GatewayLink)."""

    transport: str

    def welcome(self, token: str, user: str | None) -> None: ...
    def send_push(self, push: Push) -> None: ...
    def close(self, reason: str, code: str | None = None, message: str | None = None) -> None: ...


class Whereabouts(Protocol):
    """Where the site learns which gateway holds a device (cluster.presence.Presence)."""

    def arrived(self, token: str, transport: str) -> None: ...
    def left(self, token: str) -> None: ...


class SiteOut(Protocol):
    """Where the site's work goes: its stream and registry (cluster.relay.SiteRelay)."""

    def carry_out(self, work: SiteWork) -> None: ...
    def tell(self, event: PushDelivered | CallActionTaken) -> None:
        """What a device did about a call: the call may be another gateway's."""
        ...


class Keeper(Protocol):
    """Where a submitter learns what became of a push it handed to the site (KeepPush)."""

    def claim(self, ticket: int) -> asyncio.Future[Kept]: ...


class SipOut(Protocol):
    """Where the bridge's output goes: the SIP transport's sockets and clocks."""

    def carry_out(self, outputs: list[SipOutput]) -> None: ...


class Pump:
    """One per gateway: see the module's docstring."""

    def __init__(self, delivery: Delivery, metrics: Metrics) -> None:
        self.delivery = delivery
        self.metrics = metrics
        self.calls: Calls | None = None  # with the SIP bridge
        self.bridge: SipBridge | None = None
        self.sip: SipOut | None = None
        self.presence: Whereabouts | None = None  # in a site of gateways
        self.site: SiteOut | None = None

    def run(self) -> None:
        """Carry out everything queued, and what that queues in turn, in order."""
        for _ in range(MAX_ROUNDS):
            if not self._round():
                return
        faults.bounded(log, "pump", "outputs still queued after %d rounds; the rest waits "
                       "for the next input", MAX_ROUNDS)

    def _round(self) -> bool:
        actions = self.delivery.actions_to_send()
        for action in actions:
            self._device_action(action)
        answers = self.calls.answers_to_send() if self.calls is not None else []
        if self.bridge is not None:
            for answer in answers:
                self.bridge.answer(answer)
            outputs = self.bridge.outputs()
            if outputs and self.sip is not None:
                with faults.contained(self.metrics, "sip_send", "bridge output"):
                    self.sip.carry_out(outputs)
        return bool(actions or answers)

    def _device_action(self, action: DeliveryOutput) -> None:
        # links contain their own failures (a failed write ends that connection only)
        if isinstance(action, SendPush):
            _carrier(action.link).send_push(action.push)
        elif isinstance(action, WelcomeDevice):
            _carrier(action.link).welcome(action.token, action.user)
            if self.presence is not None:
                self.presence.arrived(action.token, action.link.transport)
        elif isinstance(action, DeviceLeft):
            if self.presence is not None:
                self.presence.left(action.token)
        elif isinstance(action, CloseLink):
            _carrier(action.link).close(action.reason, action.code, action.message)
        elif isinstance(action, SiteWork):
            if self.site is not None:
                self.site.carry_out(action)
        elif isinstance(action, PushDelivered | CallActionTaken):
            if self.site is not None and (isinstance(action, CallActionTaken)
                                          or action.push_type == "voip"):
                self.site.tell(action)
            self.device_event(action)

    def device_event(self, event: PushDelivered | CallActionTaken) -> None:
        """A device's ack or call action, here or (in a site) at another gateway: to the
        calls, which know whether the call is this gateway's."""
        if self.calls is not None:
            with faults.contained(self.metrics, "call_event", event.token[:8]):
                self.calls.device_event(event)


def _carrier(link: object) -> Carrier:
    """The links Delivery files its actions under are the ones the shells gave it."""
    return link  # type: ignore[return-value]
