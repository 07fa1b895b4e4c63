"""One direction for every path: the core and the SIP bridge return what happens, the shells
carry it out, and imports go one way (issue 16).

A call is walked from the INVITE to the phone's frame and back to 180 Ringing through the
real Delivery (SQLite file), Calls, SipBridge and the gateway's Pump; what would reach a
socket is recorded at the two shell ends (a device link, the SIP transport's carry_out).
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from gateway.core.assertions import AssertionPolicy
from gateway.core.calls import CallOutcome, Calls, CallSettings
from gateway.core.delivery import Delivery, DeliverySettings
from gateway.core.events import (
    CloseLink,
    DeviceLeft,
    PushDelivered,
    SendPush,
    WelcomeDevice,
)
from gateway.core.metrics import Metrics
from gateway.core.model import PushRequest
from gateway.core.storage import Storage
from gateway.protocol.messages import Hello
from gateway.sip.bridge import SIP_STATUS, CallPushed, Ringing, SipBridge, UserRouter
from gateway.sip.message import parse
from gateway.sip.transaction import Peer, Send
from gateway.store import Store
from gateway.transport.pump import Pump
from tests.fakelink import FakeLink

ROOT = Path(__file__).resolve().parent.parent
GATEWAY = ROOT / "gateway"
NOW = 1_800_000_000.0
INSTALL = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
PBX = Peer("udp", "127.0.0.1", 5099)


class Handle:
    """A device link with nothing to call: the core may only file actions under it."""

    __slots__ = ("transport",)

    def __init__(self) -> None:
        self.transport = "quic"


class SipRecorder:
    """The SIP transport's end of the pump: what it would write, in order."""

    def __init__(self) -> None:
        self.out: list[object] = []

    def carry_out(self, outputs: list[object]) -> None:
        self.out.extend(outputs)


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "lpgw.db")
    yield s
    s.close()


def delivery_on(store: Store) -> Delivery:
    return Delivery(store, token_secret=b"k" * 32, gateway_id="gw1",
                    settings=DeliverySettings(), policy=AssertionPolicy(), metrics=Metrics())


def hello(push_types: tuple[str, ...] = ("alert", "voip")) -> Hello:
    return Hello(version=1, install_id=INSTALL, topic="com.example.nurse",
                 push_types=push_types)


# --- the core returns; it never calls a link or a listener ------------------------------

def test_delivery_returns_what_to_do_and_calls_no_link(store):
    """Admit, push, ack, a replacing connection, unregister and shutdown with links that
    have no methods at all: every effect comes back from actions_to_send(), in order.
    Before, Delivery called link.welcome/send_push/close and listener lists itself."""
    d = delivery_on(store)
    first = Handle()
    token = d.admit(first, hello(), NOW)
    assert d.actions_to_send() == [WelcomeDevice(first, token, None)]
    accepted = d.submit(token, PushRequest("alert", {"aps": {"alert": "hi"}}), NOW + 1)
    (sent,) = d.actions_to_send()
    assert isinstance(sent, SendPush) and sent.link is first and sent.push.seq == accepted.seq
    d.ack(token, first, accepted.seq, NOW + 2)
    assert d.actions_to_send() == [PushDelivered(token, accepted.push_id, NOW + 2)]
    second = Handle()
    d.admit(second, hello(), NOW + 3)
    replaced, welcomed = d.actions_to_send()
    assert isinstance(replaced, CloseLink) and replaced.link is first
    assert replaced.reason == "replaced" and welcomed == WelcomeDevice(second, token, None)
    d.unregister(token, second, NOW + 4)
    assert [(a.link, a.reason) for a in d.actions_to_send()] == [(second, "unregistered")]
    third = Handle()
    d.admit(third, hello(), NOW + 5)
    d.actions_to_send()
    d.shutdown()
    closed, left = d.actions_to_send()
    assert (closed.link, closed.reason, left) == (third, "shutdown", DeviceLeft(token))
    assert d.actions_to_send() == []


