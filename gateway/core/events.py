"""What the core returns: work for the shells, and what happened, as small typed values.

The core never calls out. `Delivery` and `Calls` queue these while they handle an input;
the shell takes them (`actions_to_send()`, `answers_to_send()`) right after and carries them
out, as aioquic's `datagrams_to_send()` hands a QUIC connection's output to its shell.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from gateway.core.model import PushRequest
from gateway.protocol.messages import CallAction, Push
from gateway.records import StoredPush


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
    push_type: str = ""  # in a site (where a call's gateway may be another): "voip" is a call's


@dataclass(frozen=True, slots=True)
class CallActionTaken:
    """A device said something about a call (ringing, decline, busy)."""

    token: str
    action: CallAction
    at: float


# --- in a site of gateways: work for the site's shell (gateway.cluster) ------------------


@dataclass(frozen=True, slots=True)
class KeepPush:
    """Keep this push for the site (the site's push stream). Whoever submitted it waits for
    `ticket` before answering: accepted only once a quorum has it. The device gets it back
    from the stream on whichever gateway holds it (`Delivery.site_push`). `push.seq` is 0:
    the stream gives it one. `counted`: whether what the site drops for it (an older push
    it collapses, the oldest of a full queue) goes into the drop counters (not for the
    self-test's devices)."""

    ticket: int
    push: StoredPush
    counted: bool = True


@dataclass(frozen=True, slots=True)
class LookUpDevice:
    """A push for a token this gateway's copy of the site's registry does not have (yet):
    ask the site; if it knows the device, the shell takes its record and submits the push
    again, else it is BadDeviceToken. Whoever submitted it waits for `ticket`."""

    ticket: int
    token: str
    request: PushRequest
    at: float


@dataclass(frozen=True, slots=True)
class LoadBacklog:
    """Read the device's kept pushes after `after` from the site (its stream's leader) and
    hand them to `Delivery.backlog`."""

    token: str
    link: DeviceLink
    after: int


@dataclass(frozen=True, slots=True)
class AckAtSite:
    """The device has every push up to `seq`: forget them for the whole site."""

    token: str
    seq: int


@dataclass(frozen=True, slots=True)
class RecordDevice:
    """A device said hello: write its record to the site now, then hand back
    `Delivery.recorded(token, link)` (its welcome waits for that)."""

    token: str
    link: DeviceLink


@dataclass(frozen=True, slots=True)
class DeviceChanged:
    """The device's record changed here (a hello, a departure, an unregistration, a
    binding): the site's other gateways are to know it."""

    token: str


@dataclass(frozen=True, slots=True)
class Kept:
    """What became of a KeepPush: kept by the site with its `seq`, or not, and why (the
    push's submitter answers 503 with that: nothing unkept is ever reported accepted)."""

    seq: int | None
    failure: str | None = None
    duplicate: bool = False  # its apns-id was kept already: kept once
    # APNs' reason when `failure` is set: ServiceUnavailable (503), or what checking the
    # push against the site's registry found (BadDeviceToken, Unregistered, ...)
    reason: str = "ServiceUnavailable"
    timestamp: float | None = None  # with Unregistered: when


DeviceAction = WelcomeDevice | SendPush | CloseLink
DeliveryEvent = PushDelivered | CallActionTaken | DeviceLeft
SiteWork = (KeepPush | LookUpDevice | RecordDevice | LoadBacklog | AckAtSite
            | DeviceChanged)
DeliveryOutput = DeviceAction | DeliveryEvent | SiteWork
