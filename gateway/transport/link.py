"""One device connection on the gateway: a GatewaySession wired to the core and a byte pipe.

QUIC and TLS both end here, so both transports behave the same by construction.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway import faults
from gateway.core.delivery import Delivery, Refused
from gateway.core.metrics import Metrics
from gateway.core.tokens import short
from gateway.protocol import VERSIONS
from gateway.protocol.messages import ByeReason, Push, Welcome
from gateway.protocol.session import (
    AckReceived,
    CallActionReceived,
    Closed,
    FrameRejected,
    GatewaySession,
    HelloReceived,
    PingDue,
    SessionSettings,
    UnregisterReceived,
)
from gateway.transport.pump import Pump
from gateway.transport.timers import TimerWheel

log = logging.getLogger("lpgw.link")

BAD_INPUT_REASONS = {ByeReason.PROTOCOL_ERROR, ByeReason.FLOOD, ByeReason.HELLO_TIMEOUT,
                     ByeReason.UNSUPPORTED_VERSION}


@dataclass(frozen=True)
class LinkContext:
    """What every link of one gateway shares."""

    delivery: Delivery
    metrics: Metrics
    settings: SessionSettings
    gateway_id: str
    timers: TimerWheel
    pump: Pump  # carries out what the core returns, after each input


def ignore(*args: object) -> None:
    """What a callback becomes once its owner has gone (breaks reference cycles)."""


class GatewayLink:
    """The core's DeviceLink handle, and the shell that carries out what the core returns
    for it (the pump calls welcome, send_push, close); the transport supplies write and
    close.

    Every way in (the transport's bytes, acks and loss, the core's pushes, the timer) is
    contained: an exception ends this one connection (`bye` unavailable, counted in
    lpgw_internal_errors_total) and never reaches the transport's loop or the caller that
    pushed, so other devices go on being served; the device's pushes stay stored.
    """

    def __init__(self, ctx: LinkContext, transport: str, peer: str,
                 write: Callable[[bytes], int | None], close: Callable[[str], None],
                 ping: Callable[[int], None] | None = None) -> None:
        """`write` returns how many bytes the transport now holds for this device unread
        (None: it cannot tell); past the settings' send_buffer_limit the device is closed.
        `ping`, when given, carries the heartbeat in the transport (QUIC PING frames):
        the transport reports acknowledgements to `ping_acknowledged`."""
        self.ctx = ctx
        self.transport = transport
        self.peer = peer  # "host:port"
        self.source = peer.rsplit(":", 1)[0].strip("[]")  # the address new installs count by
        self._write = write
        self._close_transport = close
        self._ping = ping
        self._loop = asyncio.get_running_loop()
        self.session = GatewaySession(ctx.settings, self._loop.time(),
                                      transport_pings=ping is not None)
        self.token: str | None = None
        self._timer_at: float | None = None
        self._ended = False
        self._arm()

    # from the transport

    def data_received(self, data: bytes) -> None:
        if self._ended:
            return
        try:
            self._handle(self.session.receive_data(data, self._loop.time()))
        except Exception as exc:
            self._fail("device_input", exc)

    def connection_lost(self, why: str) -> None:
        if self._ended:
            return
        self._ended = True
        self._cancel_timer()
        # the transport holds this link's methods and this link the transport's: let go,
        # so the pair is freed at once, not by a full garbage-collector pass (see
        # service.tune_garbage_collector: those are rare now)
        self._write = self._close_transport = ignore
        self._ping = None
        reason = self.session.closed.reason if self.session.closed else why
        if self.session.closed is None and (
                self.token is None or not self.ctx.delivery.is_test_device(self.token)):
            self.ctx.metrics.disconnects.labels(self.transport, "lost").inc()
        if self.token is not None:
            try:
                self.ctx.delivery.detach(self.token, self, time.time(), reason)
                self.ctx.pump.run()  # the site hears that this gateway let go of it
            except Exception as exc:  # the link is gone all the same
                faults.record(self.ctx.metrics, "device_detach", exc, self._who())

    def ping_acknowledged(self, nonce: int) -> None:
        if not self._ended:
            try:
                self.session.pinged_back(nonce)
            except Exception as exc:
                self._fail("device_input", exc)

    # what the core returned for this connection (through the pump)

    def welcome(self, token: str, user: str | None) -> None:
        self.token = token
        s = self.ctx.settings
        self.session.welcome(Welcome(version=VERSIONS[-1], token=token, heartbeat=s.heartbeat,
                                     gateway_id=self.ctx.gateway_id, user=user,
                                     max_frame=s.max_frame), self._loop.time())
        self._flush()
        self._arm()

    def send_push(self, push: Push) -> None:
        """Never raises into the core: a failure ends this connection and the push, stored
        and not acknowledged, goes again when the device is back."""
        if self._ended:
            return
        try:
            self.session.push(push)
            self._flush()
        except Exception as exc:
            self._fail("device_write", exc)

    def close(self, reason: str, code: str | None = None, message: str | None = None) -> None:
        if self._ended:
            return
        try:
            self._handle([self.session.close(reason, code, message)])
        except Exception as exc:
            self._fail("device_close", exc)

    # internals

    def _handle(self, events: list) -> None:
        wall = time.time()
        delivery, pump = self.ctx.delivery, self.ctx.pump
        for event in events:
            if isinstance(event, HelloReceived):
                try:
                    delivery.admit(self, event.hello, wall, source=self.source)
                except Refused as exc:
                    faults.bounded(log, f"hello:{exc.reason}", "refused a hello from %s: %s",
                                   self.peer, exc)
                    self._end(self.session.close(exc.reason, exc.code, str(exc)))
                    return
                pump.run()  # welcome, what waits for it, the older connection's bye
                if self._ended:  # writing the welcome failed: this connection is over
                    return
            elif isinstance(event, PingDue) and self._ping is not None:
                self._ping(event.nonce)
            elif isinstance(event, AckReceived) and self.token:
                delivery.ack(self.token, self, event.seq, wall)
                pump.run()  # a call's push acknowledged: its PBX hears 180
            elif isinstance(event, CallActionReceived) and self.token:
                delivery.call_action(self.token, event.action, wall)
                pump.run()
            elif isinstance(event, UnregisterReceived) and self.token:
                delivery.unregister(self.token, self, wall)
                pump.run()  # this connection's bye
                return
            elif isinstance(event, FrameRejected):
                self.ctx.metrics.protocol_errors.labels(event.code).inc()
                faults.bounded(log, f"frame:{event.code}", "refused a frame from %s (%s): %s",
                               self._who(), event.code, event.message)
            elif isinstance(event, Closed):
                self._end(event)
                return
        self._flush()
        self._arm()

    def _end(self, closed: Closed) -> None:
        m = self.ctx.metrics
        if self.token is None or not self.ctx.delivery.is_test_device(self.token):
            m.disconnects.labels(self.transport, closed.reason).inc()
        if closed.reason in BAD_INPUT_REASONS:
            m.protocol_errors.labels(closed.code or closed.reason).inc()
        if closed.reason == ByeReason.HEARTBEAT_TIMEOUT:
            m.heartbeat_timeouts.inc()
        if not closed.by_peer and (closed.reason in BAD_INPUT_REASONS or self.token is None):
            # a peer can cause these at will: bounded
            faults.bounded(log, f"close:{closed.reason}", "closing %s: %s (%s)", self._who(),
                           closed.reason, closed.message or "")
        elif not closed.by_peer:
            log.info("closing %s: %s (%s)", self._who(), closed.reason, closed.message or "")
        self._flush()
        self._close_transport(closed.reason)
        self.connection_lost(closed.reason)

    def _flush(self) -> None:
        data = self.session.data_to_send()
        if data:
            held = self._write(data)
            limit = self.ctx.settings.send_buffer_limit
            if held is not None and held > limit and self.session.closed is None:
                self.ctx.metrics.slow_readers.labels(self.transport).inc()
                self._end(self.session.close(
                    ByeReason.SLOW_READER, "slow_reader",
                    f"{held} bytes unread (limit {limit}); queued pushes wait for the next "
                    "connection"))

    def _fail(self, where: str, exc: Exception) -> None:
        """Contain a failure to this connection: count and log it, end it, free it."""
        faults.record(self.ctx.metrics, where, exc, self._who())
        if self._ended:
            return
        try:
            self._end(self.session.close(ByeReason.UNAVAILABLE, "internal_error",
                                         "the gateway failed on this connection; reconnect"))
        except Exception as again:  # ending it cleanly failed too: end it regardless
            faults.record(self.ctx.metrics, "device_close", again, self._who())
            close = self._close_transport
            self.connection_lost("internal error")
            try:
                close(ByeReason.UNAVAILABLE)
            except Exception as last:
                faults.record(self.ctx.metrics, "device_close", last, self._who())

    def _who(self) -> str:
        return f"device {short(self.token)}" if self.token else f"{self.transport} peer {self.peer}"

    def _arm(self) -> None:
        at = self.session.next_timer()
        if at != self._timer_at:
            self._timer_at = at
            self.ctx.timers.schedule(self, at, self._on_timer)

    def _cancel_timer(self) -> None:
        self._timer_at = None
        self.ctx.timers.cancel(self)

    def _on_timer(self) -> None:
        self._timer_at = None
        if not self._ended:
            try:
                self._handle(self.session.handle_timer(self._loop.time()))
            except Exception as exc:
                self._fail("device_timer", exc)
