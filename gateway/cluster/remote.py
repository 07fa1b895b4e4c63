"""The control socket's `send` and `status`, for the site's other gateways (and for
`lpgw selftest` on any of them): a push that crosses gateways on purpose.

Subject `lpgw.<site>.control.<gateway id>`, request and reply, the same JSON as the
control socket. Whoever holds the site's NATS credentials can already put pushes into
its stream: this adds no authority; `bind` (a change of who rings) is not offered.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from gateway import faults
from gateway.core.metrics import Metrics

log = logging.getLogger("lpgw.cluster")

OPS = ("send", "status")
MAX_REQUEST = 64 * 1024


def control_subject(site: str, gateway_id: str) -> str:
    return f"lpgw.{site}.control.{gateway_id}"


class RemoteControl:
    def __init__(self, nc: Client, site: str, gateway_id: str,
                 answer: Callable[[bytes], Awaitable[dict[str, Any]]],
                 metrics: Metrics) -> None:
        """`answer`: the control socket's own (transport.control.ControlServer.answer)."""
        self.nc = nc
        self.subject = control_subject(site, gateway_id)
        self.answer = answer
        self.metrics = metrics
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(self.subject, cb=self._on_request)

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()

    async def _on_request(self, msg: Msg) -> None:
        reply: dict[str, Any]
        with faults.contained(self.metrics, "cluster_control") as outcome:
            try:
                op = json.loads(msg.data).get("op") if len(msg.data) <= MAX_REQUEST else None
            except (ValueError, AttributeError):
                op = None
            if op not in OPS:
                reply = {"ok": False, "reason": "BadRequest",
                         "message": f"over the site, only {' and '.join(OPS)}"}
            else:
                reply = await self.answer(msg.data)
        if outcome.failed:
            reply = {"ok": False, "reason": "InternalServerError", "message": "see its log"}
        if msg.reply:
            with faults.contained(self.metrics, "cluster_control", "reply"):
                await msg.respond(json.dumps(reply).encode())
