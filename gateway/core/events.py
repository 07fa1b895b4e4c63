"""What the core returns: work for the shells, and what happened, as small typed values.

The core never calls out. `Delivery` and `Calls` queue these while they handle an input;
the shell takes them (`actions_to_send()`, `answers_to_send()`) right after and carries them
out, as aioquic's `datagrams_to_send()` hands a QUIC connection's output to its shell.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from gateway.protocol.messages import CallAction, Push


class DeviceLink(Protocol):
    """One live connection to a device, as the core sees it: a handle the core files its
    actions under, and the transport the metrics count it by. The core never calls it."""

    transport: str


@dataclass(frozen=True, slots=True)
class WelcomeDevice:
    """Admitted: send `welcome` on `link`."""

    link: DeviceLink
    token: str
    user: str | None


@dataclass(frozen=True, slots=True)
class SendPush:
    """Write this push to `link`."""

    link: DeviceLink
    push: Push


@dataclass(frozen=True, slots=True)
class CloseLink:
    """End `link` with `bye` (replaced, unregistered, shutting down, ...)."""

    link: DeviceLink
    reason: str
    code: str | None
    message: str | None


@dataclass(frozen=True, slots=True)
class DeviceLeft:
    """The device's connection here ended (not replaced by another one here): a site
    forgets that this gateway holds it."""

    token: str


@dataclass(frozen=True, slots=True)
class PushDelivered:
    """A device acknowledged a push (the calls listen for their pushes' acks)."""

    token: str
    push_id: str
    at: float


@dataclass(frozen=True, slots=True)
class CallActionTaken:
    """A device said something about a call (ringing, decline, busy)."""

    token: str
    action: CallAction
    at: float


DeviceAction = WelcomeDevice | SendPush | CloseLink
DeliveryEvent = PushDelivered | CallActionTaken | DeviceLeft
DeliveryOutput = DeviceAction | DeliveryEvent
