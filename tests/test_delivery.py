"""The delivery core without sockets or sleeps: a recording fake link, a real SQLite file,
and time passed in as `now`."""

from __future__ import annotations

import re
import uuid
from typing import Any

import pytest

from gateway.core.assertions import AssertionPolicy
from gateway.core.delivery import (
    Accepted,
    Delivery,
    DeliverySettings,
    Rejected,
)
from gateway.core.events import CallActionTaken
from gateway.core.metrics import Metrics
from gateway.core.model import PushRequest
from gateway.core.tokens import derive_token, short
from gateway.protocol.messages import CallAction, Hello
from gateway.records import is_token
from gateway.store import Store
from tests.fakelink import Driven, FakeLink

NOW = 1_800_000_000.0
SECRET = b"k" * 32
GATEWAY_ID = "gw1"
TOPIC = "com.example.app"
INSTALL = "5f0c6a1e-3b7d-4c2a-9e8f-1a2b3c4d5e6f"
OTHER_INSTALL = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"


def hello(install: str = INSTALL, topic: str = TOPIC,
          push_types: tuple[str, ...] = ("alert", "voip"), **kw: Any) -> Hello:
    return Hello(version=1, install_id=install, topic=topic, push_types=push_types, **kw)


def alert(n: int = 0, **kw: Any) -> PushRequest:
    return PushRequest(push_type="alert", payload={"aps": {"alert": f"m{n}"}}, **kw)


def payload_of(size: int) -> dict[str, str]:
    """A payload whose compact JSON is exactly `size` bytes: {"a":"xxx…"}."""
    return {"a": "x" * (size - 8)}


def make_delivery(store: Store, settings: DeliverySettings | None = None,
                  policy: AssertionPolicy | None = None) -> Delivery:
    return Driven(Delivery(store, token_secret=SECRET, gateway_id=GATEWAY_ID,
                           settings=settings or DeliverySettings(),
                           policy=policy or AssertionPolicy(), metrics=Metrics()))


def metric(d: Delivery, name: str, **labels: str) -> float:
    return d.metrics.value(name, **labels)


def register(d: Delivery, install: str = INSTALL, now: float = NOW, **kw: Any) -> str:
    """Admit a device once and let it go, so it is known but not connected."""
    link = FakeLink()
    token = d.admit(link, hello(install, **kw), now)
    d.detach(token, link, now, "client")
    assert not d.is_connected(token)
    return token


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "state" / "lpgw.db")
    yield s
    s.close()


@pytest.fixture
def delivery(store):
    return make_delivery(store)


# --- tokens ---------------------------------------------------------------------------


def test_token_is_64_lowercase_hex():
    token = derive_token(SECRET, INSTALL, TOPIC)
    assert re.fullmatch(r"[0-9a-f]{64}", token)
    assert is_token(token)
    assert short(token) == token[:8] + "…"


@pytest.mark.parametrize("value", [
    "",
    "a" * 63,
    "a" * 65,
    "A" * 64,
    "g" * 64,
    " " + "a" * 63,
    "a" * 63 + " ",
    "a" * 64 + "\n",  # `$` in TOKEN_RE also matches before a trailing newline
])
def test_is_token_refuses_anything_but_64_lowercase_hex(value):
    assert not is_token(value)


def test_token_is_stable_across_a_gateway_restart(tmp_path):
    path = tmp_path / "lpgw.db"
    first = Store(path)
    d1 = make_delivery(first)
    link1 = FakeLink()
    t1 = d1.admit(link1, hello(), NOW)
    d1.detach(t1, link1, NOW, "client")
    first.close()

    second = Store(path)
    try:
        d2 = make_delivery(second)
        assert second.device(t1) is not None  # the device survived the restart
        link2 = FakeLink()
        t2 = d2.admit(link2, hello(), NOW + 3600)
        assert t2 == t1
        assert link2.events[0] == ("welcome", t1, None)
        assert second.count_devices() == 1
    finally:
        second.close()


def test_token_differs_by_install_and_by_topic():
    base = derive_token(SECRET, INSTALL, TOPIC)
    assert derive_token(SECRET, OTHER_INSTALL, TOPIC) != base
    assert derive_token(SECRET, INSTALL, "com.example.other") != base
    # another gateway (another secret) hands out another token
    assert derive_token(b"q" * 32, INSTALL, TOPIC) != base
    # an install id is a UUID: its spelling does not matter
    assert derive_token(SECRET, INSTALL.upper(), TOPIC) == base


