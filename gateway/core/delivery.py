"""Store-and-forward delivery with APNs semantics, and the registry of connected devices.

The shells hand in `DeviceLink`s (a handle for one connection) and the current time; this
module decides what is stored, sent, re-sent, collapsed and dropped, and returns it as
`core.events` from `actions_to_send()`: it never calls a link or a listener.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.core import push_rules
from gateway.core.assertions import AssertionPolicy, AssertionRejected, verified_binding
from gateway.core.clock import ClockStep, ClockWatch
from gateway.core.events import (
    AckAtSite,
    CallActionTaken,
    CloseLink,
    DeliveryOutput,
    DeviceChanged,
    DeviceLeft,
    DeviceLink,
    KeepPush,
    LoadBacklog,
    LookUpDevice,
    PushDelivered,
    RecordDevice,
    SendPush,
    WelcomeDevice,
)
from gateway.core.installs import InstallGate, InstallPolicy, InstallVerdict
from gateway.core.metrics import Metrics
from gateway.core.model import PushRequest
from gateway.core.site import SiteView
from gateway.core.storage import Storage
from gateway.core.tokens import derive_token, selftest_tokens, short
from gateway.protocol.messages import PUSH_TYPES, ByeReason, CallAction, Hello, Push
from gateway.records import DeviceRecord, StorageFailed, StoredPush, is_token

log = logging.getLogger("lpgw.delivery")

# A lost group commit fails every commit (and grouped push) for this long after: whoever
# commits first (the SIP shell, a push from `lpgw send`) must not leave the API's group
# callers to commit nothing and answer 200 for pushes rolled back.
GROUP_FAILURE_HOLD = 2.0
STORAGE_LOG_EVERY = 60.0  # seconds between "the store cannot write" lines


class _NotHere(Exception):
    """The device is not in this gateway's copy of the site's registry."""


class Refused(Exception):
    """A hello the gateway will not admit; `reason` (and `code`) go into `bye`."""

    def __init__(self, reason: str, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.code = code


class Rejected(Exception):
    """A push request refused; `reason` is the APNs reason string."""

    def __init__(self, reason: str, message: str = "", timestamp: float | None = None) -> None:
        super().__init__(message or reason)
        self.reason = reason
        self.timestamp = timestamp


# pushes sent in a site and not yet acked that a connection remembers, at most (for their
# delivery reports); older ones are still acked for the site, just not reported
SENT_BOUND = 1024
# devices pruned in one sweep at most: a long-idle site's first sweep stays short
PRUNE_BATCH = 1000
RECENT_PUSHES = 1000  # pushes whose fate the console shows, all devices together


@dataclass(frozen=True)
class Accepted:
    push_id: str
    seq: int | None  # None when the push was dropped at once (expired)
    sent: bool  # written to a connected device now
    stored: bool
    # in a site: the push is being kept for the site (KeepPush); its submitter answers only
    # once the site's shell says this ticket is kept
    ticket: int | None = None


@dataclass(frozen=True)
class DeliverySettings:
    queue_limit: int = 256
    default_ttl: int = 30 * 86400
    max_payload: int = push_rules.DEFAULT_PAYLOAD_LIMIT
    max_payload_voip: int = push_rules.PAYLOAD_LIMITS["voip"]
    forget_after: float = 30 * 86400  # unseen this long: Unregistered (410), then pruned
    installs: InstallPolicy = field(default_factory=InstallPolicy)


@dataclass
class _Live:
    link: DeviceLink
    since: float
    sent_through: int = 0
    ephemeral: dict[int, tuple[str, float]] = field(default_factory=dict)  # seq -> id, at
    # in a site: what was sent and not yet acked (seq -> id, accepted at, type, kept),
    # bounded; the backlog being read (pushes from the stream meanwhile: read again after)
    sent: dict[int, tuple[str, float, str, bool]] = field(default_factory=dict)
    loading: bool = False
    more: bool = False
    # in a site: welcomed only once the site has its record (RecordDevice -> recorded)
    welcomed: bool = True
    user: str | None = None
    # in a site: the device's last_ack at its hello; pushes through it that the site still
    # keeps were delivered (by a gateway that died before the site heard the ack)
    had_through: int = 0


class Delivery:
    def __init__(self, storage: Storage, token_secret: bytes, gateway_id: str,
                 settings: DeliverySettings, policy: AssertionPolicy, metrics: Metrics,
                 monotonic: Callable[[], float] | None = None,
                 site: SiteView | None = None) -> None:
        """`monotonic`, when given, is read beside every `now` (wall-clock seconds) the
        shells pass in, to see the wall clock step (see core.clock); without it (tests of
        the core that move `now` by hand) `now` is taken as it comes.

        With `site` (a site of gateways), pushes are kept by the site's stream, not by
        `storage` (which holds this gateway's copy of the site's device records): submit
        returns KeepPush for the shell, and the device's pushes come back through
        `site_push` and `backlog` on whichever gateway holds it."""
        self._storage = storage
        self.site = site
        # what `welcome.gateway_id` says, and `hello.last_ack` must name: the site's id in
        # a site (its seqs are the site's), else this gateway's
        self.welcome_id = site.site_id if site is not None else gateway_id
        self._tickets = 0
        self._monotonic = monotonic
        self._clock: ClockWatch | None = None
        self.last_step: ClockStep | None = None
        self.gateway_id = gateway_id
        self.settings = settings
        self.policy = policy
        self.metrics = metrics
        self._secret = token_secret
        self._live: dict[str, _Live] = {}
        self._installs = InstallGate(settings.installs)
        # device records, counted once and then kept up to date by new installs (a count(*)
        # per new install was ~1 ms at 20,000 rows); recounted after each sweep
        self._records: int | None = None
        self._waiting: set[str] = set()  # devices with pushes in the open group commit
        self._warned: dict[str, float] = {}
        # the self-test's own devices: out of the operators' counters, deleted once gone
        self._test_tokens = selftest_tokens(token_secret, gateway_id)
        # (when, token, push id, fate) of the last RECENT_PUSHES pushes: the console's
        self.recent_pushes: collections.deque[tuple[float, str, str, str]] = \
            collections.deque(maxlen=RECENT_PUSHES)
        # a full or failing disk: (since, what failed) until a write works again
        self.storage_error: tuple[float, str] | None = None
        self._storage_logged = float("-inf")
        # (when, why) a group commit was lost: see GROUP_FAILURE_HOLD
        self._group_lost: tuple[float, StorageFailed] | None = None
        # writes worth no fsync that failed, redone by retry_deferred (token -> value)
        self._deferred_seen: dict[str, float] = {}
        self._deferred_acks: dict[str, int] = {}  # acks reported delivered, not yet written
        self._deferred_forget: set[str] = set()
        # what the shell is to carry out once the input being handled is done
        self._out: list[DeliveryOutput] = []

    def actions_to_send(self) -> list[DeliveryOutput]:
        """What the last inputs decided, in order: the shell carries it out (frames to
        devices, links to close) and hands the events on (acks and call actions to the
        calls). Call after every input, as aioquic's datagrams_to_send()."""
        out, self._out = self._out, []
        return out

    # --- devices ---------------------------------------------------------------------

    def admit(self, link: DeviceLink, hello: Hello, now: float,
              source: str | None = None) -> str:
        """Admit a hello: welcome the link, replace an older one, send what is waiting.
        `source` is the device's IP address: new installs are limited per source."""
        self.observe_clock(now)
        user = user_expires = None
        token = derive_token(self._secret, hello.install_id, hello.topic)
        if hello.assertion is not None and not self.policy.enabled:
            log.warning("ignoring a user assertion: no assertion key is configured")
        elif hello.assertion is not None:
            try:
                user, user_expires = verified_binding(self.policy, hello.assertion, now)
            except AssertionRejected as exc:
                self._handshake(token, link, "unauthorized")
                raise Refused(ByeReason.UNAUTHORIZED, str(exc)) from None
        elif self.policy.required:
            self._handshake(token, link, "unauthorized")
            raise Refused(ByeReason.UNAUTHORIZED, "this gateway requires a user assertion")
        self._admit_install(token, link, source, now)
        # written before anything changes: a device the store cannot take is refused, and
        # an older connection of it stays as it was
        device = self._upsert(token, hello, user, user_expires, link, now)
        old = self._live.pop(token, None)
        if old is not None:
            self._count_connected(old.link, -1)
            self._lose_ephemeral(token, old)
            self._out.append(CloseLink(old.link, ByeReason.REPLACED, "replaced",
                                       "another connection of this install took over"))
            log.info("device %s replaced its %s connection", short(token), old.link.transport)
        if self.site is not None:
            return self._admit_at_site(token, hello, user, link, now)
        if hello.last_ack and hello.gateway_id == self.welcome_id:
            self._ack_stored(token, hello.last_ack, now)
        live = _Live(link=link, since=now, sent_through=0)
        self._live[token] = live
        self._count_connected(link, +1)
        self._handshake(token, link, "welcome")
        self._out.append(WelcomeDevice(link, token, user))
        if log.isEnabledFor(logging.INFO):  # counting the queue is a query: only when said
            log.info("device %s connected over %s (topic %s%s), %d queued", short(token),
                     link.transport, hello.topic, f", user {user}" if user else "",
                     self._storage.count_pending(token))
        if device.next_seq - 1 > device.acked_seq:  # else nothing can be stored: no query
            self._flush(token, live, now)
        return token

    def _admit_at_site(self, token: str, hello: Hello, user: str | None, link: DeviceLink,
                       now: float) -> str:
        """The device's pushes are the site's: what it has (its `last_ack`, counted in the
        site's seqs) and the site still keeps is reported delivered and forgotten for the
        site (see `backlog`), and the rest is read from the stream."""
        after = 0
        if hello.last_ack and hello.gateway_id == self.welcome_id:
            after = hello.last_ack
        live = _Live(link=link, since=now, sent_through=after, loading=True, welcomed=False,
                     user=user, had_through=after)
        self._live[token] = live
        self._count_connected(link, +1)
        # the welcome (with the token the app hands its server) waits until the site has
        # the device's record: a push for it is then known on every gateway, even one
        # whose copy lags, and even if this gateway dies the next moment
        self._out.append(RecordDevice(token, link))
        log.info("device %s connected over %s (topic %s%s)", short(token), link.transport,
                 hello.topic, f", user {user}" if user else "")
        return token

    def recorded(self, token: str, link: DeviceLink) -> None:
        """The site has the device's record (or could not take it in time: then it is
        written later): welcome it, and read its backlog."""
        live = self._live.get(token)
        if live is None or live.link is not link or live.welcomed:
            return
        live.welcomed = True
        self._handshake(token, link, "welcome")
        self._out.append(WelcomeDevice(link, token, live.user))
        # from the start when it has had some: what the site kept of those is reported
        self._out.append(LoadBacklog(token, link, 0 if live.had_through else
                                     live.sent_through))

    def _admit_install(self, token: str, link: DeviceLink, source: str | None,
                       now: float) -> None:
        """Refuse a new install past its source's rate or the record cap (Refused)."""
        if token in self._live:
            return
        try:
            if self._storage.device(token) is not None:
                return
            if self._records is None:
                self._records = self._storage.count_devices()
        except StorageFailed:
            return  # _upsert says what the store cannot do
        devices = self._records
        if self._installs.policy is not self.settings.installs:
            self._installs.set_policy(self.settings.installs)
        mono = self._monotonic() if self._monotonic is not None else now
        verdict = self._installs.check(source, mono, devices)
        if verdict is InstallVerdict.ALLOWED:
            self._records = devices + 1
            return
        self.metrics.installs_refused.labels(verdict.value).inc()
        if verdict is InstallVerdict.RATE:
            self._handshake(token, link, "rate_limited")
            raise Refused(ByeReason.RATE_LIMITED, "too many new installs from this address "
                          "lately; connect again later", "new_install_rate")
        self._handshake(token, link, "device_limit")
        if now - self._warned.get("device_limit", 0.0) > 60:  # once a minute
            self._warned["device_limit"] = now
            log.warning("the gateway keeps %d device records at most (delivery.max_devices):"
                        " new installs are refused", self.settings.installs.max_devices)
        raise Refused(ByeReason.DEVICE_LIMIT, "this gateway has all the devices it can keep; "
                      "ask the site to raise delivery.max_devices", "device_limit")

    def _upsert(self, token: str, hello: Hello, user: str | None,
                user_expires: float | None, link: DeviceLink, now: float) -> DeviceRecord:
        """Record the device; on a full disk a device already known as it is now is
        admitted all the same (its last-seen time is written later), any other refused
        with `bye unavailable` (it comes back with backoff, nothing of its is lost)."""
        try:
            device = self._storage.record_device(token, hello.topic, hello.push_types, user, now,
                                              user_expires)
        except StorageFailed as exc:
            known = self._known_as_is(token, hello, user)
            self._storage_failed("last_seen" if known else "device", exc, now)
            if known is not None:
                self._deferred_seen[token] = now
                return known
            self._handshake(token, link, "unavailable")
            raise Refused(ByeReason.UNAVAILABLE, f"the gateway cannot record this device now: "
                          f"{self._why(exc)}; nothing is lost, connect again later",
                          "storage_unavailable") from None
        return device  # a small write that worked says little: a push may still not fit

    def _known_as_is(self, token: str, hello: Hello, user: str | None) -> DeviceRecord | None:
        """The stored record when the hello would change nothing that matters in it."""
        try:
            device = self._storage.device(token)
        except StorageFailed:
            return None
        if (device is None or device.unregistered_at is not None
                or tuple(device.push_types) != tuple(hello.push_types)
                or (user is not None and user != device.user)):
            return None
        return device

    def detach(self, token: str, link: DeviceLink, now: float, reason: str) -> None:
        self.observe_clock(now)
        live = self._live.get(token)
        if live is None or live.link is not link:
            return
        del self._live[token]
        self._count_connected(link, -1)
        self._lose_ephemeral(token, live)
        self._out.append(DeviceLeft(token))
        log.info("device %s disconnected from %s: %s", short(token), link.transport, reason)
        if self.site is not None:  # its last-seen time for the site (a self-test's: gone)
            self._out.append(DeviceChanged(token))
        if token in self._test_tokens:  # the self-test is done with it: no trace left
            self._forget(token, now)
            return
        try:
            self._storage.seen(token, now)
        except StorageFailed as exc:  # worth no fsync: written when the disk takes it
            self._storage_failed("last_seen", exc, now)
            self._deferred_seen[token] = now

    def unregister(self, token: str, link: DeviceLink, now: float) -> None:
        try:
            self._storage.unregister(token, now)
        except StorageFailed as exc:  # not recorded: the app must ask again, so say so
            self._storage_failed("unregister", exc, now)
            self._out.append(CloseLink(
                link, ByeReason.UNAVAILABLE, "storage_unavailable",
                f"the unregistration was not recorded: {self._why(exc)}; "
                "unregister again later"))
            return
        log.info("device %s unregistered", short(token))
        self.device_changed(token)
        self._out.append(CloseLink(link, ByeReason.UNREGISTERED, None,
                                   "pushes to this token are now refused"))

    def ack(self, token: str, link: DeviceLink, seq: int, now: float) -> None:
        self.observe_clock(now)
        live = self._live.get(token)
        if live is None or live.link is not link:
            return
        if self.site is not None:
            self._ack_at_site(token, live, seq, now)
            return
        done = [live.ephemeral.pop(s) for s in sorted(live.ephemeral) if s <= seq]
        self._delivered(token, done, now)
        self._ack_stored(token, seq, now)

    def _ack_at_site(self, token: str, live: _Live, seq: int, now: float) -> None:
        done = [live.sent.pop(s) for s in sorted(live.sent) if s <= seq]
        counted = token not in self._test_tokens
        for push_id, accepted_at, push_type, _ in done:
            self._fate(token, push_id, "delivered", now)
            if counted:
                self.metrics.delivered.inc()
                self.metrics.latency.observe(max(0.0, now - accepted_at))
            self._out.append(PushDelivered(token, push_id, now, push_type))
        if any(kept for _, _, _, kept in done):
            self._out.append(AckAtSite(token, seq))

    def disconnect(self, token: str, why: str) -> bool:
        """An operator ends the device's connection (it comes back with backoff, as after
        `unavailable`); False if it is not connected here."""
        live = self._live.get(token)
        if live is None:
            return False
        log.info("device %s disconnected: %s", short(token), why)
        self._out.append(CloseLink(live.link, ByeReason.UNAVAILABLE, None, why))
        return True

    def device_changed(self, token: str) -> None:
        """The device's record changed (the API bound it to a user): tell the site."""
        if self.site is not None:
            self._out.append(DeviceChanged(token))

    def _ack_stored(self, token: str, seq: int, now: float) -> None:
        reported = self._deferred_acks.get(token, 0)
        try:
            done = self._storage.ack_through(token, seq, now, reported_through=reported)
        except StorageFailed as exc:
            # worth no fsync: the device has the pushes all the same. Report them now (a
            # ringing phone must stop the others), write the ack when the disk takes it
            self._storage_failed("ack", exc, now)
            if seq <= reported:
                return
            try:
                done = self._storage.delivered_through(token, reported, seq)
            except StorageFailed:
                return
            self._deferred_acks[token] = seq
        else:
            if seq >= reported:
                self._deferred_acks.pop(token, None)
        self._delivered(token, done, now)

    def _delivered(self, token: str, pushes: list[tuple[str, float]], now: float) -> None:
        counted = token not in self._test_tokens
        for push_id, accepted_at in pushes:
            self._fate(token, push_id, "delivered", now)
            if counted:
                self.metrics.delivered.inc()
                self.metrics.latency.observe(max(0.0, now - accepted_at))
            self._out.append(PushDelivered(token, push_id, now))

    def call_action(self, token: str, action: CallAction, now: float) -> None:
        self.metrics.call_actions.labels(action.action).inc()
        log.info("device %s: call %s %s", short(token), action.call_id, action.action)
        self._out.append(CallActionTaken(token, action, now))

    def is_connected(self, token: str) -> bool:
        return token in self._live

    def reachable(self, token: str) -> bool:
        """Connected here, or (in a site) to another gateway of the site."""
        return token in self._live or (self.site is not None and self.site.connected(token))

    def connected(self) -> dict[str, str]:
        """token -> transport of every connected device."""
        return {token: live.link.transport for token, live in self._live.items()}

    def shutdown(self) -> None:
        for token, live in list(self._live.items()):
            self._out.append(CloseLink(live.link, ByeReason.SHUTDOWN, None,
                                       "the gateway is stopping"))
            self._out.append(DeviceLeft(token))
            self._live.pop(token, None)
            self._count_connected(live.link, -1)
            self._lose_ephemeral(token, live)

    # --- the self-test's devices, and writes a full disk deferred -----------------------

    def is_test_device(self, token: str) -> bool:
        """One of `lpgw selftest`'s own devices: the shells keep it out of their counters."""
        return token in self._test_tokens

    def forget_test_devices(self, now: float) -> None:
        """Delete what earlier self-tests left (before this version, they stayed)."""
        for token in self._test_tokens:
            if token not in self._live:
                self._forget(token, now)

    def _forget(self, token: str, now: float) -> None:
        try:
            self._storage.forget_device(token)
            self._deferred_forget.discard(token)
        except StorageFailed as exc:
            self._storage_failed("forget", exc, now)
            self._deferred_forget.add(token)
        self._deferred_seen.pop(token, None)
        self._deferred_acks.pop(token, None)

    def retry_deferred(self, now: float) -> bool:
        """Write what a full disk deferred (last seen, acks, self-test deletions); True
        when nothing is left. Called now and then, and after every write that worked."""
        try:
            for token, seq in list(self._deferred_acks.items()):
                self._storage.ack_through(token, seq, now, reported_through=seq)
                if self._deferred_acks.get(token) == seq:
                    del self._deferred_acks[token]
            for token, seen in list(self._deferred_seen.items()):
                if token not in self._live:  # a connected one is seen now: on detach
                    self._storage.seen(token, seen)
                del self._deferred_seen[token]
            for token in list(self._deferred_forget):
                if token not in self._live:
                    self._storage.forget_device(token)
                self._deferred_forget.discard(token)
        except StorageFailed as exc:
            self._storage_failed("retry", exc, now, count=False)
            return False
        return True

    def check_storage(self, now: float) -> None:
        """While the store fails: try a small write, and what was deferred, so the failure
        ends (and `lpgw status` says so) once the disk takes writes, traffic or not."""
        if self.storage_error is None and not (
                self._deferred_acks or self._deferred_seen or self._deferred_forget):
            return
        try:
            self._storage.probe(now)
        except StorageFailed:
            return
        self._storage_ok(now)

    def _storage_failed(self, what: str, exc: StorageFailed, now: float,
                        count: bool = True) -> None:
        """Count it; log when the store starts failing (a full disk fails every write: one
        line, not thousands, and at most one a minute), and when it works again."""
        if count:
            self.metrics.storage_failures.labels(what).inc()
        if self.storage_error is None:
            self.storage_error = (now, str(exc))
            if not 0 <= now - self._storage_logged < STORAGE_LOG_EVERY:
                self._storage_logged = now
                log.error("the store cannot write (%s): refusing pushes (503 "
                          "ServiceUnavailable) and new devices (bye unavailable) until it "
                          "can; connected devices stay and get what is stored", exc)

    def _storage_ok(self, now: float) -> None:
        """A push (or the shell's probe, once the disk has room) was written."""
        if self.storage_error is not None:
            since, _ = self.storage_error
            self.storage_error = None
            if self._storage_logged >= since:  # its failure was said: say it is over
                log.warning("the store writes again, after %.0f s", max(0.0, now - since))
        if self._deferred_acks or self._deferred_seen or self._deferred_forget:
            self.retry_deferred(now)

    @staticmethod
    def _why(exc: StorageFailed) -> str:
        return ("the gateway's storage is full" if exc.full
                else "the gateway's storage is failing") + f" ({exc.detail})"

    def _handshake(self, token: str, link: DeviceLink, result: str) -> None:
        if token not in self._test_tokens:
            self.metrics.handshakes.labels(link.transport, result).inc()

    # --- pushes ----------------------------------------------------------------------

    def submit(self, token: str, req: PushRequest, now: float,
               group: bool = False, send_first: bool = False) -> Accepted:
        """Validate, make durable, then send if the device is here. Raises Rejected.

        With `group`, the push joins an open group commit instead: it is durable, and sent,
        only once `commit()` returns, and the caller must not report it accepted before.
        With `send_first` too, it goes to the device at once and the caller commits right
        after (an incoming call: the phone must ring now; the PBX hears nothing but
        100 Trying before the commit).
        """
        self.observe_clock(now)
        counted = token not in self._test_tokens
        in_group = group or self._storage.in_group
        try:
            lost = self._lost_group(now) if group else None
            if lost is not None:
                raise Rejected("ServiceUnavailable", f"the push was not stored: "
                               f"{self._why(lost)}; try again later")
            try:
                result = self._submit(token, req, now, group, send_first)
            except _NotHere:
                return self._look_up(token, req, now)
            except StorageFailed as exc:
                if in_group:  # SQLite may have ended the group's transaction: none of it lands
                    self._lose_group(exc, now)
                self._storage_failed("push", exc, now)
                raise Rejected("ServiceUnavailable",
                               f"the push was not stored: {self._why(exc)}; try again "
                               "later") from None
        except Rejected as exc:
            if counted:
                self.metrics.rejected.labels(exc.reason).inc()
            raise
        if counted:
            self.metrics.accepted.labels(req.push_type).inc()
        if self.site is not None:
            return result  # kept by the site's shell (KeepPush), not by storage
        if not group and self._storage.in_group:
            self.commit(now)  # a group is open: this push joined it, and lands with it
        elif result.stored and not group:
            self._storage_ok(now)
        return result

    def commit(self, now: float) -> None:
        """End the open group commit (one fsync for all of it), then send what it held.

        Raises Rejected (ServiceUnavailable) when the group could not be stored: none of
        its pushes may be reported accepted.
        """
        if self.site is not None:
            return  # the site's shell keeps each push (KeepPush): nothing is grouped here
        failed = self._lost_group(now)
        if failed is None:
            try:
                self._storage.commit()
            except StorageFailed as exc:
                self._storage_failed("push", exc, now)
                self._lose_group(exc, now)
                failed = exc
        if failed is not None:
            self.rollback()
            raise Rejected("ServiceUnavailable", f"the pushes were not stored: "
                           f"{self._why(failed)}; try again later")
        waiting, self._waiting = self._waiting, set()
        if waiting:
            self._storage_ok(now)
        for token in waiting:
            live = self._live.get(token)
            if live is not None:
                self._flush(token, live, now)

    def rollback(self) -> None:
        self._storage.rollback()
        self._waiting.clear()

    def _lose_group(self, exc: StorageFailed, now: float) -> None:
        self.rollback()
        self._group_lost = (now, exc)

    def _lost_group(self, now: float) -> StorageFailed | None:
        """Why a group was lost, while commits must still fail for it."""
        if self._group_lost is None:
            return None
        at, exc = self._group_lost
        if 0 <= now - at < GROUP_FAILURE_HOLD:
            return exc
        self._group_lost = None
        return None

    def _submit(self, token: str, req: PushRequest, now: float, group: bool,
                send_first: bool = False) -> Accepted:
        if not is_token(token):
            raise Rejected("BadDeviceToken", "a device token is 64 lowercase hex characters")
        device = self._storage.device(token)
        if device is None and self.site is not None:
            raise _NotHere  # recorded on another gateway a moment ago? the site says
        if device is None:
            raise Rejected("BadDeviceToken", "no device has this token")
        if device.unregistered_at is not None:
            raise Rejected("Unregistered", "the device unregistered",
                           timestamp=device.unregistered_at)
        if (token not in self._live and device.last_seen < now - self.settings.forget_after
                and not (self.site is not None and self.site.connected(token))):
            raise Rejected("Unregistered", "the device has not been seen for too long",
                           timestamp=device.last_seen)
        if req.push_type not in PUSH_TYPES:
            raise Rejected("InvalidPushType", f"push type must be one of {PUSH_TYPES}")
        if req.topic is not None:
            try:
                app = push_rules.app_topic(req.topic, req.push_type)
            except push_rules.PushRuleBroken as exc:
                raise Rejected(exc.reason, str(exc)) from None
            if app != device.topic:
                raise Rejected("DeviceTokenNotForTopic",
                               f"the token is not for topic {req.topic}")
        if req.push_type not in device.push_types:
            raise Rejected("DeviceTokenNotForTopic",
                           f"the device does not take {req.push_type} pushes")
        priority = (push_rules.default_priority(req.push_type) if req.priority is None
                    else req.priority)
        try:
            push_rules.check(req.push_type, priority, req.collapse_id, req.expiration,
                             req.push_id)
        except push_rules.PushRuleBroken as exc:
            raise Rejected(exc.reason, str(exc)) from None
        push_id = req.push_id.lower() if req.push_id else str(uuid.uuid4())
        if not req.payload:
            raise Rejected("PayloadEmpty", "the payload is empty")
        payload_json = json.dumps(req.payload, separators=(",", ":"), ensure_ascii=False)
        try:
            size = len(payload_json.encode())
        except UnicodeEncodeError:
            raise Rejected("BadPayload", "the payload holds a lone UTF-16 surrogate") from None
        limit = (self.settings.max_payload_voip if req.push_type == "voip"
                 else self.settings.max_payload)
        if size > limit:
            raise Rejected("PayloadTooLarge", f"payload over {limit} bytes")

        live = self._live.get(token)
        expiration = req.expiration
        if expiration is None:
            expiration = int(now) + self.settings.default_ttl
        if 0 < expiration < now:
            # APNs tries such a push once: what client libraries send for a time-to-live
            # of 0 is the current second, which has begun. Now or never, like 0.
            expiration = 0
        if self.site is not None:
            return self._keep_at_site(token, live, push_id, req, priority, expiration,
                                      payload_json, now)
        if expiration == 0:
            if live is None:
                self._expired(token)
                self._fate(token, push_id, "expired on arrival (away)", now)
                log.info("push %s to %s expired on arrival (its device is away)", push_id,
                         short(token))
                return Accepted(push_id, None, sent=False, stored=False)
            seq = self._storage.next_seq(token)
            live.ephemeral[seq] = (push_id, now)
            self._send(live, StoredPush(token, seq, push_id, req.push_type, priority, 0,
                                        payload_json, req.collapse_id, now), now)
            self._fate(token, push_id, "sent (now or never)", now)
            return Accepted(push_id, seq, sent=True, stored=False)
        if group:
            self._storage.begin()
        stored, collapsed, evicted = self._storage.accept_push(
            token, push_id, req.push_type, priority, expiration, req.collapse_id,
            payload_json, now, self.settings.queue_limit)
        counted = token not in self._test_tokens
        for gone_id in collapsed:
            self._fate(token, gone_id, "collapsed (a newer push replaced it)", now)
        for gone_id in evicted:
            self._fate(token, gone_id, "dropped (queue full)", now)
        self._fate(token, push_id, "queued" if live is None else "sent", now)
        if collapsed and counted:
            self.metrics.dropped.labels("collapsed").inc(len(collapsed))
        if evicted and counted:
            self.metrics.dropped.labels("queue_full").inc(len(evicted))
            if now - self._warned.get(token, 0.0) > 60:  # once a minute per device
                self._warned[token] = now
                log.warning("device %s queue full (%d): dropping the oldest pushes",
                            short(token), self.settings.queue_limit)
        if live is not None:
            if group and not send_first:
                self._waiting.add(token)
            elif live.sent_through == stored.seq - 1:  # the next one: no need to look
                self._send(live, stored, now, req.payload)
            else:
                self._flush(token, live, now)
        return Accepted(push_id, stored.seq, sent=live is not None, stored=True)

    def _look_up(self, token: str, req: PushRequest, now: float) -> Accepted:
        """In a site: a token this gateway's copy of the registry lacks is looked up in the
        site's before it is called bad (an app server deletes a token on BadDeviceToken)."""
        push_id = req.push_id.lower() if req.push_id else str(uuid.uuid4())
        self._tickets += 1
        self._out.append(LookUpDevice(self._tickets, token,
                                      dataclasses.replace(req, push_id=push_id), now))
        return Accepted(push_id, None, sent=False, stored=False, ticket=self._tickets)

    def _keep_at_site(self, token: str, live: _Live | None, push_id: str, req: PushRequest,
                      priority: int, expiration: int, payload_json: str,
                      now: float) -> Accepted:
        """In a site: the shell keeps the push in the site's stream (KeepPush); every
        gateway hears of it there and the one holding the device sends it."""
        assert self.site is not None
        if expiration == 0 and live is None and not self.site.connected(token):
            self._expired(token)
            self._fate(token, push_id, "expired on arrival (away)", now)
            log.info("push %s to %s expired on arrival (its device is away)", push_id,
                     short(token))
            return Accepted(push_id, None, sent=False, stored=False)
        self._tickets += 1
        push = StoredPush(token, 0, push_id, req.push_type, priority, expiration,
                          payload_json, req.collapse_id, now)
        self._out.append(KeepPush(self._tickets, push, token not in self._test_tokens))
        self._fate(token, push_id, "accepted (for the site)", now)
        return Accepted(push_id, None, sent=False, stored=expiration != 0,
                        ticket=self._tickets)

    def site_push(self, push: StoredPush, now: float) -> None:
        """A push the site kept (any gateway's), as the stream hands it out: sent if its
        device is here and has not had it. While the device's backlog is being read, it
        is left to the next read (so nothing overtakes an older push)."""
        live = self._live.get(push.token)
        if live is None:
            return
        if live.loading:
            live.more = True
            return
        if push.seq <= live.sent_through:
            return
        if push.expiration and push.expiration < now:
            self._expired(push.token)
            return
        self._send(live, push, now)

    def wants_backlog(self, token: str, link: DeviceLink) -> bool:
        live = self._live.get(token)
        return live is not None and live.link is link and live.loading

    def backlog(self, token: str, link: DeviceLink, pushes: list[StoredPush],
                now: float, complete: bool = True) -> None:
        """The device's kept pushes, read from the site after LoadBacklog, in order: sent.
        Once `complete`, if the stream handed out more meanwhile, that is asked for."""
        live = self._live.get(token)
        if live is None or live.link is not link:
            return
        had = [push for push in pushes if push.seq <= live.had_through]
        if had:  # the device had these, and the site never heard its ack: now it has
            counted = token not in self._test_tokens
            for push in had:
                if counted:
                    self.metrics.delivered.inc()
                self._out.append(PushDelivered(token, push.push_id, now, push.push_type))
            self._out.append(AckAtSite(token, live.had_through))
            log.info("device %s had %d pushes the site had not heard it ack", short(token),
                     len(had))
        for push in pushes:
            if push.seq <= live.sent_through or push.expiration == 0:
                continue  # had, or now-or-never for a connection that has ended
            if push.expiration < now:
                self._expired(token)
                continue
            self._send(live, push, now)
        if not complete:
            return
        live.had_through = 0
        if live.more:
            live.more = False
            self._out.append(LoadBacklog(token, link, live.sent_through))
        else:
            live.loading = False

    def expire(self, now: float) -> int:
        """Drop stored pushes past their expiration, and devices unseen for `forget_after`
        with their queues; call it now and then (a full disk leaves them to the next sweep;
        a device is never sent an expired one)."""
        self.observe_clock(now)
        try:
            gone = self._storage.expire(now)
            keep = set(self._live) | (self.site.held() if self.site is not None else set())
            pruned = self._storage.prune_devices(now - self.settings.forget_after,
                                                 keep=keep, limit=PRUNE_BATCH)
        except StorageFailed as exc:
            self._storage_failed("expire", exc, now)
            return 0
        for token, gone_id in gone:
            self._expired(token)
            self._fate(token, gone_id, "expired", now)
        self._records = None  # recounted at the next new install: forgets and prunes
        if pruned:
            self.metrics.devices_pruned.inc(len(pruned))
            log.info("pruned %d devices unseen for %.0f days, with their queues", len(pruned),
                     self.settings.forget_after / 86400)
            if self.site is not None:  # forgotten for the site too (every gateway's copy)
                self._out.extend(DeviceChanged(token) for token in pruned)
        return len(gone)

    # --- the wall clock -------------------------------------------------------------

    def observe_clock(self, now: float) -> ClockStep | None:
        """See whether the wall clock stepped since the last call (and deal with it)."""
        if self._monotonic is None:
            return None
        mono = self._monotonic()
        if self._clock is None:
            self._clock = ClockWatch(now, mono)
            return None
        step = self._clock.observe(now, mono)
        if step is not None:
            self.clock_stepped(step)
        return step

    def clock_stepped(self, step: ClockStep) -> None:
        """Intervals stay true across a step of the wall clock.

        Last-seen times move with the clock, so a device seen a minute ago is not judged
        unseen for 40 days (410 Unregistered, and app servers delete its token). Stored
        pushes keep the expiration the provider gave unless the step was forward: then each
        keeps the time it had left, so a push is dropped only when both readings, the wall
        clock's and the time elapsed since it was accepted, say it expired.
        """
        self.last_step = step
        self.metrics.clock_steps.inc()
        log.warning("the wall clock stepped %+.0f s (%s); last-seen times%s moved with it",
                    step.delta, "forward" if step.delta > 0 else "back",
                    " and stored pushes' expirations" if step.delta > 0 else "")
        for token in self._deferred_seen:
            self._deferred_seen[token] += step.delta
        try:
            self._storage.shift_times(step.delta, expirations=step.delta > 0)
        except StorageFailed as exc:
            self._storage_failed("clock_step", exc, step.wall)

    @property
    def clock_steps(self) -> int:
        return self._clock.steps if self._clock is not None else 0

    def _fate(self, token: str, push_id: str, fate: str, now: float) -> None:
        """What became of a push, for the console's device page: the last RECENT_PUSHES
        of all devices together (bounded; not the self-test's)."""
        if token not in self._test_tokens:
            self.recent_pushes.append((round(now, 3), token, push_id, fate))

    def pushes_of(self, token: str) -> list[dict]:
        """The device's pushes among the recent ones, newest first: id, fate, when."""
        return [{"at": at, "id": push_id, "fate": fate}
                for at, t, push_id, fate in reversed(self.recent_pushes) if t == token]

    def last_fates(self, tokens: set[str]) -> dict[str, dict]:
        """Each of these devices' newest push among the recent ones: fate and when."""
        out: dict[str, dict] = {}
        for at, token, push_id, fate in reversed(self.recent_pushes):
            if token in tokens and token not in out:
                out[token] = {"at": at, "id": push_id, "fate": fate}
        return out

    def _expired(self, token: str, n: int = 1) -> None:
        if token not in self._test_tokens:
            self.metrics.expired.inc(n)

    def _flush(self, token: str, live: _Live, now: float) -> None:
        """Send every stored push this connection has not had yet, in order."""
        expired: list[int] = []
        for stored in self._storage.pending_after(token, live.sent_through):
            if stored.expiration and stored.expiration < now:
                expired.append(stored.seq)
                continue
            self._send(live, stored, now)
        if expired:
            self._expired(token, len(expired))
            try:
                self._storage.drop_pushes(token, expired)
            except StorageFailed as exc:  # never sent all the same; the sweep deletes them
                self._storage_failed("expire", exc, now)

    def _send(self, live: _Live, stored: StoredPush, now: float,
              payload: dict | None = None) -> None:
        self._out.append(SendPush(live.link, Push(
            seq=stored.seq, id=stored.push_id, push_type=stored.push_type,
            priority=stored.priority, expiration=stored.expiration,
            payload=json.loads(stored.payload_json) if payload is None else payload,
            collapse_id=stored.collapse_id, sent_at=now, payload_json=stored.payload_json)))
        live.sent_through = max(live.sent_through, stored.seq)
        if self.site is not None:
            live.sent[stored.seq] = (stored.push_id, stored.accepted_at, stored.push_type,
                                     stored.expiration != 0)
            if len(live.sent) > SENT_BOUND:  # a device that never acks: forget the oldest
                del live.sent[min(live.sent)]

    def _lose_ephemeral(self, token: str, live: _Live) -> None:
        """Expiration-0 pushes never acked on a connection that ended are gone: expired."""
        if live.ephemeral:
            self._expired(token, len(live.ephemeral))
            live.ephemeral.clear()
        lost = sum(1 for _, _, _, kept in live.sent.values() if not kept)
        if lost:
            self._expired(token, lost)
        live.sent.clear()

    def _count_connected(self, link: DeviceLink, delta: int) -> None:
        self.metrics.connected.labels(link.transport).inc(delta)
