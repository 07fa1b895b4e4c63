"""Joining a site: the NATS connection, and what every gateway of the site shares.

The site's token secret lives in a replicated KV bucket, written once by the first gateway
to join (an atomic create: two gateways joining at once cannot both win) and read by every
other: the same install and topic get the same device token on every gateway of the site,
so a phone keeps its token when it moves. NATS is reached only when `cluster.enabled`; a
one-box install never imports the client.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from gateway import faults
from gateway.cluster import SiteUnavailable
from gateway.config import ClusterConfig

log = logging.getLogger("lpgw.cluster")

T = TypeVar("T")
SECRET_KEY = "token_secret"
PIN_KEY = "pin"  # sha256/<base64> of the site's key pair: every gateway must have it
RETRY_EVERY = 0.25  # seconds between tries while the JetStream meta leader is elected
# A server cut off silently (a link down, a partition: no RST) is noticed only by missed
# pings: nats-py's default (2 min x 2) would leave a gateway publishing into a dead
# connection, 503 for every push, for minutes. Here: gone after ~6-9 s, then the client
# moves to another server of the site.
PING_EVERY = 3.0
PINGS_MISSED = 2


def site_bucket(site: str) -> str:
    return f"lpgw_{site}_site"


@dataclass
class Site:
    """A gateway's membership of its site."""

    name: str
    nc: Client
    js: JetStreamContext
    token_secret: bytes
    created_secret: bool  # this gateway was the first of the site: its secret is the site's

    async def close(self) -> None:
        if not self.nc.is_closed:
            await self.nc.drain()

    def status(self) -> dict[str, Any]:
        return {"site": self.name, "connected": self.nc.is_connected,
                "server": self.nc.connected_url.netloc if self.nc.connected_url else None,
                "servers_known": len(self.nc.servers)}