def test_admit_gives_different_tokens_to_different_installs_and_topics(delivery, store):
    a = delivery.admit(FakeLink(), hello(INSTALL), NOW)
    b = delivery.admit(FakeLink(), hello(OTHER_INSTALL), NOW)
    c = delivery.admit(FakeLink(), hello(INSTALL, topic="com.example.other"), NOW)
    assert len({a, b, c}) == 3
    assert store.count_devices() == 3


def test_token_does_not_reveal_the_install_id(delivery, store):
    token = delivery.admit(FakeLink(), hello(), NOW)
    plain = INSTALL.replace("-", "")
    assert plain not in token
    for group in INSTALL.split("-"):
        assert group not in token
    # nor is the install id kept anywhere in the database
    store._db.execute("PRAGMA wal_checkpoint(FULL)")
    data = b"".join(p.read_bytes() for p in store.path.parent.iterdir() if p.is_file())
    for spelling in (INSTALL, INSTALL.upper(), plain, plain.upper()):
        assert spelling.encode() not in data


# --- admit, replace, detach --------------------------------------------------------------


def test_welcome_comes_before_any_push(delivery):
    token = register(delivery)
    delivery.submit(token, alert(1), NOW + 1)
    delivery.submit(token, alert(2), NOW + 2)
    link = FakeLink()
    assert delivery.admit(link, hello(), NOW + 3) == token
    assert link.events[0] == ("welcome", token, None)
    assert [e[0] for e in link.events] == ["welcome", "push", "push"]
    assert delivery.is_connected(token)
    assert delivery.connected() == {token: "quic"}
    assert metric(delivery, "lpgw_handshakes_total", transport="quic", result="welcome") == 2


def test_admit_records_the_device(delivery, store):
    token = delivery.admit(FakeLink(), hello(push_types=("voip",)), NOW)
    device = store.device(token)
    assert device is not None
    assert device.topic == TOPIC
    assert device.push_types == ("voip",)
    assert device.user is None
    assert device.created_at == NOW
    assert device.unregistered_at is None


def test_second_admit_replaces_the_first_connection(delivery, store):
    old, new = FakeLink(), FakeLink()
    token = delivery.admit(old, hello(), NOW)
    assert delivery.admit(new, hello(), NOW + 1) == token

    assert len(old.closes) == 1
    assert old.closes[0][1] == "replaced"
    assert new.closes == []
    assert metric(delivery, "lpgw_devices_connected", transport="quic") == 1

    # the old connection's late detach and ack must not touch the new one
    delivery.detach(token, old, NOW + 2, "eof")
    assert delivery.is_connected(token)
    assert metric(delivery, "lpgw_devices_connected", transport="quic") == 1

    delivery.submit(token, alert(), NOW + 3)
    assert new.seqs == [1]
    assert old.pushes == []
    delivery.ack(token, old, 1, NOW + 4)
    assert store.count_pending(token) == 1  # an ack from a stale link is ignored
    assert metric(delivery, "lpgw_pushes_delivered_total") == 0

    delivery.detach(token, new, NOW + 5, "eof")
    assert not delivery.is_connected(token)
    assert metric(delivery, "lpgw_devices_connected", transport="quic") == 0
    assert store.device(token).last_seen == NOW + 5


def test_replacement_over_another_transport_moves_the_gauge(delivery):
    token = delivery.admit(FakeLink("quic"), hello(), NOW)
    delivery.admit(FakeLink("tcp"), hello(), NOW + 1)
    assert metric(delivery, "lpgw_devices_connected", transport="quic") == 0
    assert metric(delivery, "lpgw_devices_connected", transport="tcp") == 1
    assert delivery.connected() == {token: "tcp"}


def test_detach_of_an_unknown_link_is_harmless(delivery):
    token = register(delivery)
    delivery.detach(token, FakeLink(), NOW, "eof")
    delivery.detach("f" * 64, FakeLink(), NOW, "eof")
    assert metric(delivery, "lpgw_devices_connected", transport="quic") == 0


# --- submit, send, ack -------------------------------------------------------------------


