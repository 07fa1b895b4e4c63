"""A failure while handling one device's input ends that one connection, never the others.

No well-formed or malformed input is known to raise in these paths any more (the SIP, API
and store faults that did are fixed where they were), so the failure is injected: one
method of the running gateway is made to raise for one device only. Everything else is
real: QUIC and TLS sockets on 127.0.0.1, the reference device, the control socket.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from gateway import faults, internals
from gateway.protocol.messages import ByeReason
from gateway.transport.timers import TimerWheel
from tests.conftest import eventually, new_install, send

TRANSPORTS = ["quic", "tls"]


def internal(gw, where: str) -> float:
    return gw.metrics.value("lpgw_internal_errors_total", where=where)


@pytest.fixture(autouse=True)
def _log_budget():
    faults.reset_log_limits()
    yield
    faults.reset_log_limits()


async def healthy(gw, device, token: str, n: int) -> None:
    """`device` still gets a push end to end, and acknowledges it."""
    reply = await send(gw, token, {"n": n})
    assert reply["ok"] and reply["sent"], reply
    push = await device.next("push")
    assert push["payload"] == {"n": n}
    await eventually(lambda: gw.store.count_pending(token) == 0)


def fail_for(gw, token: str, name: str):
    """Make delivery.<name> raise for one device's token only (the injected bug)."""
    original = getattr(gw.delivery, name)

    def failing(tok, *args, **kwargs):
        if tok == token:
            raise RuntimeError(f"injected failure in {name}")
        return original(tok, *args, **kwargs)

    setattr(gw.delivery, name, failing)
    return lambda: setattr(gw.delivery, name, original)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_failure_on_one_device_ends_only_that_connection(gateway, devices, transport):
    """An exception while the gateway handles one device's ack: that device gets `bye`
    unavailable and reconnects; a bystander on the same transport never notices, and a
    new device can still connect. Before: on QUIC the exception escaped the server's work
    loop and every QUIC datagram after it was ignored until a restart."""
    bystander = devices(gateway, transport)
    calm = await bystander.welcome()
    victim = devices(gateway, transport, install_id=new_install())
    token = await victim.welcome()
    undo = fail_for(gateway, token, "ack")

    reply = await send(gateway, token, {"n": "boom"})
    assert reply["ok"] and reply["stored"]
    assert (await victim.next("push"))["payload"] == {"n": "boom"}
    gone = await victim.next("disconnected")
    assert gone["reason"] == ByeReason.UNAVAILABLE and gone["code"] == "internal_error"
    assert internal(gateway, "device_input") == 1

    await healthy(gateway, bystander, calm, 1)
    newcomer = devices(gateway, transport)
    fresh = await newcomer.welcome()
    await healthy(gateway, newcomer, fresh, 2)

    undo()  # the bug is gone: the victim is back; its hello acknowledges what it had
    assert await victim.welcome() == token
    await eventually(lambda: gateway.store.count_pending(token) == 0)
    await healthy(gateway, victim, token, 3)
    assert [e for e in bystander.log if e["event"] == "disconnected"] == []


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_failure_writing_a_push_is_not_the_pushers(gateway, devices, transport):
    """A push that cannot be written to one device's connection: whoever pushed (here
    `lpgw send`) is told it is stored, the device is closed and gets the push when back."""
    device = devices(gateway, transport, install_id=new_install())
    token = await device.welcome()
    link = gateway.delivery._live[token].link

    def failing(push):
        raise RuntimeError("injected failure writing a push")

    link.session.push = failing
    reply = await send(gateway, token, {"n": "later"})
    assert reply["ok"] and reply["stored"], reply  # before: the control socket hung up
    gone = await device.next("disconnected")
    assert gone["reason"] == ByeReason.UNAVAILABLE
    assert internal(gateway, "device_write") == 1
    assert await device.welcome() == token  # a new connection, a new link
    assert (await device.next("push"))["payload"] == {"n": "later"}


async def test_a_quic_datagram_that_fails_costs_that_datagram(gateway, devices):
    """aioquic itself raising on one connection's datagram: the QUIC listener goes on."""
    bystander = devices(gateway, "quic")
    calm = await bystander.welcome()
    victim = devices(gateway, "quic", install_id=new_install(), reconnect=False)
    token = await victim.welcome()
    proto = gateway.delivery._live[token].link._write.__self__

    def failing(*args, **kwargs):
        raise RuntimeError("injected failure in aioquic")

    proto._quic.receive_datagram = failing
    with contextlib.suppress(Exception):
        await send(gateway, token, {"n": 1})  # the victim acks: its datagram now fails
    await eventually(lambda: internal(gateway, "quic_datagram") >= 1)
    await healthy(gateway, bystander, calm, 2)
    newcomer = devices(gateway, "quic")
    fresh = await newcomer.welcome()
    await healthy(gateway, newcomer, fresh, 3)


async def test_a_quic_timer_that_fails_ends_that_connection(gateway, devices):
    """A failure in aioquic's timer for one connection: the connection is ended and
    forgotten (before: the loop dropped the timer, and the connection was held for ever)."""
    bystander = devices(gateway, "quic")
    calm = await bystander.welcome()
    victim = devices(gateway, "quic", install_id=new_install(), reconnect=False)
    token = await victim.welcome()
    proto = gateway.delivery._live[token].link._write.__self__

    def failing(now):
        raise RuntimeError("injected failure in a QUIC timer")

    proto._quic.handle_timer = failing
    proto._timer_at = asyncio.get_running_loop().time()
    proto._handle_timer()
    assert internal(gateway, "quic_timer") == 1
    await eventually(lambda: not gateway.delivery.is_connected(token))
    await eventually(lambda: proto not in gateway._quic._protocols.values())
    await healthy(gateway, bystander, calm, 1)


async def test_the_control_socket_answers_a_failure_and_serves_the_next(gateway, devices):
    device = devices(gateway, "tls")
    token = await device.welcome()
    original = gateway.delivery.submit

    def failing(*args, **kwargs):
        raise RuntimeError("injected failure in submit")

    gateway.delivery.submit = failing
    reply = await send(gateway, token, {"n": 1})
    assert not reply["ok"] and reply["reason"] == "InternalServerError"
    assert "RuntimeError" in reply["message"]
    assert internal(gateway, "control_request") == 1
    gateway.delivery.submit = original
    await healthy(gateway, device, token, 2)


async def test_one_timer_owner_failing_leaves_the_others_and_counts(gateway):
    wheel = TimerWheel(asyncio.get_running_loop(), 0.01, metrics=gateway.metrics)
    fired: list[str] = []

    def bad() -> None:
        raise RuntimeError("injected failure in a timer")

    now = asyncio.get_running_loop().time()
    wheel.schedule("bad", now + 0.02, bad)
    wheel.schedule("good", now + 0.02, lambda: fired.append("good"))
    wheel.schedule("later", now + 0.05, lambda: fired.append("later"))
    await eventually(lambda: fired == ["good", "later"], timeout=2)
    assert internal(gateway, "timer") == 1
    wheel.close()


def test_stream_backlog_reads_aioquic_as_expected():
    """The one aioquic internal the slow-reader limit reads (internals.stream_backlog)."""
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    conn = QuicConnection(configuration=QuicConfiguration(is_client=True))
    sid = conn.get_next_available_stream_id()
    conn.send_stream_data(sid, b"x" * 1000)
    assert internals.stream_backlog(conn, sid) == 1000
    assert internals.stream_backlog(conn, sid + 4) is None
