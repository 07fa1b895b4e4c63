"""Moving a box into a site: its devices (with their users) and queued pushes.

`lpgw cluster import` runs this after `site.import_identity` (the token secret and pin),
with the box stopped: every device record goes into the site's registry (a record the
site already has is left as it is: it is newer), and every push still queued for a device
goes into the site's stream in its order, keeping its apns-id, expiration and collapse id.

The phones' `last_ack` counts the box's seqs, not the site's, so a phone's first hello on
a gateway of the site asks for everything (`after` 0): it gets every imported push it had
not acked, and drops any it already had by id (docs/protocol.md, the seen-id ring).

A box is imported once: a marker in the site's bucket (`imported_<gateway id>`) makes a
second run say "already" instead of queuing every push again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from nats.js.errors import KeyWrongLastSequenceError

from gateway.cluster.devices import devices_bucket, encode
from gateway.cluster.pushes import SitePushes
from gateway.cluster.site import open_bucket, site_bucket_of, until_ready
from gateway.config import ClusterConfig
from gateway.store import Store


@dataclass(frozen=True)
class Imported:
    devices: int  # records written to the site's registry
    devices_known: int  # records the site had already (left as they were)
    pushes: int  # queued pushes carried into the site's stream
    expired: int  # queued pushes past their expiration: left behind
    already: bool = False  # this box was imported before: nothing done


async def import_state(cfg: ClusterConfig, store: Store, gateway_id: str, queue_limit: int,
                       now: float | None = None) -> Imported:
    """Raises SiteUnavailable when the site cannot be reached or does not answer."""
    now = time.time() if now is None else now
    nc, js, site_kv, deadline = await site_bucket_of(cfg)
    try:
        marker = f"imported_{gateway_id}"

        async def mark() -> bool:
            try:
                await site_kv.create(marker, b"started")
                return True
            except KeyWrongLastSequenceError:
                return False
        if not await until_ready(mark, deadline, "the site's JetStream"):
            return Imported(0, 0, 0, 0, already=True)
        registry = await open_bucket(js, devices_bucket(cfg.site), cfg.replicas, deadline)
        pushes = SitePushes(nc, js, cfg.site, cfg.replicas, queue_limit)
        await pushes.open(cfg.connect_timeout * 2)
        written = known = carried = expired = 0
        for device in store.devices():
            try:
                await registry.create(device.token, encode(device))
                written += 1
            except KeyWrongLastSequenceError:
                known += 1
            for push in store.pending_after(device.token, device.acked_seq):
                if 0 < push.expiration < now:
                    expired += 1
                    continue
                await pushes.accept(push, now)
                carried += 1
        await site_kv.put(marker, b"done")
        return Imported(written, known, carried, expired)
    finally:
        await nc.close()