def test_submit_while_connected_sends_in_seq_order(delivery, store):
    link = FakeLink()
    token = delivery.admit(link, hello(), NOW)
    results = [delivery.submit(token, alert(n), NOW + n) for n in (1, 2, 3)]

    assert [r.seq for r in results] == [1, 2, 3]
    assert all(r.sent and r.stored for r in results)
    assert link.seqs == [1, 2, 3]
    assert [p.id for p in link.pushes] == [r.push_id for r in results]
    assert [p.payload for p in link.pushes] == [{"aps": {"alert": f"m{n}"}} for n in (1, 2, 3)]
    assert all(p.push_type == "alert" and p.priority == 10 for p in link.pushes)
    assert metric(delivery, "lpgw_pushes_accepted_total", push_type="alert") == 3
    # durable before it was sent
    assert [p.seq for p in store.pending_after(token, 0)] == [1, 2, 3]

    delivery.ack(token, link, 2, NOW + 10)
    assert [p.seq for p in store.pending_after(token, 0)] == [3]
    assert store.device(token).acked_seq == 2
    assert metric(delivery, "lpgw_pushes_delivered_total") == 2
    assert metric(delivery, "lpgw_delivery_latency_seconds_count") == 2
    assert metric(delivery, "lpgw_delivery_latency_seconds_sum") == pytest.approx(9 + 8)

    delivery.ack(token, link, 3, NOW + 11)
    assert store.pending_after(token, 0) == []
    assert metric(delivery, "lpgw_pushes_delivered_total") == 3
    # a repeated ack counts nothing twice
    delivery.ack(token, link, 3, NOW + 12)
    assert metric(delivery, "lpgw_pushes_delivered_total") == 3
    assert link.seqs == [1, 2, 3]


def test_push_fields_are_carried_to_the_device(delivery):
    link = FakeLink()
    token = delivery.admit(link, hello(), NOW)
    push_id = str(uuid.uuid4())
    delivery.submit(token, PushRequest("voip", {"call": "c1"}, priority=5,
                                       expiration=int(NOW) + 30, collapse_id="call-c1",
                                       push_id=push_id.upper(), topic=f"{TOPIC}.voip"), NOW)
    (push,) = link.pushes
    assert push.id == push_id  # normalised to the canonical lowercase form
    assert push.push_type == "voip"
    assert push.priority == 5
    assert push.expiration == int(NOW) + 30
    assert push.collapse_id == "call-c1"
    assert push.payload == {"call": "c1"}
    assert push.sent_at == NOW


def test_default_ttl_applies_when_no_expiration_is_given(store):
    d = make_delivery(store, DeliverySettings(default_ttl=600))
    link = FakeLink()
    token = d.admit(link, hello(), NOW)
    d.submit(token, alert(), NOW + 0.5)
    assert link.pushes[0].expiration == int(NOW) + 600
    assert store.pending_after(token, 0)[0].expiration == int(NOW) + 600


# --- redelivery --------------------------------------------------------------------------


def test_stored_pushes_go_out_on_admit_and_again_on_reconnect(delivery, store):
    token = register(delivery)
    results = [delivery.submit(token, alert(n), NOW + n) for n in (1, 2, 3)]
    assert all(r.stored and not r.sent for r in results)
    ids = [r.push_id for r in results]

    first = FakeLink()
    delivery.admit(first, hello(), NOW + 10)
    assert first.seqs == [1, 2, 3]
    assert [p.id for p in first.pushes] == ids

    # the device reconnects without having acked: everything again, same ids
    second = FakeLink("tcp")
    delivery.admit(second, hello(), NOW + 20)
    assert second.seqs == [1, 2, 3]
    assert [p.id for p in second.pushes] == ids
    assert first.closes[0][1] == "replaced"

    # and a push after that continues the sequence on the new link only
    delivery.submit(token, alert(4), NOW + 21)
    assert second.seqs == [1, 2, 3, 4]
    assert first.seqs == [1, 2, 3]
    assert store.count_pending(token) == 4