def test_a_call_goes_down_and_its_ringing_comes_back_out_of_the_pump(store):
    """INVITE -> bridge -> calls -> delivery: the phone's frame is written by the pump
    before the 100 Trying leaves; the phone's ack -> delivery -> PushDelivered -> calls
    -> CallAnswered -> bridge -> 180, again carried out only by the pump. Nothing is
    sent while a layer is still handling its input."""
    d = delivery_on(store)
    router = UserRouter([], {}, store)
    calls = Calls(d, CallSettings(), end_status=SIP_STATUS)
    bridge = SipBridge(calls, d, router, Metrics())
    sip = SipRecorder()
    pump = Pump(d, Metrics())
    pump.calls, pump.bridge, pump.sip = calls, bridge, sip
    phone = FakeLink()
    token = d.admit(phone, hello(("voip",)), NOW)
    store.bind_user(token, "nurse")
    pump.run()
    assert phone.events == [("welcome", token, None)]

    invite = (b"INVITE sip:nurse@lpgw SIP/2.0\r\n"
              b"Via: SIP/2.0/UDP 127.0.0.1:5099;branch=z9hG4bK-one-way\r\n"
              b"From: <sip:1203@pbx>;tag=a\r\nTo: <sip:nurse@lpgw>\r\nCall-ID: one-way\r\n"
              b"CSeq: 1 INVITE\r\nContact: <sip:1203@127.0.0.1:5099>\r\n"
              b"Content-Length: 0\r\n\r\n")
    assert bridge.receive(invite, PBX, NOW + 1) == "invite"
    assert len(phone.events) == 1 and sip.out == []  # nothing carried out yet
    pump.run()
    (push,) = phone.pushes
    assert push.payload["call"]["sip_call_id"] == "one-way"
    assert isinstance(sip.out[0], CallPushed)
    assert [parse(s.data).status for s in sip.out[1:]] == [100]

    sip.out.clear()
    d.ack(token, phone, push.seq, NOW + 1.5)
    assert sip.out == []  # the ack only returned an event
    pump.run()
    sent, ringing = sip.out  # timed once the 180 is on its way
    assert ringing == Ringing(0.5)
    assert isinstance(sent, Send) and parse(sent.data).status == 180 and sent.peer == PBX
    # and nothing below hands anything up: no listener lists, no callbacks to set
    for layer in (d, calls, bridge):
        assert not [n for n in vars(layer) if n.startswith("on_") or "listeners" in n], layer
    assert list(inspect.signature(Calls.__init__).parameters) == [
        "self", "delivery", "settings", "end_status"]  # no devices_of callback up to sip/


def test_calls_say_outcomes_and_the_bridge_says_them_in_sip(store):
    """A decline is an outcome in the core; 603 is the bridge's word for it, and what the
    app reads in call_ended.status (docs/protocol.md) is that same number."""
    d = delivery_on(store)
    router = UserRouter([], {}, store)
    calls = Calls(d, CallSettings(), end_status=SIP_STATUS)
    token = d.admit(FakeLink(), hello(("voip",)), NOW)
    store.bind_user(token, "nurse")
    from gateway.core.calls import Caller
    from gateway.protocol.messages import CallAction
    call = calls.offer("nurse", Caller("sip:a@b", "", "sip:nurse@lpgw"), NOW,
                       router.devices_of("nurse"))
    d.commit(NOW)
    d.actions_to_send()
    d.call_action(token, CallAction(action="decline", call_id=call.id), NOW + 1)
    for event in d.actions_to_send():
        calls.device_event(event)
    (answer,) = calls.answers_to_send()
    assert answer.outcome is CallOutcome.DECLINED and SIP_STATUS[answer.outcome] == 603
    ended = [a.push.payload for a in d.actions_to_send() if isinstance(a, SendPush)]
    assert ended == [{"call_ended": {"id": call.id, "reason": "declined on a device",
                                     "status": 603}}]


# --- imports go one way ---------------------------------------------------------------

def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m == "gateway" or m.startswith("gateway.")}


