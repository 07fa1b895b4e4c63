"""The site's pushes through this gateway: kept in the stream, handed to the phones here.

`Delivery` (in a site) returns work instead of writing storage; this shell carries it out:

- KeepPush: publish to the site's stream (`SitePushes.accept`); the push's submitter (the
  API, `lpgw send`) claims the ticket and answers 200 only once the site has it, else 503.
  At most `max_keeps` wait at once, each at most `accept_timeout`.
- One ordered consumer per gateway on the site's push subjects (an ephemeral consumer, not
  an R3 one per device: docs/cluster.md) hands every newly kept push to `Delivery.site_push`;
  only those for devices connected here go further. No polling: a push accepted on B is
  here as soon as the stream has it.
- LoadBacklog: the device's kept pushes after its last ack, read from the stream leader.
- AckAtSite: a purge of the device's subjects, newest seq per device only, by a few workers.
- DeviceChanged: the site's device registry (`cluster.devices`).
- A call's ack or a call action (`tell`): published to every gateway of the site, where the
  pump hands it to the calls; the gateway whose INVITE it is answers its PBX.

Every input ends with `pump.run()`, as everywhere else; a failure stays with the one push,
device or message it came from.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Coroutine
from typing import Any, Protocol

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import api

from gateway import faults
from gateway.cluster.devices import SiteDevices
from gateway.cluster.pushes import QueueContended, SitePushes, Stored, site_push, token_of
from gateway.core.delivery import Delivery, Rejected
from gateway.core.events import (
    AckAtSite,
    CallActionTaken,
    DeviceChanged,
    KeepPush,
    Kept,
    LoadBacklog,
    LookUpDevice,
    PushDelivered,
    RecordDevice,
    SiteWork,
)
from gateway.core.metrics import Metrics
from gateway.core.tokens import short
from gateway.protocol.messages import CallAction

log = logging.getLogger("lpgw.cluster")

NO_QUORUM = "NATS nodes unreachable, this gateway cut off, or a leader being elected"
NATS_ERRORS = (nats.errors.Error, nats.js.errors.Error, TimeoutError)
CLAIM_WITHIN = 30.0  # seconds a kept push's result waits for its submitter to claim it
LOADS = 8  # backlogs read at once, at most (a reconnect storm waits its turn)
ACK_WORKERS = 4
HEALTH_EVERY = 5.0  # seconds between looks at the stream's state
# nats-py's ordered consumer re-creates itself after a gap, but not again if that fails (a
# timeout while JetStream elects a leader): then nothing reaches this gateway's phones. If
# the stream has pushes past the last one handed to us and none came for this long, the
# consumer is made anew from there.
STALLED_AFTER = 3.0
RETRY_AFTER = 0.5  # seconds before a read or purge that failed (NATS away) is tried again
# the consumer's buffer in this process while the pump is busy: beyond it NATS drops (and
# the ordered consumer starts again from the last message it handed over)
PENDING_MSGS = 65536
PENDING_BYTES = 64 * 1024 * 1024


class Runs(Protocol):
    def run(self) -> None: ...
    def device_event(self, event: PushDelivered | CallActionTaken) -> None: ...


class SiteRelay:
    def __init__(self, nc: Client, pushes: SitePushes, devices: SiteDevices,
                 delivery: Delivery, pump: Runs, metrics: Metrics, accept_timeout: float,
                 max_keeps: int, gateway_id: str) -> None:
        self.nc = nc
        self.gateway_id = gateway_id
        self.pushes = pushes
        self.devices = devices
        self.delivery = delivery
        self.pump = pump
        self.metrics = metrics
        self.accept_timeout = accept_timeout
        self.max_keeps = max_keeps
        self._loop = asyncio.get_running_loop()
        self._results: dict[int, asyncio.Future[Kept]] = {}
        self._keeping = 0
        self._tasks: set[asyncio.Task] = set()
        self._loads = asyncio.Semaphore(LOADS)
        self._acks: dict[str, int] = {}  # token -> newest seq to purge through
        self._ack_queue: asyncio.Queue[str] = asyncio.Queue()
        self._workers: list[asyncio.Task] = []
        self._sub: nats.js.JetStreamContext.PushSubscription | None = None
        self._events: Subscription | None = None
        self._seen = 0  # the last stream sequence handed to us
        self._heard = 0.0  # when (monotonic)
        self.resubscribed = 0
        self.health: dict[str, Any] = {}  # the stream, as last seen
        self.events_subject = f"lpgw.{pushes.site}.device_events"

    async def start(self) -> None:
        info = await self.pushes.js.stream_info(self.pushes.stream)
        self._seen = info.state.last_seq
        await self._subscribe()
        self._events = await self.nc.subscribe(
            self.events_subject, cb=self._on_event, pending_msgs_limit=PENDING_MSGS,
            pending_bytes_limit=PENDING_BYTES)
        self._workers = [asyncio.create_task(self._purge()) for _ in range(ACK_WORKERS)]
        self._workers.append(asyncio.create_task(self._health()))

    async def _subscribe(self) -> None:
        """One ordered consumer, from the push after the last one handed to us."""
        old, self._sub = self._sub, None
        if old is not None:
            with contextlib.suppress(Exception):
                await old.unsubscribe()
        self._heard = time.monotonic()
        self._sub = await self.pushes.js.subscribe(
            f"lpgw.{self.pushes.site}.push.>", stream=self.pushes.stream, cb=self._on_msg,
            ordered_consumer=True, idle_heartbeat=2.0, flow_control=True,
            config=api.ConsumerConfig(deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                                      opt_start_seq=self._seen + 1),
            pending_msgs_limit=PENDING_MSGS, pending_bytes_limit=PENDING_BYTES)

    async def stop(self) -> None:
        """Purges still wanted get a moment; then everything here ends."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drain_acks(), 1.0)
        for sub in (self._sub, self._events):
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        for task in [*self._workers, *self._tasks]:
            task.cancel()
        await asyncio.gather(*self._workers, *self._tasks, return_exceptions=True)
        for future in self._results.values():
            if not future.done():
                future.set_result(Kept(None, "the gateway is stopping; send it again"))

    async def _drain_acks(self) -> None:
        while self._acks:
            await asyncio.sleep(0.02)

    def status(self) -> dict[str, Any]:
        return {"keeps_waiting": self._keeping, "purges_waiting": len(self._acks),
                "stream": self.health}

    async def _health(self) -> None:
        """The stream's leader, its copies and what it keeps, every HEALTH_EVERY s."""
        while True:
            try:
                info = await self.pushes.js.stream_info(self.pushes.stream)
            except NATS_ERRORS as exc:
                self.health = {"name": self.pushes.stream, "error": str(exc)[:160]}
            else:
                cluster = info.cluster
                replicas = [{"name": r.name, "current": bool(r.current), "lag": r.lag}
                            for r in (cluster.replicas or [])] if cluster else []
                current = 1 + sum(1 for r in replicas if r["current"]) if cluster and \
                    cluster.leader else 0
                self.health = {"name": self.pushes.stream,
                               "leader": cluster.leader if cluster else None,
                               "replicas": replicas, "current": current,
                               "messages": info.state.messages, "bytes": info.state.bytes}
                self.metrics.cluster_stream_messages.set(info.state.messages)
                self.metrics.cluster_stream_current.set(current)
                if (info.state.last_seq > self._seen
                        and time.monotonic() - self._heard > STALLED_AFTER):
                    with faults.contained(self.metrics, "cluster_consumer"):
                        await self._restart_consumer()
            await asyncio.sleep(HEALTH_EVERY)

    # --- from the pump: never blocks -------------------------------------------------

    def carry_out(self, work: SiteWork) -> None:
        if isinstance(work, KeepPush):
            self._keep(work)
        elif isinstance(work, RecordDevice):
            self._spawn(self._record(work))
        elif isinstance(work, LookUpDevice):
            future = self._future(work.ticket)
            if self._take_slot(future):
                self._spawn(self._look_up(work, future))
        elif isinstance(work, LoadBacklog):
            self._spawn(self._load(work))
        elif isinstance(work, AckAtSite):
            if work.seq > self._acks.get(work.token, 0):
                if work.token not in self._acks:
                    self._ack_queue.put_nowait(work.token)
                self._acks[work.token] = work.seq
        elif isinstance(work, DeviceChanged):
            self.devices.changed(work.token)

    def claim(self, ticket: int) -> asyncio.Future[Kept]:
        """What became of the push with this ticket (KeepPush.ticket), once known."""
        future = self._results.pop(ticket, None)
        if future is None:  # claimed already, or never kept: a bug, said as a failure
            future = self._loop.create_future()
            future.set_result(Kept(None, "the push's answer was lost; send it again"))
        return future

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- what devices did about calls, across the site ----------------------------------

    def tell(self, event: PushDelivered | CallActionTaken) -> None:
        """A call's ack or a call action here: every gateway of the site hears it (core
        NATS, at most once: a lost one leaves the call to its reach timeout, 480); the one
        whose call it is answers its PBX. Never blocks (nats-py buffers it)."""
        fields: dict[str, Any] = {"from": self.gateway_id, "token": event.token,
                                  "at": event.at}
        if isinstance(event, PushDelivered):
            fields.update(push_id=event.push_id, push_type=event.push_type)
        else:
            fields["action"] = event.action.to_dict()
        self._spawn(self._tell(json.dumps(fields, separators=(",", ":")).encode()))

    async def _tell(self, data: bytes) -> None:
        try:
            await self.nc.publish(self.events_subject, data)
        except NATS_ERRORS as exc:
            self.metrics.cluster_errors.labels("device_event").inc()
            faults.bounded(log, "device_event", "a call event not told to the site: %s", exc)

    async def _on_event(self, msg: Msg) -> None:
        with faults.contained(self.metrics, "cluster_device_event"):
            fields = json.loads(msg.data)
            if fields.get("from") == self.gateway_id:
                return  # ours: handed to our calls already
            token, at = str(fields["token"]), float(fields["at"])
            event: PushDelivered | CallActionTaken
            if "action" in fields:
                event = CallActionTaken(token, CallAction.parse(fields["action"]), at)
            else:
                event = PushDelivered(token, str(fields["push_id"]), at,
                                      str(fields.get("push_type", "")))
            self.pump.device_event(event)
            self.pump.run()

    # --- keeping ---------------------------------------------------------------------

    async def _record(self, work: RecordDevice) -> None:
        """The device's record to the site, then its welcome; if the site does not take it
        within accept_timeout, the welcome goes all the same and the record is written
        when the site can (the phone gets nothing meanwhile anyway: no push is kept)."""
        try:
            await asyncio.wait_for(self.devices.record(work.token), self.accept_timeout)
        except (*NATS_ERRORS, nats.errors.TimeoutError) as exc:
            self.metrics.cluster_errors.labels("device").inc()
            faults.bounded(log, "device", "record of %s not written before its welcome: %s",
                           short(work.token), exc)
            self.devices.changed(work.token)
        except Exception as exc:  # a bug (or the local store): this device only
            faults.record(self.metrics, "cluster_device", exc, short(work.token))
        with faults.contained(self.metrics, "cluster_device", short(work.token)):
            self.delivery.recorded(work.token, work.link)
            self.pump.run()

    def _future(self, ticket: int) -> asyncio.Future[Kept]:
        future: asyncio.Future[Kept] = self._loop.create_future()
        self._results[ticket] = future
        self._loop.call_later(CLAIM_WITHIN, self._results.pop, ticket, None)
        return future

    async def _look_up(self, work: LookUpDevice, future: asyncio.Future[Kept]) -> None:
        """The site's registry, asked about a token this gateway does not know (yet); if it
        knows it, the push is submitted again, and its answer is this ticket's."""
        try:
            try:
                known = await asyncio.wait_for(self.devices.look_up(work.token),
                                               self.accept_timeout)
            finally:
                self._free_slot()  # a push submitted again takes a slot of its own
        except NATS_ERRORS as exc:
            self.metrics.cluster_not_kept.labels("lookup").inc()
            result = Kept(None, f"the site's registry did not answer ({type(exc).__name__}); "
                                "send it again")
        else:
            result = await self._submit_again(work) if known else Kept(
                None, "no device has this token", reason="BadDeviceToken")
        if not future.done():
            future.set_result(result)

    async def _submit_again(self, work: LookUpDevice) -> Kept:
        try:
            accepted = self.delivery.submit(work.token, work.request, work.at, group=True)
        except Rejected as exc:
            return Kept(None, str(exc), reason=exc.reason, timestamp=exc.timestamp)
        finally:
            self.pump.run()
        if accepted.ticket is None:  # expired on arrival: answered 200 as on one box
            return Kept(None)
        return await self.claim(accepted.ticket)

    def _keep(self, work: KeepPush) -> None:
        future = self._future(work.ticket)
        if self._take_slot(future):
            self._spawn(self._publish(work, future))

    def _take_slot(self, future: asyncio.Future[Kept]) -> bool:
        """One of cluster.max_keeps: a push waiting for the site's quorum, or a token
        being looked up in the site's registry (both are requests a flood could pile up);
        none left: answered busy at once."""
        if self._keeping >= self.max_keeps:
            self.metrics.cluster_not_kept.labels("busy").inc()
            future.set_result(Kept(None, f"the site has {self._keeping} pushes waiting for "
                                         "its quorum (cluster.max_keeps); send it again "
                                         "later"))
            return False
        self._keeping += 1
        self.metrics.cluster_keeps.set(self._keeping)
        return True

    def _free_slot(self) -> None:
        self._keeping -= 1
        self.metrics.cluster_keeps.set(self._keeping)

    async def _publish(self, work: KeepPush, future: asyncio.Future[Kept]) -> None:
        try:
            stored = await asyncio.wait_for(self.pushes.accept(work.push, time.time()),
                                            self.accept_timeout)
            result = Kept(stored.seq, None, stored.duplicate)
        except (TimeoutError, nats.errors.TimeoutError):
            self.metrics.cluster_not_kept.labels("timeout").inc()
            result = Kept(None, f"the site's quorum did not keep the push within "
                                f"{self.accept_timeout:g} s ({NO_QUORUM}); send it again")
        except QueueContended as exc:
            self.metrics.cluster_not_kept.labels("contended").inc()
            result = Kept(None, f"{exc}; send it again")
        except (nats.js.errors.NoStreamResponseError, nats.errors.NoRespondersError):
            self.metrics.cluster_not_kept.labels("no_quorum").inc()
            result = Kept(None, f"the site's stream has no quorum now ({NO_QUORUM}); send "
                                "it again")
        except NATS_ERRORS as exc:
            self.metrics.cluster_not_kept.labels("error").inc()
            result = Kept(None, f"the site did not keep the push ({type(exc).__name__}: "
                                f"{str(exc)[:120]}); send it again")
        except Exception as exc:  # a bug: this push only
            faults.record(self.metrics, "cluster_keep", exc, short(work.push.token))
            result = Kept(None, "the site did not keep the push (an internal error); "
                                "send it again")
        finally:
            self._free_slot()
        if not future.done():
            future.set_result(result)
        if result.seq is not None:
            self._count_displaced(work, stored)

    def _count_displaced(self, work: KeepPush, stored: Stored) -> None:
        """What the site dropped for this push, counted as one box counts it, by the
        gateway that kept it (once for the site)."""
        if not work.counted:
            return
        if stored.collapsed:
            self.metrics.dropped.labels("collapsed").inc(stored.collapsed)
        if stored.evicted:
            self.metrics.dropped.labels("queue_full").inc(stored.evicted)
            faults.bounded(log, "queue_full", "device %s queue full (%d): dropped the %d "
                           "oldest pushes", short(work.push.token), self.pushes.queue_limit,
                           stored.evicted)

    # --- the stream, handed out -----------------------------------------------------

    async def _restart_consumer(self) -> None:
        self.metrics.cluster_errors.labels("consumer").inc()
        log.warning("the site's pushes stopped coming (the consumer after %d); starting it "
                    "again from there", self._seen)
        try:
            await self._subscribe()
            self.resubscribed += 1
        except NATS_ERRORS as exc:  # the next look tries again
            faults.bounded(log, "consumer", "the consumer was not made again: %s", exc)

    async def _on_msg(self, msg: Msg) -> None:
        self._heard = time.monotonic()
        self._seen = max(self._seen, msg.metadata.sequence.stream)
        token = token_of(msg.subject)
        if not self.delivery.is_connected(token):
            return  # another gateway's device (or none): nothing to parse
        with faults.contained(self.metrics, "cluster_relay", short(token)):
            push = site_push(token, msg.metadata.sequence.stream, msg.headers, msg.data)
            self.metrics.cluster_relayed.inc()
            self.delivery.site_push(push, time.time())
            self.pump.run()

    async def _load(self, work: LoadBacklog) -> None:
        """Read the device's backlog (in parts) while its connection still wants it."""
        async with self._loads:
            after = work.after
            while self.delivery.wants_backlog(work.token, work.link):
                try:
                    part = await self.pushes.pending_after(work.token, after, time.time())
                except NATS_ERRORS as exc:
                    self.metrics.cluster_errors.labels("backlog").inc()
                    faults.bounded(log, "backlog", "backlog of %s not read: %s",
                                   short(work.token), exc)
                    await asyncio.sleep(RETRY_AFTER)
                    continue
                complete = len(part) < self.pushes.queue_limit * 4
                with faults.contained(self.metrics, "cluster_backlog", short(work.token)):
                    self.delivery.backlog(work.token, work.link, part, time.time(),
                                          complete=complete)
                    self.pump.run()
                if complete:
                    return
                after = part[-1].seq

    async def _purge(self) -> None:
        while True:
            token = await self._ack_queue.get()
            seq = self._acks.get(token, 0)
            try:
                await self.pushes.ack_through(token, seq)
            except NATS_ERRORS as exc:
                self.metrics.cluster_errors.labels("ack").inc()
                faults.bounded(log, "ack", "ack of %s not written: %s", short(token), exc)
                await asyncio.sleep(RETRY_AFTER)
                self._ack_queue.put_nowait(token)  # still wanted: tried again
                continue
            except Exception as exc:  # a bug: this device only
                faults.record(self.metrics, "cluster_ack", exc, short(token))
            if self._acks.get(token) == seq:
                del self._acks[token]
            else:
                self._ack_queue.put_nowait(token)  # a newer ack came meanwhile