def test_stored_pushes_survive_a_gateway_restart(tmp_path):
    path = tmp_path / "lpgw.db"
    s1 = Store(path)
    d1 = make_delivery(s1)
    token = register(d1)
    ids = [d1.submit(token, alert(n), NOW + n).push_id for n in (1, 2)]
    s1.close()

    s2 = Store(path)
    try:
        d2 = make_delivery(s2)
        link = FakeLink()
        d2.admit(link, hello(), NOW + 100)
        assert link.seqs == [1, 2]
        assert [p.id for p in link.pushes] == ids
        # sequence numbers are not reused after the restart
        assert d2.submit(token, alert(3), NOW + 101).seq == 3
    finally:
        s2.close()


def test_last_ack_in_hello_acks_stored_pushes(delivery, store):
    token = register(delivery)
    for n in (1, 2, 3):
        delivery.submit(token, alert(n), NOW + n)
    link = FakeLink()
    delivery.admit(link, hello(last_ack=2, gateway_id=GATEWAY_ID), NOW + 10)
    assert link.seqs == [3]
    assert [p.seq for p in store.pending_after(token, 0)] == [3]
    assert metric(delivery, "lpgw_pushes_delivered_total") == 2
    assert metric(delivery, "lpgw_delivery_latency_seconds_count") == 2


@pytest.mark.parametrize("gateway_id", ["gw-other", None])
def test_last_ack_for_another_gateway_is_ignored(delivery, store, gateway_id):
    token = register(delivery)
    for n in (1, 2, 3):
        delivery.submit(token, alert(n), NOW + n)
    link = FakeLink()
    delivery.admit(link, hello(last_ack=2, gateway_id=gateway_id), NOW + 10)
    assert link.seqs == [1, 2, 3]
    assert store.count_pending(token) == 3
    assert metric(delivery, "lpgw_pushes_delivered_total") == 0


# --- expiration --------------------------------------------------------------------------


def test_expiration_zero_to_a_connected_device_is_sent_not_stored(delivery, store):
    link = FakeLink()
    token = delivery.admit(link, hello(), NOW)
    res = delivery.submit(token, alert(expiration=0), NOW + 1)
    assert res == Accepted(res.push_id, 1, sent=True, stored=False)
    assert link.seqs == [1]
    assert link.pushes[0].expiration == 0
    assert store.count_pending(token) == 0

    # the next stored push takes the next seq
    assert delivery.submit(token, alert(), NOW + 2).seq == 2
    assert link.seqs == [1, 2]

    delivery.ack(token, link, 2, NOW + 4)
    assert metric(delivery, "lpgw_pushes_delivered_total") == 2
    assert metric(delivery, "lpgw_delivery_latency_seconds_sum") == pytest.approx(3 + 2)
    assert metric(delivery, "lpgw_pushes_expired_total") == 0


def test_expiration_zero_to_an_absent_device_is_dropped(delivery, store):
    token = register(delivery)
    res = delivery.submit(token, alert(expiration=0), NOW + 1)
    assert res.seq is None
    assert not res.sent and not res.stored
    assert store.count_pending(token) == 0
    assert metric(delivery, "lpgw_pushes_expired_total") == 1
    link = FakeLink()
    delivery.admit(link, hello(), NOW + 2)
    assert link.pushes == []


def test_unacked_expiration_zero_push_counts_expired_on_disconnect(delivery):
    link = FakeLink()
    token = delivery.admit(link, hello(), NOW)
    delivery.submit(token, alert(expiration=0), NOW)
    delivery.detach(token, link, NOW + 1, "eof")
    assert metric(delivery, "lpgw_pushes_expired_total") == 1
    assert metric(delivery, "lpgw_pushes_delivered_total") == 0
    # not re-sent: now or never
    again = FakeLink()
    delivery.admit(again, hello(), NOW + 2)
    assert again.pushes == []


def test_unacked_expiration_zero_push_counts_expired_when_replaced(delivery):
    """Every accepted push ends up delivered, expired, dropped or pending: a replaced
    connection's unacked now-or-never pushes must be counted as a detach counts them."""
    old = FakeLink()
    token = delivery.admit(old, hello(), NOW)
    delivery.submit(token, alert(expiration=0), NOW)
    new = FakeLink()
    delivery.admit(new, hello(), NOW + 1)
    delivery.detach(token, old, NOW + 1, "replaced")
    assert new.pushes == []
    assert metric(delivery, "lpgw_pushes_expired_total") == 1


