"""The local control socket: `lpgw send` and `lpgw status` talk to the running gateway here.

Same framing as devices (length + JSON object). The socket is owner-only (0600): whoever
can reach it can push to any device.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway import faults
from gateway.core.delivery import Delivery, Rejected
from gateway.core.metrics import Metrics
from gateway.core.model import PushRequest
from gateway.core.storage import Storage
from gateway.gauges import SelfTestResult, State
from gateway.protocol.frames import HEADER, FrameDecoder, FrameError, MessageError, decode_body
from gateway.protocol.frames import encode_frame as encode
from gateway.transport.pump import Keeper, Pump

log = logging.getLogger("lpgw.control")

MAX_REQUEST = 64 * 1024


def push_request(d: dict[str, Any]) -> PushRequest:
    """A PushRequest from the control socket's JSON; ValueError says what is wrong."""
    payload = d.get("payload")
    if not isinstance(payload, dict):
        raise ValueError("'payload' must be a JSON object")
    expiration = d.get("expiration")
    push_type = d.get("push_type") or "alert"
    priority = d.get("priority")  # None: the push type's default
    for key, value in (("expiration", expiration), ("priority", priority)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"'{key}' must be an integer")
    for key in ("push_type", "collapse_id", "push_id", "topic"):
        if d.get(key) is not None and not isinstance(d[key], str):
            raise ValueError(f"'{key}' must be a string")
    return PushRequest(push_type=push_type, payload=payload,
                       priority=priority, expiration=expiration,
                       collapse_id=d.get("collapse_id"), push_id=d.get("push_id"),
                       topic=d.get("topic"))


@dataclass(frozen=True)
class _Waiting:
    """A `send` handed to the site (KeepPush): its reply, once the site has kept it."""

    ticket: int
    reply: dict[str, Any]


class ControlServer:
    def __init__(self, path: Path, delivery: Delivery, storage: Storage, pump: Pump,
                 status: Callable[[], dict], metrics: Metrics | None = None,
                 keeper: Keeper | None = None, state: State | None = None) -> None:
        self.path = path
        self.keeper = keeper
        self.state = state  # where `lpgw selftest`'s report is kept (for /metrics)
        self.delivery = delivery
        self.storage = storage
        self.pump = pump
        self.status = status
        self.metrics = metrics if metrics is not None else delivery.metrics
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        finally:
            os.umask(old)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = FrameDecoder(MAX_REQUEST)
        try:
            while True:
                data = await asyncio.wait_for(reader.read(65536), timeout=30)
                if not data:
                    break
                for body in decoder.feed(data):
                    writer.write(encode(await self.answer(body)))
                await writer.drain()
        except FrameError as exc:
            writer.write(encode({"ok": False, "reason": exc.code, "message": str(exc)}))
        except (TimeoutError, ConnectionError):
            pass
        except asyncio.CancelledError:  # the gateway is stopping: nothing is left to say
            return
        except Exception as exc:  # this client's failure: the socket serves the next one
            faults.record(self.metrics, "control_connection", exc)
        finally:
            writer.close()

    async def answer(self, body: bytes) -> dict[str, Any]:
        """One request's answer, once it can be given (a push kept by the site)."""
        answer = self.handle(body)
        if isinstance(answer, _Waiting):
            return await self._kept(answer)
        return answer

    async def _kept(self, waiting: _Waiting) -> dict[str, Any]:
        assert self.keeper is not None
        kept = await self.keeper.claim(waiting.ticket)
        if kept.failure is not None:
            reply: dict[str, Any] = {"ok": False, "reason": kept.reason,
                                     "message": kept.failure}
            if kept.timestamp is not None:
                reply["timestamp"] = int(kept.timestamp * 1000)
            return reply
        return {**waiting.reply, "seq": kept.seq, "duplicate": kept.duplicate}

    def handle(self, body: bytes) -> dict[str, Any] | _Waiting:
        """One request's answer; never raises (a failure is answered and counted)."""
        try:
            return self._handle(body)
        except Exception as exc:
            faults.record(self.metrics, "control_request", exc)
            return {"ok": False, "reason": "InternalServerError",
                    "message": f"the gateway failed on this request ({type(exc).__name__}); "
                               "its log says more"}

    def _handle(self, body: bytes) -> dict[str, Any] | _Waiting:
        try:
            request = decode_body(body)
        except MessageError as exc:
            return {"ok": False, "reason": exc.code, "message": str(exc)}
        op = request.get("op")
        if op == "status":
            return {"ok": True, "status": self.status()}
        if op == "bind":
            return self._bind(request)
        if op == "selftest_report":
            return self._selftest_report(request)
        if op != "send":
            return {"ok": False, "reason": "BadRequest", "message": f"unknown op {op!r}"}
        try:
            req = push_request(request)
        except ValueError as exc:
            return {"ok": False, "reason": "BadRequest", "message": str(exc)}
        token = request.get("token")
        if not isinstance(token, str):
            return {"ok": False, "reason": "BadDeviceToken", "message": "'token' is required"}
        try:
            result = self.delivery.submit(token, req, time.time())
        except Rejected as exc:
            self.pump.run()
            reply = {"ok": False, "reason": exc.reason, "message": str(exc)}
            if exc.timestamp is not None:
                reply["timestamp"] = int(exc.timestamp * 1000)
            return reply
        self.pump.run()  # to the device, when it is connected
        reply = {"ok": True, "push_id": result.push_id, "seq": result.seq, "sent": result.sent,
                 "stored": result.stored}
        if result.ticket is not None and self.keeper is not None:
            return _Waiting(result.ticket, reply)  # answered once the site has kept it
        return reply


    def _selftest_report(self, request: dict[str, Any]) -> dict[str, Any]:
        """`lpgw selftest` says how it went: kept for /metrics (the alert on a failing
        self-test) until the next one."""
        ok, failed = request.get("ok"), request.get("failed", [])
        if not isinstance(ok, bool) or not isinstance(failed, list) or len(failed) > 64 \
                or not all(isinstance(name, str) for name in failed):
            return {"ok": False, "reason": "BadRequest",
                    "message": "'ok' (true or false) and 'failed' (the names of the failed "
                               "checks, at most 64)"}
        if self.state is not None:
            self.state.last_selftest = SelfTestResult(time.time(), ok,
                                                      [name[:80] for name in failed])
        return {"ok": True}

    def _bind(self, request: dict[str, Any]) -> dict[str, Any]:
        """Bind a device to a user (or unbind with user null), as /v1 does, for local tools."""
        token, user = request.get("token"), request.get("user")
        if not isinstance(token, str) or not (user is None or isinstance(user, str)):
            return {"ok": False, "reason": "BadRequest", "message": "token and user"}
        if not self.storage.bind_user(token, user):
            return {"ok": False, "reason": "BadDeviceToken", "message": "no such device"}
        self.delivery.device_changed(token)
        self.pump.run()
        return {"ok": True}


async def request(path: Path, message: dict[str, Any], timeout: float = 10) -> dict[str, Any]:
    """One request to a running gateway's control socket."""
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), timeout)
    try:
        writer.write(encode(message))
        await writer.drain()
        header = await asyncio.wait_for(reader.readexactly(HEADER.size), timeout)
        (length,) = HEADER.unpack(header)
        body = await asyncio.wait_for(reader.readexactly(length), timeout)
        return decode_body(body)
    finally:
        writer.close()
