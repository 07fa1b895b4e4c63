"""The site's accepted pushes: one replicated JetStream stream, subjects per device.

A push is accepted when JetStream acknowledges it, and JetStream acknowledges only after a
quorum of the site's nodes has it (R3: two of three). APNs' semantics map onto the stream:

- the device's `seq` is the stream sequence: it increases per device, with gaps (the
  protocol allows them), and means the same on every gateway of the site;
- `apns-id` is `Nats-Msg-Id`: a push sent again within DUPLICATE_WINDOW is kept once;
- a device's kept pushes are under `push.<token>.k.>`: `.k.p`, and a subject of its own
  per collapse id, `.k.c.<digest>`; a push with expiration 0 goes to `.n` (never read as
  backlog, outside the queue as on one box);
- the per-device queue bound: the stream refuses a push to a full subject
  (`max_msgs_per_subject`, discard new per subject), the gateway then purges the device's
  oldest kept pushes (over all its subjects) and publishes again, counting what went; a
  new collapse id's subject makes the gateway look at the device's total too;
- a collapse id's first push is published expecting its subject empty; if it is not, it
  is published again with `Nats-Rollup: sub` (the newest replaces the older one), counted
  as collapsed;
- an expiration is the message's own TTL (`Nats-TTL`), and nothing past its expiration is
  handed out even before the server drops it;
- an ack is a purge of the device's subjects up to that `seq`, recorded once for the site.

Reads for a device come from the stream leader (a replica may lag behind an ack or a
push). Per-device consumers are not used: each R3 consumer is a Raft group of its own
(docs/cluster.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass

from nats.aio.client import Client
from nats.js import JetStreamContext, api
from nats.js.errors import APIError, NotFoundError

from gateway.cluster.site import until_ready
from gateway.cluster.writes import wrong_last_sequence
from gateway.records import StoredPush

DUPLICATE_WINDOW = 120.0  # seconds: an apns-id sent again within it is kept once
# a push with expiration 0 goes through the stream too (to the gateway holding its device
# now) but is never handed out later: the stream drops it after this many seconds
NOW_OR_NEVER_TTL = 5.0
HEADER = "lpgw-push"  # the push's fields (not the payload) as JSON
# JetStream's error code for a publish refused because the device's subject holds
# max_msgs_per_subject already (discard new per subject)
SUBJECT_FULL = 10077
ROOM_ATTEMPTS = 4
PURGE_TIMEOUT = 2.0


class QueueContended(Exception):
    """Several gateways filled one device's queue at once, past ROOM_ATTEMPTS."""


@dataclass(frozen=True, slots=True)
class Stored:
    """A push the site kept: its seq, whether it was a duplicate (kept before), and how
    many older pushes of its device went for it (collapsed, evicted from a full queue)."""

    seq: int
    duplicate: bool
    collapsed: int = 0
    evicted: int = 0


def stream_name(site: str) -> str:
    return f"LPGW_{site.upper().replace('-', '_')}_PUSH"