@pytest.mark.parametrize("connected", [True, False])
@pytest.mark.parametrize("ago", [0, 10])
def test_past_expiration_is_tried_once_and_never_stored(delivery, store, connected, ago):
    """APNs tries a nonzero expiration at least once: one that has begun (the current
    second, what client libraries send for a time-to-live of 0) or passed goes to a device
    that is here, like expiration 0, and is never stored. Before: dropped on arrival."""
    link = FakeLink()
    token = delivery.admit(link, hello(), NOW) if connected else register(delivery)
    res = delivery.submit(token, alert(expiration=int(NOW) - ago), NOW + 0.5)
    assert not res.stored and store.count_pending(token) == 0
    assert res.sent is connected
    assert [p.expiration for p in link.pushes] == ([0] if connected else [])
    assert metric(delivery, "lpgw_pushes_expired_total") == (0 if connected else 1)
    assert metric(delivery, "lpgw_pushes_accepted_total", push_type="alert") == 1


def test_stored_push_that_expires_before_the_device_comes_is_not_sent(delivery, store):
    token = register(delivery)
    delivery.submit(token, alert(1, expiration=int(NOW) + 60), NOW)
    keep = delivery.submit(token, alert(2, expiration=int(NOW) + 600), NOW)
    link = FakeLink()
    delivery.admit(link, hello(), NOW + 120)
    assert [p.id for p in link.pushes] == [keep.push_id]
    assert metric(delivery, "lpgw_pushes_expired_total") == 1
    assert [p.seq for p in store.pending_after(token, 0)] == [keep.seq]


def test_expire_sweeps_stored_pushes(delivery, store):
    a = register(delivery, INSTALL)
    b = register(delivery, OTHER_INSTALL)
    delivery.submit(a, alert(1, expiration=int(NOW) + 60), NOW)
    delivery.submit(b, alert(2, expiration=int(NOW) + 90), NOW)
    delivery.submit(a, alert(3, expiration=int(NOW) + 600), NOW)
    delivery.submit(b, alert(4), NOW)  # default ttl: 30 days

    assert delivery.expire(NOW + 30) == 0
    assert delivery.expire(NOW + 120) == 2
    assert metric(delivery, "lpgw_pushes_expired_total") == 2
    assert [p.seq for p in store.pending_after(a, 0)] == [2]
    assert [p.seq for p in store.pending_after(b, 0)] == [2]
    assert delivery.expire(NOW + 120) == 0
    assert metric(delivery, "lpgw_pushes_expired_total") == 2


# --- collapse and queue limit -----------------------------------------------------------


def test_collapse_keeps_only_the_newest(delivery, store):
    token = register(delivery)
    delivery.submit(token, alert(1, collapse_id="score"), NOW)
    other = delivery.submit(token, alert(2, collapse_id="news"), NOW + 1)
    newer = delivery.submit(token, alert(3, collapse_id="score"), NOW + 2)
    assert metric(delivery, "lpgw_pushes_dropped_total", reason="collapsed") == 1

    link = FakeLink()
    delivery.admit(link, hello(), NOW + 3)
    assert [p.id for p in link.pushes] == [other.push_id, newer.push_id]
    assert link.pushes[1].payload == {"aps": {"alert": "m3"}}
    assert link.pushes[1].collapse_id == "score"


def test_collapse_is_per_device(delivery):
    a = register(delivery, INSTALL)
    b = register(delivery, OTHER_INSTALL)
    delivery.submit(a, alert(1, collapse_id="c"), NOW)
    delivery.submit(b, alert(2, collapse_id="c"), NOW)
    assert metric(delivery, "lpgw_pushes_dropped_total", reason="collapsed") == 0
    la, lb = FakeLink(), FakeLink()
    delivery.admit(la, hello(INSTALL), NOW + 1)
    delivery.admit(lb, hello(OTHER_INSTALL), NOW + 1)
    assert len(la.pushes) == 1 and len(lb.pushes) == 1


def test_queue_limit_keeps_the_newest(store):
    d = make_delivery(store, DeliverySettings(queue_limit=3))
    token = register(d)
    ids = [d.submit(token, alert(n), NOW + n).push_id for n in range(1, 6)]
    assert metric(d, "lpgw_pushes_dropped_total", reason="queue_full") == 2
    assert store.count_pending(token) == 3
    link = FakeLink()
    d.admit(link, hello(), NOW + 10)
    assert [p.id for p in link.pushes] == ids[2:]
    assert link.seqs == [3, 4, 5]


