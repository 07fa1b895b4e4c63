"""The delivery core across wall-clock steps, with an injected monotonic clock: a step is
seen at the next input and what was stamped before it moves with it."""

from __future__ import annotations

import pytest

from gateway.core.assertions import AssertionPolicy
from gateway.core.calls import Caller, Calls, CallSettings
from gateway.core.delivery import Delivery, DeliverySettings, Rejected
from gateway.core.metrics import Metrics
from gateway.store import Store
from tests.fakelink import Driven, FakeLink
from tests.test_delivery import GATEWAY_ID, NOW, SECRET, alert, hello

DAY = 86400.0


class Clocks:
    def __init__(self) -> None:
        self.mono = 1000.0
        self.offset = NOW - self.mono

    @property
    def wall(self) -> float:
        return self.mono + self.offset

    def run(self, seconds: float) -> float:
        self.mono += seconds
        return self.wall

    def step(self, seconds: float) -> float:
        self.offset += seconds
        return self.wall


@pytest.fixture
def clocks():
    return Clocks()


@pytest.fixture
def delivery(tmp_path, clocks):
    store = Store(tmp_path / "state" / "lpgw.db")
    yield Driven(Delivery(store, token_secret=SECRET, gateway_id=GATEWAY_ID,
                          settings=DeliverySettings(), policy=AssertionPolicy(),
                          metrics=Metrics(), monotonic=lambda: clocks.mono))
    store.close()


def test_forward_step_keeps_last_seen_and_pushes(delivery, clocks):
    link = FakeLink()
    token = delivery.admit(link, hello(), clocks.wall)
    delivery.detach(token, link, clocks.run(5), "client")
    kept = delivery.submit(token, alert(1, expiration=int(clocks.wall) + 3600), clocks.wall)
    now = clocks.step(40 * DAY)
    assert delivery.expire(now) == 0  # the sweep after the step drops nothing
    assert delivery.clock_steps == 1 and round(delivery.last_step.delta) == 40 * DAY
    assert delivery.metrics.value("lpgw_clock_steps_total") == 1
    delivery.submit(token, alert(2), clocks.run(1))  # before: Rejected Unregistered
    back = FakeLink()
    delivery.admit(back, hello(), clocks.run(1))
    assert [p.id for p in back.pushes][:1] == [kept.push_id] and len(back.pushes) == 2
    # the expiration kept its hour: it is dropped an hour of running time later, not before
    delivery.detach(token, back, clocks.run(1), "client")
    delivery.submit(token, alert(3, expiration=int(clocks.wall) + 60), clocks.wall)
    assert delivery.expire(clocks.run(3000)) == 1


def test_really_unseen_is_still_unregistered_after_a_step(delivery, clocks):
    link = FakeLink()
    token = delivery.admit(link, hello(), clocks.wall)
    delivery.detach(token, link, clocks.wall, "client")
    clocks.step(40 * DAY)
    delivery.observe_clock(clocks.wall)
    with pytest.raises(Rejected) as refused:  # 31 days of running time: truly unseen
        delivery.submit(token, alert(), clocks.run(31 * DAY))
    assert refused.value.reason == "Unregistered"


def test_backward_step_moves_last_seen_and_keeps_expirations(delivery, clocks):
    link = FakeLink()
    token = delivery.admit(link, hello(), clocks.wall)
    delivery.detach(token, link, clocks.wall, "client")
    expiration = int(clocks.wall) + 60
    delivery.submit(token, alert(1, expiration=expiration), clocks.wall)
    clocks.step(-3600)
    delivery.observe_clock(clocks.wall)
    assert delivery.clock_steps == 1
    device = delivery.core._storage.device(token)
    assert abs(device.last_seen - clocks.wall) < 1  # seen just now, in the new reckoning
    # the provider's date stands: by the wall clock it still has an hour and a minute
    assert delivery.expire(clocks.run(120)) == 0
    assert delivery.core._storage.pending_after(token, 0)[0].expiration == expiration


def test_no_step_without_a_monotonic_clock(tmp_path):
    store = Store(tmp_path / "s" / "lpgw.db")
    d = Delivery(store, token_secret=SECRET, gateway_id=GATEWAY_ID, settings=DeliverySettings(),
                 policy=AssertionPolicy(), metrics=Metrics())
    assert d.observe_clock(NOW) is None and d.observe_clock(NOW + 40 * DAY) is None
    assert d.clock_steps == 0
    store.close()


def test_calls_keep_their_time_left_across_a_step(delivery, clocks):
    calls = Calls(delivery.core, CallSettings(ring_window=45, reach_timeout=10))
    caller = Caller("sip:1@x", "", "sip:nurse@x", {"sip_call_id": "c1"})
    call = calls.offer("nurse", caller, clocks.wall, [])
    assert call is None  # nobody to ring; build one by hand to time it
    from gateway.core.calls import Call
    started = clocks.wall
    c = Call("id", "nurse", Caller("sip:1@x", "", "sip:nurse@x", {"sip_call_id": "c1"}), started,
             started + 10, started + 45)
    calls.calls[c.id] = c
    calls.clock_stepped(40 * DAY)
    assert calls.next_timer() == pytest.approx(started + 40 * DAY + 10)


def test_sip_timers_keep_their_intervals_across_a_step():
    """Registrations and transactions are intervals too: a step back of an hour must not
    let a registration lapse, a step forward must not time every transaction out."""
    from gateway.sip.register import Account, PbxLink
    from gateway.sip.transaction import Peer, TransactionLayer

    pbx = PbxLink([Account(user="nurse", auth_user="nurse", expires=300, domain="pbx",
                           password="pw")], Peer("udp", "127.0.0.1", 5060),
                  ("127.0.0.1", 5070), 30.0, NOW)
    before = pbx.next_timer()
    pbx.clock_stepped(-3600)
    assert pbx.next_timer() == pytest.approx(before - 3600)

    layer = TransactionLayer()
    from gateway.sip.message import parse
    msg = parse(b"OPTIONS sip:pbx SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-c\r\n"
                b"From: <sip:a@x>;tag=1\r\nTo: <sip:pbx>\r\nCall-ID: c\r\nCSeq: 1 OPTIONS\r\n"
                b"Content-Length: 0\r\n\r\n")
    layer.request(msg, Peer("udp", "127.0.0.1", 5060), NOW)
    due = layer.next_timer()
    layer.clock_stepped(40 * DAY)
    assert layer.next_timer() == pytest.approx(due + 40 * DAY)
    assert layer.handle_timer(NOW + 40 * DAY) == []  # nothing due yet in the new reckoning