# what each part of the gateway may import from the gateway (prefixes)
ALLOWED = {
    "protocol": ("gateway.protocol",),
    "records.py": (),
    "core": ("gateway.core", "gateway.protocol", "gateway.records"),
    "store.py": ("gateway.records",),
    "sip": ("gateway.sip", "gateway.core", "gateway.protocol", "gateway.records",
            "gateway.faults"),
}


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_imports_go_one_way(part):
    """protocol and records at the bottom, then core, then sip; store below the core's
    interface (it implements core.storage.Storage without importing the core). Before:
    core and store imported each other."""
    paths = [GATEWAY / part] if part.endswith(".py") else sorted((GATEWAY / part).rglob("*.py"))
    bad = {f"{p.relative_to(ROOT)} imports {m}"
           for p in paths for m in imports_of(p)
           if not m.startswith(ALLOWED[part]) and m != "gateway"}
    assert not bad, sorted(bad)


def test_the_core_holds_no_sip_status_codes_or_call_ids():
    tree = ast.parse((GATEWAY / "core" / "calls.py").read_text())
    constants = [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)]
    assert not {c for c in constants if isinstance(c, int)} & {
        100, 180, 183, 200, 480, 486, 487, 603}
    # no SIP name as a key or value (prose in docstrings and log lines may say "SIP")
    assert not [c for c in constants if isinstance(c, str) and " " not in c
                and ("sip" in c.lower() or "call-id" in c.lower())]


def test_no_caller_reaches_through_delivery_to_the_store(store):
    d = delivery_on(store)
    assert not hasattr(d, "store")
    reach = [f"{p.relative_to(ROOT)}:{node.lineno}"
             for p in sorted(GATEWAY.rglob("*.py"))
             for node in ast.walk(ast.parse(p.read_text()))
             if isinstance(node, ast.Attribute) and node.attr in ("store", "_storage")
             and isinstance(node.value, ast.Attribute) and node.value.attr == "delivery"]
    assert reach == []


def test_the_store_implements_the_storage_interface():
    """Every operation of core.storage.Storage exists on Store with the same parameters
    (mypy checks the types where a Store is passed as a Storage)."""
    members = [n for n, v in vars(Storage).items()
               if not n.startswith("_") and (callable(v) or isinstance(v, property))]
    assert len(members) > 20
    for name in members:
        want, have = getattr(Storage, name), getattr(Store, name)
        if isinstance(want, property):
            assert isinstance(have, property), name
            continue
        assert (list(inspect.signature(want).parameters)
                == list(inspect.signature(inspect.unwrap(have)).parameters)), name


# --- types that catch mistakes --------------------------------------------------------

def test_session_events_share_a_base_and_states_are_enums():
    from gateway.protocol import session
    from gateway.sip.register import RegState
    from gateway.sip.transaction import TxState

    gateway_side = [session.HelloReceived, session.AckReceived, session.CallActionReceived,
                    session.UnregisterReceived, session.FrameRejected, session.PingDue]
    device_side = [session.Welcomed, session.PushReceived, session.ErrorReceived]
    assert all(issubclass(e, session.GatewayEvent) for e in [*gateway_side, session.Closed])
    assert all(issubclass(e, session.DeviceEvent) for e in [*device_side, session.Closed])
    assert not any(issubclass(e, session.DeviceEvent) for e in gateway_side)
    assert [s.value for s in TxState] == ["trying", "proceeding", "completed", "confirmed",
                                          "terminated"]
    assert {s.value for s in RegState} == {"unregistered", "registering", "registered",
                                           "failed"}


async def test_a_started_gateway_is_complete(gateway):
    """Gateway.start is the one way to make one: nothing the core needs is None after."""
    from gateway.service import Gateway

    for name in ("store", "delivery", "pump", "link_context", "listening"):
        assert getattr(gateway, name) is not None, name
    assert gateway.listening.port > 0 and gateway.listening.transports
    assert gateway.pump.delivery is gateway.delivery
    assert gateway.link_context.pump is gateway.pump
    params = list(inspect.signature(Gateway.__init__).parameters)
    assert params == ["self", "config", "notifier", "metrics", "opened", "site"]