# --- rejections --------------------------------------------------------------------------


def _rejected(d: Delivery, token: str, req: PushRequest) -> Rejected:
    with pytest.raises(Rejected) as info:
        d.submit(token, req, NOW + 1)
    return info.value


@pytest.mark.parametrize(("reason", "req"), [
    ("DeviceTokenNotForTopic", alert(topic="com.example.other")),
    ("DeviceTokenNotForTopic", PushRequest("background", {"aps": {"content-available": 1}})),
    ("InvalidPushType", PushRequest("fax", {"a": 1})),
    ("InvalidPushType", PushRequest("", {"a": 1})),
    ("BadPriority", alert(priority=7)),
    ("BadPriority", alert(priority=0)),
    ("BadCollapseId", alert(collapse_id="x" * 65)),
    ("BadCollapseId", alert(collapse_id="é" * 33)),  # 33 characters, 66 bytes
    ("BadExpirationDate", alert(expiration=-1)),
    ("BadMessageId", alert(push_id="not-a-uuid")),
    ("PayloadEmpty", PushRequest("alert", {})),
    ("PayloadTooLarge", PushRequest("alert", payload_of(4097))),
    ("PayloadTooLarge", PushRequest("alert", {"a": "é" * 2100})),  # 2100 chars, 4200 bytes
    ("PayloadTooLarge", PushRequest("voip", payload_of(5121))),
    ("PayloadTooLarge", PushRequest("voip", payload_of(5200))),
])
def test_rejected_requests_leave_nothing_behind(delivery, store, reason, req):
    link = FakeLink()
    token = delivery.admit(link, hello(), NOW)
    before = store.device(token)
    exc = _rejected(delivery, token, req)
    assert exc.reason == reason
    assert metric(delivery, "lpgw_pushes_rejected_total", reason=reason) == 1
    assert metric(delivery, "lpgw_pushes_accepted_total", push_type=req.push_type) == 0
    assert link.pushes == []
    assert store.count_pending(token) == 0
    assert store.device(token).next_seq == before.next_seq
    # a good push right after still takes seq 1
    assert delivery.submit(token, alert(), NOW + 2).seq == 1


@pytest.mark.parametrize(("push_type", "size"), [
    ("alert", 4096), ("background", 4096), ("voip", 5000), ("voip", 5120),
])
def test_payload_limits_accept_up_to_the_limit(delivery, push_type, size):
    link = FakeLink()
    token = delivery.admit(link, hello(push_types=("alert", "background", "voip")), NOW)
    res = delivery.submit(token, PushRequest(push_type, payload_of(size)), NOW)
    assert res.stored and res.sent
    assert link.pushes[0].payload == payload_of(size)


def test_collapse_id_of_64_bytes_is_accepted(delivery):
    token = register(delivery)
    assert delivery.submit(token, alert(collapse_id="x" * 64), NOW).stored


@pytest.mark.parametrize("token", ["xyz", "A" * 64, "a" * 63, ""])
def test_badly_formed_token_is_rejected(delivery, token):
    assert _rejected(delivery, token, alert()).reason == "BadDeviceToken"
    assert metric(delivery, "lpgw_pushes_rejected_total", reason="BadDeviceToken") == 1


def test_unknown_token_is_rejected(delivery, store):
    register(delivery)
    unknown = derive_token(SECRET, OTHER_INSTALL, TOPIC)
    assert _rejected(delivery, unknown, alert()).reason == "BadDeviceToken"
    assert store.device(unknown) is None
    assert metric(delivery, "lpgw_pushes_rejected_total", reason="BadDeviceToken") == 1


def test_unregistered_device_is_refused_with_a_timestamp(delivery, store):
    link = FakeLink()
    token = delivery.admit(link, hello(), NOW)
    delivery.submit(token, alert(1), NOW)
    delivery.unregister(token, link, NOW + 5)

    assert [c[1] for c in link.closes] == ["unregistered"]
    assert store.count_pending(token) == 0
    exc = _rejected(delivery, token, alert(2))
    assert exc.reason == "Unregistered"
    assert exc.timestamp == NOW + 5
    assert metric(delivery, "lpgw_pushes_rejected_total", reason="Unregistered") == 1
    assert link.seqs == [1]

    # the same install saying hello again registers again, under the same token
    delivery.detach(token, link, NOW + 6, "unregistered")
    again = FakeLink()
    assert delivery.admit(again, hello(), NOW + 7) == token
    assert delivery.submit(token, alert(3), NOW + 8).sent
    assert again.seqs == [2]