class SitePushes:
    def __init__(self, nc: Client, js: JetStreamContext, site: str, replicas: int,
                 queue_limit: int) -> None:
        self.nc = nc  # for the purge request, whose answer (how many went) nats-py drops
        self.js = js
        self.site = site
        self.stream = stream_name(site)
        self.replicas = replicas
        self.queue_limit = queue_limit

    def device_subjects(self, token: str) -> str:
        """All of a device's pushes (what an ack purges)."""
        return f"lpgw.{self.site}.push.{token}.>"

    def kept_subjects(self, token: str) -> str:
        """The device's kept pushes (its queue, bounded; its backlog)."""
        return f"lpgw.{self.site}.push.{token}.k.>"

    def _subject(self, push: StoredPush) -> str:
        if push.expiration == 0:  # now or never: outside the queue, as on one box
            return f"lpgw.{self.site}.push.{push.token}.n"
        if push.collapse_id is None:
            return f"lpgw.{self.site}.push.{push.token}.k.p"
        digest = hashlib.sha256(push.collapse_id.encode()).hexdigest()[:32]
        return f"lpgw.{self.site}.push.{push.token}.k.c.{digest}"

    async def open(self, timeout: float) -> None:
        """Make the stream if the site has none yet (retried while JetStream elects)."""
        config = api.StreamConfig(
            name=self.stream, subjects=[f"lpgw.{self.site}.push.>"],
            num_replicas=self.replicas, storage=api.StorageType.FILE,
            max_msgs_per_subject=self.queue_limit, discard=api.DiscardPolicy.NEW,
            discard_new_per_subject=True, duplicate_window=DUPLICATE_WINDOW,
            allow_rollup_hdrs=True, allow_msg_ttl=True)
        async def attempt() -> None:
            try:
                info = await self.js.stream_info(self.stream)
            except NotFoundError:
                await self.js.add_stream(config)
                return
            was = info.config
            if (was.discard, was.discard_new_per_subject) != (config.discard, True):
                # a site made by an older lpgw (which dropped the oldest silently); the
                # bound itself is the first gateway's delivery.queue_limit (one per site)
                await self.js.update_stream(dataclasses.replace(
                    config, max_msgs_per_subject=was.max_msgs_per_subject))
        await until_ready(attempt, time.monotonic() + timeout, "the site's push stream")

    async def accept(self, push: StoredPush, now: float) -> Stored:
        """Keep a push for the site. Returns only once a quorum has it; raises nats errors
        otherwise (the caller answers 503: nothing acknowledged is ever lost, nothing
        unkept is 200). What it displaced is counted in the result (see `_make_room`)."""
        fields = {"id": push.push_id, "type": push.push_type, "priority": push.priority,
                  "expiration": push.expiration, "collapse_id": push.collapse_id,
                  "accepted_at": round(push.accepted_at, 6)}
        headers = {"Nats-Msg-Id": push.push_id,
                   HEADER: json.dumps(fields, separators=(",", ":"))}
        ttl = NOW_OR_NEVER_TTL
        if push.expiration > 0:
            ttl = max(1.0, float(int(push.expiration - now) + 1))
        subject = self._subject(push)
        kept = push.expiration != 0
        collapsed = evicted = 0
        if kept and push.collapse_id is not None:
            # the first of its collapse id (none kept): a subject of its own, which the
            # device's bound must then take in; else it replaces the one kept
            headers["Nats-Expected-Last-Subject-Sequence"] = "0"
        for _ in range(ROOM_ATTEMPTS):
            try:
                ack = await self.js.publish(subject, push.payload_json.encode(),
                                            stream=self.stream, headers=headers, msg_ttl=ttl)
            except APIError as exc:
                if wrong_last_sequence(exc):
                    del headers["Nats-Expected-Last-Subject-Sequence"]
                    headers["Nats-Rollup"] = "sub"
                    collapsed += 1
                elif exc.err_code == SUBJECT_FULL and kept:
                    evicted += await self._make_room(self.kept_subjects(push.token),
                                                     self.queue_limit - 1)
                elif exc.err_code == SUBJECT_FULL:  # now-or-never ones, of seconds
                    await self._make_room(subject, self.queue_limit - 1)
                else:
                    raise
                continue
            if kept and push.collapse_id is not None and not collapsed and not ack.duplicate:
                evicted += await self._make_room(self.kept_subjects(push.token),
                                                 self.queue_limit, look=True)
            return Stored(ack.seq, bool(ack.duplicate), collapsed, evicted)
        raise QueueContended(f"the device's queue stayed full through {ROOM_ATTEMPTS} "
                             "attempts (other gateways filling it at once)")

    async def _make_room(self, subjects: str, keep: int, look: bool = False) -> int:
        """Keep only the newest `keep` pushes of `subjects` (a device's queue: the bound as
        on one box, the oldest go first); how many went. The stream itself bounds only
        each subject (`max_msgs_per_subject`, refusing the next: counted here); a new
        collapse id adds a subject, so then the device's total is looked at (on the
        leader, not replicated) and purged only when over."""
        if look:
            info = await self.js.stream_info(self.stream, subjects_filter=subjects)
            if sum((info.state.subjects or {}).values()) <= keep:
                return 0
        reply = await self.nc.request(
            f"$JS.API.STREAM.PURGE.{self.stream}",
            json.dumps({"filter": subjects, "keep": keep}).encode(), timeout=PURGE_TIMEOUT)
        answer = json.loads(reply.data)
        if "error" in answer:
            raise APIError.from_error(answer["error"])
        return int(answer.get("purged", 0))

    async def pending_after(self, token: str, after: int, now: float,
                            limit: int | None = None) -> list[StoredPush]:
        """The device's kept pushes after `after`, in order, read from the stream leader;
        none past its expiration."""
        out: list[StoredPush] = []
        seq = after + 1
        most = limit or self.queue_limit * 4
        while len(out) < most:
            try:
                msg = await self.js.get_msg(self.stream, seq=seq,
                                            subject=self.kept_subjects(token), next=True)
            except NotFoundError:
                break
            push = site_push(token, msg.seq or 0, msg.headers, msg.data)
            seq = push.seq + 1
            if push.expiration == 0 or push.expiration >= now:
                out.append(push)
        return out

    async def ack_through(self, token: str, seq: int) -> None:
        """The device has everything up to `seq`: forget it for the whole site."""
        await self.js.purge_stream(self.stream, subject=self.device_subjects(token),
                                   seq=seq + 1)


def token_of(subject: str) -> str:
    """The device token in a push subject (lpgw.<site>.push.<token>.<...>); "" if none."""
    parts = subject.split(".", 4)
    return parts[3] if len(parts) > 4 and parts[2] == "push" else ""


def site_push(token: str, seq: int, headers: dict[str, str] | None,
              data: bytes | None) -> StoredPush:
    """A stream message as a push. Only the site's gateways publish on its subjects (its
    NATS credentials); a damaged message raises ValueError (or TypeError), and the caller
    counts it and goes on."""
    fields = json.loads((headers or {}).get(HEADER, "{}"))
    return StoredPush(token=token, seq=seq, push_id=str(fields.get("id", "")),
                      push_type=str(fields.get("type", "alert")),
                      priority=int(fields.get("priority", 10)),
                      expiration=int(fields.get("expiration", 0)),
                      collapse_id=fields.get("collapse_id"),
                      payload_json=(data or b"").decode(),
                      accepted_at=float(fields.get("accepted_at", 0.0)))