def _tls(cfg: ClusterConfig) -> ssl.SSLContext | None:
    if not cfg.ca_file and not any(u.startswith("tls://") for u in cfg.servers):
        return None
    ctx = ssl.create_default_context(cafile=cfg.ca_file or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


async def connect(cfg: ClusterConfig) -> Client:
    """Connected to one of the site's servers (then it moves among them by itself);
    SiteUnavailable saying why not, with the last error a server gave (a certificate the
    site's CA does not vouch for, a refused password)."""
    errors: list[str] = []

    async def said(exc: Exception) -> None:
        # nats-py's own default logs each failed attempt at ERROR with its traceback:
        # every half second while a node is away. Once a minute, and the last kept.
        text = f"{type(exc).__name__}: {exc}"[:240]
        errors[:] = [text]
        faults.bounded(log, "nats", "the site's NATS: %s", text)

    options: dict[str, Any] = {
        "servers": list(cfg.servers), "connect_timeout": cfg.connect_timeout,
        "allow_reconnect": True, "max_reconnect_attempts": -1, "reconnect_time_wait": 0.5,
        "ping_interval": PING_EVERY, "max_outstanding_pings": PINGS_MISSED,
        "name": f"lpgw {cfg.site}", "error_cb": said}
    if cfg.credentials_file:
        options["user_credentials"] = cfg.credentials_file
    if cfg.user:
        try:
            password = Path(cfg.password_file).read_text().strip()
        except OSError as exc:
            raise SiteUnavailable(f"cannot read cluster.password_file: {exc}") from None
        options["user"], options["password"] = cfg.user, password
    if (ctx := _tls(cfg)) is not None:
        options["tls"] = ctx
    try:
        return await asyncio.wait_for(nats.connect(**options), cfg.connect_timeout * 2)
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        why = str(exc) or type(exc).__name__
        if errors and errors[-1] not in why:
            why += f" (the last server said {errors[-1]})"
        raise SiteUnavailable(f"cannot reach the site's NATS ({', '.join(cfg.servers)}): "
                              f"{why}") from None


async def until_ready(attempt: Callable[[], Awaitable[T]], deadline: float, what: str) -> T:
    """`attempt()`, tried again every RETRY_EVERY while JetStream cannot answer yet (a meta
    leader being elected; a bucket or stream just made, with no leader of its own), until
    `deadline` (monotonic): then SiteUnavailable naming `what`."""
    while True:
        try:
            return await attempt()
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            if time.monotonic() > deadline:
                raise SiteUnavailable(f"{what} does not answer: {exc}") from None
            await asyncio.sleep(RETRY_EVERY)


async def open_bucket(js: JetStreamContext, name: str, replicas: int, deadline: float,
                      ttl: float | None = None) -> KeyValue:
    """The KV bucket, made if missing (`ttl`: entries older are dropped)."""
    async def attempt() -> KeyValue:
        try:
            return await js.key_value(name)
        except BucketNotFoundError:
            return await js.create_key_value(bucket=name, replicas=replicas, history=1,
                                             ttl=ttl)
    return await until_ready(attempt, deadline, "the site's JetStream")


async def _take(kv: KeyValue, key: str, own: bytes, deadline: float) -> tuple[bool, bytes]:
    """(created, the site's value of `key`): ours if the key is new, else the one there."""
    async def attempt() -> tuple[bool, bytes]:
        try:
            await kv.create(key, own)
            return True, own
        except KeyWrongLastSequenceError:
            entry = await kv.get(key)  # another gateway was first
            return False, entry.value or b""
    return await until_ready(attempt, deadline, "the site's JetStream")


async def site_bucket_of(cfg: ClusterConfig
                       ) -> tuple[Client, JetStreamContext, KeyValue, float]:
    """Connected, with the site's bucket open; the deadline the rest of a start keeps."""
    nc = await connect(cfg)
    try:
        js = nc.jetstream(timeout=cfg.connect_timeout)
        deadline = time.monotonic() + cfg.connect_timeout * 2
        kv = await open_bucket(js, site_bucket(cfg.site), cfg.replicas, deadline)
    except BaseException:
        await nc.close()
        raise
    return nc, js, kv, deadline


async def import_identity(cfg: ClusterConfig, secret: bytes, pin: str) -> str:
    """Make a single box's token secret and pin the site's, so no phone's token or pin
    changes when its box joins a site: "imported", or "already" when the site has them.
    Raises SiteUnavailable when the site has other ones (importing would change every
    token, or every phone would refuse the site's gateways)."""
    nc, _, kv, deadline = await site_bucket_of(cfg)
    try:
        # the secret first: a site that has one has its pin too (join writes the pin first)
        new_secret, site_secret = await _take(kv, SECRET_KEY, secret.hex().encode(), deadline)
        if site_secret != secret.hex().encode():
            raise SiteUnavailable(f"site {cfg.site} already has another token secret: "
                                  "importing this box would change every device token; "
                                  "nothing imported")
        new_pin, site_pin = await _take(kv, PIN_KEY, pin.encode(), deadline)
        if site_pin != pin.encode():
            raise SiteUnavailable(f"site {cfg.site} already has another pin "
                                  f"({site_pin.decode(errors='replace')[:60]}): this box's "
                                  "phones would refuse its gateways")
    finally:
        await nc.close()
    return "imported" if new_pin or new_secret else "already"


async def join(cfg: ClusterConfig, own_secret: bytes, own_pin: str) -> Site:
    """Connect, and take the site's token secret (offering `own_secret` if the site has
    none yet). The site's pin is the first gateway's: a gateway with another key pair is
    refused, since every phone of the site checks that one pin (docs/protocol.md §3).
    Raises SiteUnavailable."""
    nc, js, kv, deadline = await site_bucket_of(cfg)
    try:
        _, pin = await _take(kv, PIN_KEY, own_pin.encode(), deadline)
        if pin.decode(errors="replace") != own_pin:
            raise SiteUnavailable(
                f"this gateway's key pair (pin {own_pin}) is not site {cfg.site}'s (pin "
                f"{pin.decode(errors='replace')[:60]}): phones of the site would refuse it; "
                "install the site's key from the vault (docs/cluster.md)")
        created, value = await _take(kv, SECRET_KEY, own_secret.hex().encode(), deadline)
        try:
            secret = bytes.fromhex(value.decode("ascii", "replace"))
        except ValueError:
            secret = b""
        if len(secret) != 32:
            raise SiteUnavailable(f"the site's token secret in {site_bucket(cfg.site)} is "
                                  "damaged: restore it from the backup (docs/cluster.md)")
    except BaseException:
        await nc.close()
        raise
    if created:
        log.info("site %s: this gateway is its first; its token secret is the site's",
                 cfg.site)
    elif secret != own_secret:
        log.info("site %s: using the site's token secret (devices keep their tokens on "
                 "every gateway of the site)", cfg.site)
    return Site(cfg.site, nc, js, secret, created)