# --- calls, shutdown, metrics ----------------------------------------------------------


def test_call_actions_are_returned_in_order(delivery):
    token = delivery.admit(FakeLink(), hello(), NOW)
    core = delivery.core  # undriven: what it returns stays for the test to read
    action = CallAction(action="ringing", call_id="call-1")
    core.call_action(token, action, NOW + 1)
    core.call_action(token, CallAction(action="decline", call_id="call-1"), NOW + 2)
    out = core.actions_to_send()
    assert out[0] == CallActionTaken(token, action, NOW + 1)
    assert [e.action.action for e in out] == ["ringing", "decline"]
    assert core.actions_to_send() == []  # taken once
    assert metric(delivery, "lpgw_call_actions_total", action="ringing") == 1
    assert metric(delivery, "lpgw_call_actions_total", action="decline") == 1


def test_shutdown_closes_every_link(delivery):
    a, b = FakeLink("quic"), FakeLink("tcp")
    ta = delivery.admit(a, hello(INSTALL), NOW)
    tb = delivery.admit(b, hello(OTHER_INSTALL), NOW)
    delivery.shutdown()
    assert [c[1] for c in a.closes] == ["shutdown"]
    assert [c[1] for c in b.closes] == ["shutdown"]
    assert not delivery.is_connected(ta) and not delivery.is_connected(tb)
    assert delivery.connected() == {}
    assert metric(delivery, "lpgw_devices_connected", transport="quic") == 0
    assert metric(delivery, "lpgw_devices_connected", transport="tcp") == 0


def test_metrics_are_per_instance():
    m1, m2 = Metrics(), Metrics()
    m1.delivered.inc(3)
    assert m1.value("lpgw_pushes_delivered_total") == 3
    assert m2.value("lpgw_pushes_delivered_total") == 0
    assert m1.value("lpgw_pushes_rejected_total", reason="never") == 0


def test_a_lone_surrogate_in_the_payload_is_refused_not_a_crash(delivery, store):
    token = register(delivery)
    with pytest.raises(Rejected) as caught:
        delivery.submit(token, PushRequest(push_type="alert", payload={"text": "\ud800"}), NOW)
    assert caught.value.reason == "BadPayload"
    assert store.count_pending(token) == 0


def test_a_device_unseen_for_too_long_is_unregistered(store):
    d = make_delivery(store, DeliverySettings(forget_after=86400))
    token = register(d)
    assert d.submit(token, alert(), NOW + 3600).stored
    with pytest.raises(Rejected) as caught:
        d.submit(token, alert(), NOW + 2 * 86400)
    assert caught.value.reason == "Unregistered" and caught.value.timestamp == NOW


def test_group_commit_holds_pushes_until_one_commit(delivery, store, tmp_path):
    import sqlite3

    link = FakeLink()
    token = delivery.admit(link, hello(), NOW)
    results = [delivery.submit(token, alert(i), NOW, group=True) for i in range(5)]
    assert all(r.stored for r in results)
    other = sqlite3.connect(store.path)  # another reader sees nothing before the commit
    assert other.execute("SELECT count(*) FROM pushes").fetchone()[0] == 0
    assert link.pushes == []  # nor has the device been sent anything
    delivery.commit(NOW)
    assert other.execute("SELECT count(*) FROM pushes").fetchone()[0] == 5
    assert [p.seq for p in link.pushes] == [r.seq for r in results]
    other.close()


def test_a_plain_submit_lands_an_open_group_with_it(delivery, store):
    import sqlite3

    token = register(delivery)
    delivery.submit(token, alert(0), NOW, group=True)
    delivery.submit(token, alert(1), NOW)  # e.g. the SIP bridge, in between
    other = sqlite3.connect(store.path)
    assert other.execute("SELECT count(*) FROM pushes").fetchone()[0] == 2
    other.close()


def test_rollback_of_a_group_forgets_its_pushes(delivery, store):
    token = register(delivery)
    delivery.submit(token, alert(0), NOW, group=True)
    delivery.rollback()
    assert store.count_pending(token) == 0
