"""The site's accepted pushes: one replicated JetStream stream, a subject per device.

A push is accepted when JetStream acknowledges it, and JetStream acknowledges only after a
quorum of the site's nodes has it (R3: two of three). APNs' semantics map onto the stream:

- the device's `seq` is the stream sequence: it increases per device, with gaps (the
  protocol allows them), and means the same on every gateway of the site;
- `apns-id` is `Nats-Msg-Id`: a push sent again within DUPLICATE_WINDOW is kept once;
- the per-device queue bound is `max_msgs_per_subject` on the device's subject (the oldest
  go first, as on one box);
- a collapse id is a subject of its own, published with `Nats-Rollup: sub`: the newest
  push of that id replaces the older one;
- an expiration is the message's own TTL (`Nats-TTL`), and nothing past its expiration is
  handed out even before the server drops it;
- an ack is a purge of the device's subjects up to that `seq`, recorded once for the site.

Reads for a device come from the stream leader (a replica may lag behind an ack or a
push). Per-device consumers are not used: each R3 consumer is a Raft group of its own
(docs/cluster.md).
"""

from __future__ import annotations

import hashlib
import json
import time

from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError

from gateway.cluster.site import until_ready
from gateway.records import StoredPush

DUPLICATE_WINDOW = 120.0  # seconds: an apns-id sent again within it is kept once
# a push with expiration 0 goes through the stream too (to the gateway holding its device
# now) but is never handed out later: the stream drops it after this many seconds
NOW_OR_NEVER_TTL = 5.0
HEADER = "lpgw-push"  # the push's fields (not the payload) as JSON


def stream_name(site: str) -> str:
    return f"LPGW_{site.upper().replace('-', '_')}_PUSH"


class SitePushes:
    def __init__(self, js: JetStreamContext, site: str, replicas: int,
                 queue_limit: int) -> None:
        self.js = js
        self.site = site
        self.stream = stream_name(site)
        self.replicas = replicas
        self.queue_limit = queue_limit

    def device_subjects(self, token: str) -> str:
        return f"lpgw.{self.site}.push.{token}.>"

    def _subject(self, token: str, collapse_id: str | None) -> str:
        if collapse_id is None:
            return f"lpgw.{self.site}.push.{token}.p"
        digest = hashlib.sha256(collapse_id.encode()).hexdigest()[:32]
        return f"lpgw.{self.site}.push.{token}.c.{digest}"

    async def open(self, timeout: float) -> None:
        """Make the stream if the site has none yet (retried while JetStream elects)."""
        config = api.StreamConfig(
            name=self.stream, subjects=[f"lpgw.{self.site}.push.>"],
            num_replicas=self.replicas, storage=api.StorageType.FILE,
            max_msgs_per_subject=self.queue_limit, discard=api.DiscardPolicy.OLD,
            duplicate_window=DUPLICATE_WINDOW, allow_rollup_hdrs=True, allow_msg_ttl=True)
        async def attempt() -> None:
            try:
                await self.js.stream_info(self.stream)
            except NotFoundError:
                await self.js.add_stream(config)
        await until_ready(attempt, time.monotonic() + timeout, "the site's push stream")

    async def accept(self, token: str, push_id: str, push_type: str, priority: int,
                     expiration: int, collapse_id: str | None, payload_json: str,
                     now: float) -> tuple[int, bool]:
        """Keep a push for the site; (its seq, whether it was a duplicate of one already
        kept). Returns only once a quorum has it; raises nats errors otherwise (the
        caller answers 503: nothing acknowledged is ever lost, nothing unkept is 200)."""
        fields = {"id": push_id, "type": push_type, "priority": priority,
                  "expiration": expiration, "collapse_id": collapse_id,
                  "accepted_at": round(now, 6)}
        headers = {"Nats-Msg-Id": push_id, HEADER: json.dumps(fields, separators=(",", ":"))}
        if collapse_id is not None:
            headers["Nats-Rollup"] = "sub"
        ttl = NOW_OR_NEVER_TTL
        if expiration > 0:
            ttl = max(1.0, float(int(expiration - now) + 1))
        ack = await self.js.publish(self._subject(token, collapse_id), payload_json.encode(),
                                    stream=self.stream, headers=headers, msg_ttl=ttl)
        return ack.seq, bool(ack.duplicate)

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
                                            subject=self.device_subjects(token), next=True)
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
