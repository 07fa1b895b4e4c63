"""The two ends of lpgw/1 as sans-IO state machines: bytes and `now` in, events and bytes out.

No sockets and no sleeping: every call gets its `now`.
"""

from __future__ import annotations

import pytest

from gateway.protocol.frames import FrameDecoder, decode_body, encode_frame
from gateway.protocol.messages import ByeReason, CallAction, Hello, Push, Welcome
from gateway.protocol.session import (
    AckReceived,
    CallActionReceived,
    Closed,
    DeviceSession,
    ErrorReceived,
    FrameRejected,
    GatewaySession,
    HelloReceived,
    PingDue,
    PushReceived,
    SessionSettings,
    UnregisterReceived,
    Welcomed,
)

INSTALL_ID = "6f9619ff-8b86-4011-b42d-00c04fc964ff"
TOKEN = "3f" * 32

SETTINGS = SessionSettings(
    max_frame=512,
    heartbeat=10.0,
    heartbeat_misses=3,
    hello_timeout=5.0,
    frame_rate=10.0,
    frame_burst=5,
    error_budget=2,
)


# --- helpers -------------------------------------------------------------------------


def sent(session) -> list[dict]:
    """Every frame the session has written since the last call, decoded."""
    return [decode_body(body) for body in FrameDecoder(max_frame=1 << 20).feed(
        session.data_to_send())]


def frame(message: dict) -> bytes:
    return encode_frame(message)


def hello_dict(**changes) -> dict:
    d = {"type": "hello", "version": 1, "install_id": INSTALL_ID, "topic": "com.example.phone",
         "push_types": ["voip", "alert"]}
    d.update(changes)
    return d


def make_hello(**changes) -> Hello:
    return Hello.parse(hello_dict(**changes))


def make_welcome(heartbeat: float = 10.0, **changes) -> Welcome:
    fields = {"version": 1, "token": TOKEN, "heartbeat": heartbeat, "gateway_id": "lpgw-test"}
    fields.update(changes)
    return Welcome(**fields)


def make_push(seq: int, push_id: str | None = None, **changes) -> Push:
    fields = {"seq": seq, "id": push_id or f"push-{seq}", "push_type": "voip", "priority": 10,
              "expiration": 0, "payload": {"call": {"id": f"call-{seq}"}}}
    fields.update(changes)
    return Push(**fields)


def gateway_with_hello(now: float = 0.0, settings: SessionSettings = SETTINGS) -> GatewaySession:
    gw = GatewaySession(settings, now)
    events = gw.receive_data(frame(hello_dict()), now)
    assert [type(e) for e in events] == [HelloReceived]
    return gw


def welcomed_gateway(now: float = 0.0, settings: SessionSettings = SETTINGS) -> GatewaySession:
    gw = gateway_with_hello(now, settings)
    gw.welcome(make_welcome(settings.heartbeat), now)
    assert [m["type"] for m in sent(gw)] == ["welcome"]
    return gw


def welcomed_device(now: float = 0.0, heartbeat: float = 10.0, **kwargs) -> DeviceSession:
    device = DeviceSession(make_hello(**kwargs.pop("hello", {})), now, **kwargs)
    sent(device)  # the hello
    events = device.receive_data(frame(make_welcome(heartbeat).to_dict()), now)
    assert [type(e) for e in events] == [Welcomed]
    return device


def assert_closed(events: list, reason: str, code: str | None) -> Closed:
    assert events, "expected a Closed event"
    closed = events[-1]
    assert isinstance(closed, Closed)
    assert (closed.reason, closed.code, closed.by_peer) == (reason, code, False)
    return closed


def assert_bye(session, reason: str, code: str | None) -> dict:
    """The session's only output is one bye with this reason and code."""
    frames = sent(session)
    assert [f["type"] for f in frames] == ["bye"]
    assert (frames[0]["reason"], frames[0].get("code")) == (reason, code)
    return frames[0]


def assert_dead(session, now: float) -> None:
    """Once closed, a session takes nothing in and sends nothing more."""
    assert session.next_timer() is None
    assert session.receive_data(frame({"type": "ack", "seq": 1}), now) == []
    assert session.receive_data(frame({"type": "ping", "nonce": 1}), now) == []
    assert session.handle_timer(now + 1000) == []
    assert session.data_to_send() == b""


# --- gateway: opening ----------------------------------------------------------------


def test_gateway_hello_gives_hello_received():
    gw = GatewaySession(SETTINGS, now=0.0)
    events = gw.receive_data(frame(hello_dict(last_ack=3, gateway_id="lpgw-test")), 1.0)
    assert events == [HelloReceived(make_hello(last_ack=3, gateway_id="lpgw-test"))]
    assert gw.hello == make_hello(last_ack=3, gateway_id="lpgw-test")
    assert gw.closed is None
    assert gw.data_to_send() == b""  # the core answers, not the session


def test_gateway_hello_split_byte_by_byte():
    gw = GatewaySession(SETTINGS, now=0.0)
    data = frame(hello_dict())
    events = []
    for i in range(len(data)):
        events += gw.receive_data(data[i:i + 1], 0.0)
    assert [type(e) for e in events] == [HelloReceived]


def test_gateway_hello_timeout():
    gw = GatewaySession(SETTINGS, now=100.0)
    assert gw.next_timer() == 105.0
    assert gw.handle_timer(104.9) == []
    assert gw.data_to_send() == b""
    assert gw.next_timer() == 105.0
    assert_closed(gw.handle_timer(105.0), ByeReason.HELLO_TIMEOUT, "hello_timeout")
    assert_bye(gw, "hello_timeout", "hello_timeout")
    assert_dead(gw, 105.0)


def test_gateway_hello_in_time_cancels_the_hello_deadline():
    gw = GatewaySession(SETTINGS, now=0.0)
    gw.receive_data(frame(hello_dict()), 4.0)
    assert gw.handle_timer(5.0) == []
    assert gw.closed is None


def test_gateway_message_before_hello_is_hello_required():
    gw = GatewaySession(SETTINGS, now=0.0)
    events = gw.receive_data(frame({"type": "ack", "seq": 1}), 0.0)
    assert_closed(events, ByeReason.PROTOCOL_ERROR, "hello_required")
    assert_bye(gw, "protocol_error", "hello_required")
    assert_dead(gw, 0.0)


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"\x00\x00\x00\x02\xff\xfe", "bad_utf8"),
        (b"\x00\x00\x00\x03abc", "bad_json"),
        (frame({"type": "teleport"}), "unknown_type"),
        (frame(hello_dict(topic="not a topic")), "bad_field"),
        (frame(hello_dict(install_id=None)), "missing_field"),
    ],
)
def test_gateway_bad_first_frame_is_bye_not_error(data, code):
    gw = GatewaySession(SETTINGS, now=0.0)
    assert_closed(gw.receive_data(data, 0.0), ByeReason.PROTOCOL_ERROR, code)
    assert_bye(gw, "protocol_error", code)  # no `error` frame before hello


def test_gateway_unsupported_version_says_which_it_speaks():
    gw = GatewaySession(SETTINGS, now=0.0)
    events = gw.receive_data(frame(hello_dict(version=2)), 0.0)
    assert_closed(events, ByeReason.UNSUPPORTED_VERSION, "unsupported_version")
    bye = assert_bye(gw, "unsupported_version", "unsupported_version")
    assert bye["versions"] == [1]
    assert gw.hello is None


def test_gateway_version_is_checked_before_the_other_hello_fields():
    gw = GatewaySession(SETTINGS, now=0.0)
    events = gw.receive_data(frame({"type": "hello", "version": 2, "whatever": True}), 0.0)
    assert_closed(events, ByeReason.UNSUPPORTED_VERSION, "unsupported_version")


@pytest.mark.parametrize("welcome_first", [False, True])
def test_gateway_second_hello_is_duplicate_hello(welcome_first):
    gw = welcomed_gateway() if welcome_first else gateway_with_hello()
    events = gw.receive_data(frame(hello_dict()), 1.0)
    assert_closed(events, ByeReason.PROTOCOL_ERROR, "duplicate_hello")
    assert_bye(gw, "protocol_error", "duplicate_hello")


def test_gateway_deeply_nested_json_before_hello_ends_with_a_bye():
    body = b'{"type":"hello","x":' + b"[" * 5000 + b"]" * 5000 + b"}"
    settings = SessionSettings(max_frame=16384)
    gw = GatewaySession(settings, now=0.0)
    events = gw.receive_data(len(body).to_bytes(4, "big") + body, 0.0)  # must not raise
    assert_closed(events, ByeReason.PROTOCOL_ERROR, "bad_json")
    assert_bye(gw, "protocol_error", "bad_json")


# --- gateway: after welcome ----------------------------------------------------------


def test_gateway_welcome_and_push_are_written():
    gw = gateway_with_hello()
    welcome = make_welcome()
    push = make_push(1, sent_at=12.5)
    gw.welcome(welcome, 0.0)
    gw.push(push)
    frames = sent(gw)
    assert frames == [welcome.to_dict(), push.to_dict()]
    assert gw.welcomed


def test_gateway_device_messages_after_welcome_become_events():
    gw = welcomed_gateway()
    data = b"".join(frame(m) for m in [
        {"type": "ack", "seq": 7},
        {"type": "pong", "nonce": 1},
        {"type": "call", "action": "decline", "call_id": "c1"},
        {"type": "unregister"},
    ])
    events = gw.receive_data(data, 0.0)
    assert events == [
        AckReceived(7),
        CallActionReceived(CallAction(action="decline", call_id="c1")),
        UnregisterReceived(),
    ]
    assert gw.data_to_send() == b""  # none of these is answered by the session
    assert gw.closed is None


def test_gateway_ack_before_welcome_is_not_welcomed():
    gw = gateway_with_hello()
    events = gw.receive_data(frame({"type": "ack", "seq": 1}), 0.0)
    assert [(type(e), e.code) for e in events] == [(FrameRejected, "not_welcomed")]
    frames = sent(gw)
    assert [(f["type"], f["code"]) for f in frames] == [("error", "not_welcomed")]
    assert gw.closed is None


def test_gateway_bad_frames_after_welcome_get_errors_until_the_budget_is_spent():
    gw = welcomed_gateway()  # error_budget=2
    bad = [
        (b"\x00\x00\x00\x01\xff", "bad_utf8"),
        (frame({"type": "ack"}), "missing_field"),
        (frame({"type": "ping", "nonce": 1}), "unknown_type"),  # the (budget+1)th
    ]
    for data, code in bad[:2]:
        events = gw.receive_data(data, 1.0)
        assert [(type(e), e.code) for e in events] == [(FrameRejected, code)]
        frames = sent(gw)
        assert [(f["type"], f["code"]) for f in frames] == [("error", code)]
        assert gw.closed is None

    # the connection still works between refusals
    assert gw.receive_data(frame({"type": "ack", "seq": 3}), 1.0) == [AckReceived(3)]

    events = gw.receive_data(bad[2][0], 1.0)
    assert [type(e) for e in events] == [FrameRejected, Closed]
    assert events[0].code == "unknown_type"
    assert_closed(events, ByeReason.PROTOCOL_ERROR, "unknown_type")
    assert_bye(gw, "protocol_error", "unknown_type")  # a bye and no error for the last one
    assert_dead(gw, 1.0)


def test_gateway_oversize_frame_after_welcome_is_frame_too_large():
    gw = welcomed_gateway()
    events = gw.receive_data((SETTINGS.max_frame + 1).to_bytes(4, "big"), 1.0)
    assert_closed(events, ByeReason.PROTOCOL_ERROR, "frame_too_large")
    assert_bye(gw, "protocol_error", "frame_too_large")
    assert_dead(gw, 1.0)


def test_gateway_oversize_frame_before_hello_is_frame_too_large():
    gw = GatewaySession(SETTINGS, now=0.0)
    events = gw.receive_data(b"\xff\xff\xff\xff", 0.0)
    assert_closed(events, ByeReason.PROTOCOL_ERROR, "frame_too_large")


def test_gateway_frame_exactly_at_the_cap_is_accepted():
    gw = welcomed_gateway()
    message = {"type": "ack", "seq": 9, "pad": ""}
    message["pad"] = "x" * (SETTINGS.max_frame - len(frame(message)) + 4)
    data = frame(message)
    assert len(data) - 4 == SETTINGS.max_frame
    assert gw.receive_data(data, 1.0) == [AckReceived(9)]


def test_gateway_peer_bye_closes_by_peer_without_answering():
    gw = welcomed_gateway()
    events = gw.receive_data(frame({"type": "bye", "reason": "client"}), 1.0)
    assert events == [Closed(reason="client", by_peer=True)]
    assert gw.closed == events[0]
    assert gw.data_to_send() == b""
    assert_dead(gw, 1.0)


def test_gateway_frames_after_a_bye_in_the_same_read_are_ignored():
    gw = welcomed_gateway()
    data = frame({"type": "bye"}) + frame({"type": "ack", "seq": 5})
    events = gw.receive_data(data, 1.0)
    assert events == [Closed(reason="client", by_peer=True)]


def test_gateway_close_says_bye_once():
    gw = welcomed_gateway()
    first = gw.close(ByeReason.REPLACED, "replaced", "a newer connection said hello")
    again = gw.close(ByeReason.SHUTDOWN)
    assert again is first
    assert_bye(gw, "replaced", "replaced")
    gw.push(make_push(1))
    gw.welcome(make_welcome(), 1.0)
    assert_dead(gw, 1.0)


# --- gateway: flood ------------------------------------------------------------------


def test_gateway_more_than_burst_frames_at_once_is_flood():
    gw = welcomed_gateway(now=0.0)  # the hello took one of the 5 tokens
    acks = b"".join(frame({"type": "ack", "seq": n}) for n in range(1, 6))
    events = gw.receive_data(acks, 0.0)
    assert events[:-1] == [AckReceived(n) for n in range(1, 5)]
    assert_closed(events, ByeReason.FLOOD, "flood")
    assert_bye(gw, "flood", "flood")
    assert_dead(gw, 0.0)


def test_gateway_burst_frames_at_once_are_fine():
    gw = welcomed_gateway(now=0.0)
    acks = b"".join(frame({"type": "ack", "seq": n}) for n in range(1, 5))
    assert gw.receive_data(acks, 0.0) == [AckReceived(n) for n in range(1, 5)]
    assert gw.closed is None


def test_gateway_frames_below_the_rate_never_flood():
    gw = welcomed_gateway(now=0.0)
    now = 0.0
    for n in range(1, 201):  # 40 times the burst, at 5 frames/s (rate is 10/s)
        now += 0.2
        assert gw.receive_data(frame({"type": "ack", "seq": n}), now) == [AckReceived(n)]
    assert gw.closed is None


def test_gateway_bucket_refills_with_time():
    gw = welcomed_gateway(now=0.0)
    four = b"".join(frame({"type": "pong", "nonce": n}) for n in range(4))
    assert gw.receive_data(four, 0.0) == []  # bucket now empty
    # 0.5 s at 10/s brings back 5 tokens (capped at the burst of 5)
    five = b"".join(frame({"type": "pong", "nonce": n}) for n in range(5))
    assert gw.receive_data(five, 0.5) == []
    assert gw.closed is None
    assert_closed(gw.receive_data(frame({"type": "pong", "nonce": 0}), 0.5), "flood", "flood")


# --- gateway: heartbeat --------------------------------------------------------------


def test_gateway_next_timer_is_the_hello_deadline_then_the_next_ping():
    gw = GatewaySession(SETTINGS, now=100.0)
    assert gw.next_timer() == 105.0
    gw.receive_data(frame(hello_dict()), 101.0)
    gw.welcome(make_welcome(), 102.0)
    assert gw.next_timer() == 112.0


def test_gateway_heartbeat_pings_then_times_out_without_pong():
    gw = welcomed_gateway(now=100.0)  # heartbeat 10, 3 misses
    assert gw.next_timer() == 110.0

    assert gw.handle_timer(109.9) == []
    assert gw.data_to_send() == b""

    assert gw.handle_timer(110.0) == []
    assert sent(gw) == [{"type": "ping", "nonce": 1}]
    assert gw.next_timer() == 120.0
    assert gw.misses == 0

    assert gw.handle_timer(120.0) == []
    assert sent(gw) == [{"type": "ping", "nonce": 2}]
    assert (gw.misses, gw.next_timer()) == (1, 130.0)

    assert gw.handle_timer(130.0) == []
    assert sent(gw) == [{"type": "ping", "nonce": 3}]
    assert (gw.misses, gw.next_timer()) == (2, 140.0)

    assert_closed(gw.handle_timer(140.0), ByeReason.HEARTBEAT_TIMEOUT, "heartbeat_timeout")
    assert_bye(gw, "heartbeat_timeout", "heartbeat_timeout")
    assert_dead(gw, 140.0)


def test_gateway_pong_resets_misses():
    gw = welcomed_gateway(now=0.0)
    gw.handle_timer(10.0)  # ping 1
    gw.handle_timer(20.0)  # miss 1, ping 2
    assert gw.misses == 1
    sent(gw)
    assert gw.receive_data(frame({"type": "pong", "nonce": 2}), 21.0) == []
    assert gw.misses == 0

    gw.handle_timer(30.0)  # answered: a ping, no miss
    assert (gw.misses, sent(gw)) == (0, [{"type": "ping", "nonce": 3}])
    for t in (40.0, 50.0):
        assert gw.handle_timer(t) == []
    assert gw.misses == 2
    assert gw.closed is None
    assert_closed(gw.handle_timer(60.0), ByeReason.HEARTBEAT_TIMEOUT, "heartbeat_timeout")


def test_gateway_transport_pings_are_events_and_their_acks_reset_misses():
    """Over QUIC the heartbeat is the transport's PING: the session decides when and counts
    misses, the shell sends it and reports its acknowledgement."""
    gw = gateway_with_hello(0.0, SETTINGS)
    gw.transport_pings = True
    gw.welcome(make_welcome(SETTINGS.heartbeat), 0.0)
    sent(gw)
    assert gw.handle_timer(10.0) == [PingDue(1)]
    assert gw.data_to_send() == b""  # no ping frame
    assert gw.handle_timer(20.0) == [PingDue(2)]
    assert gw.misses == 1
    gw.pinged_back(1)  # a late acknowledgement of an older ping counts too
    assert gw.misses == 0
    assert gw.handle_timer(30.0) == [PingDue(3)]
    assert gw.misses == 0
    gw.pinged_back(99)  # never sent: ignored
    assert gw.handle_timer(40.0) == [PingDue(4)]
    assert gw.handle_timer(50.0) == [PingDue(5)]
    assert gw.misses == 2
    assert_closed(gw.handle_timer(60.0), ByeReason.HEARTBEAT_TIMEOUT, "heartbeat_timeout")
    assert_bye(gw, "heartbeat_timeout", "heartbeat_timeout")
    gw.pinged_back(5)  # after the end: nothing
    assert gw.misses == 3


def test_gateway_any_valid_frame_counts_as_alive():
    gw = welcomed_gateway(now=0.0)
    for t in range(10, 200, 10):
        assert gw.handle_timer(float(t)) == []
        assert gw.receive_data(frame({"type": "ack", "seq": t}), t + 1.0) == [AckReceived(t)]
        assert gw.misses == 0
    assert gw.closed is None


def test_gateway_refused_frames_do_not_count_as_alive():
    gw = welcomed_gateway(now=0.0)
    gw.handle_timer(10.0)
    gw.handle_timer(20.0)
    assert gw.misses == 1
    gw.receive_data(frame({"type": "ack", "seq": "x"}), 21.0)  # refused with an error
    assert gw.misses == 1


def test_gateway_timer_is_idempotent_between_deadlines():
    gw = welcomed_gateway(now=0.0)
    gw.handle_timer(10.0)
    sent(gw)
    for t in (10.0, 12.0, 19.99):
        assert gw.handle_timer(t) == []
    assert gw.data_to_send() == b""
    assert (gw.misses, gw.next_timer()) == (0, 20.0)


# --- device --------------------------------------------------------------------------


def test_device_says_hello_at_once():
    hello = make_hello(last_ack=4, gateway_id="lpgw-test")
    device = DeviceSession(hello, now=50.0, welcome_timeout=7.0)
    assert sent(device) == [hello.to_dict()]
    assert device.next_timer() == 57.0


def test_device_welcome():
    device = DeviceSession(make_hello(), now=0.0)
    sent(device)
    welcome = make_welcome(heartbeat=2.0, user="alice")
    events = device.receive_data(frame(welcome.to_dict()), 1.0)
    assert events == [Welcomed(welcome)]
    assert device.welcome == welcome
    assert device.next_timer() == 7.0  # last heard at 1.0, plus 3 heartbeats
    assert device.data_to_send() == b""


def test_device_welcome_timeout():
    device = DeviceSession(make_hello(), now=0.0, welcome_timeout=10.0)
    sent(device)
    assert device.handle_timer(9.9) == []
    events = device.handle_timer(10.0)
    assert_closed(events, ByeReason.HELLO_TIMEOUT, "welcome_timeout")
    assert_dead(device, 10.0)


def test_device_push_then_duplicate():
    device = welcomed_device()
    push = make_push(1, "8e6a1d2c-6f49-4c8a-9d4b-0a1b2c3d4e5f")
    assert device.receive_data(frame(push.to_dict()), 1.0) == [PushReceived(push, False)]
    again = make_push(2, push.id)  # a redelivery may carry another seq; the id decides
    assert device.receive_data(frame(again.to_dict()), 2.0) == [PushReceived(again, True)]
    other = make_push(3, "another")
    assert device.receive_data(frame(other.to_dict()), 3.0) == [PushReceived(other, False)]
    assert device.seen_ids == [push.id, "another"]


def test_device_remember_ids_carries_the_duplicate_filter():
    device = welcomed_device()
    device.remember_ids(["old-1", "old-2"])
    events = device.receive_data(frame(make_push(5, "old-2").to_dict()), 1.0)
    assert events == [PushReceived(make_push(5, "old-2"), True)]
    events = device.receive_data(frame(make_push(6, "new").to_dict()), 1.0)
    assert events == [PushReceived(make_push(6, "new"), False)]


def test_device_duplicate_filter_is_bounded():
    device = welcomed_device(remember=2)
    device.remember_ids(["a", "b", "c"])  # "a" falls out
    assert device.seen_ids == ["b", "c"]
    events = device.receive_data(frame(make_push(1, "a").to_dict()), 1.0)
    assert events[0].duplicate is False


def test_device_answers_ping_with_the_same_nonce():
    device = welcomed_device()
    assert device.receive_data(frame({"type": "ping", "nonce": 77}), 1.0) == []
    assert sent(device) == [{"type": "pong", "nonce": 77}]


def test_device_acks_only_forward():
    device = welcomed_device(hello={"last_ack": 5})
    device.ack(5)
    device.ack(3)
    assert device.data_to_send() == b""
    device.ack(6)
    assert sent(device) == [{"type": "ack", "seq": 6}]
    device.ack(6)
    assert device.data_to_send() == b""
    device.ack(9)
    assert sent(device) == [{"type": "ack", "seq": 9}]
    assert device.last_ack == 9


def test_device_call_and_unregister_frames():
    device = welcomed_device()
    device.call("ringing", "c1")
    device.unregister()
    assert sent(device) == [{"type": "call", "action": "ringing", "call_id": "c1"},
                            {"type": "unregister"}]


def test_device_gives_up_on_a_silent_gateway():
    device = welcomed_device(now=0.0, heartbeat=1.0)
    assert device.next_timer() == 3.0
    assert device.handle_timer(2.0) == []
    device.receive_data(frame({"type": "ping", "nonce": 1}), 2.0)  # heard at 2.0
    sent(device)
    assert device.next_timer() == 5.0
    assert device.handle_timer(4.99) == []
    events = device.handle_timer(5.0)
    assert_closed(events, ByeReason.HEARTBEAT_TIMEOUT, "gateway_silent")
    assert device.data_to_send() == b""  # gateway_silent is local: no bye
    assert_dead(device, 5.0)


def test_device_hears_a_transport_heartbeat_without_a_frame():
    """A QUIC PING never shows as a frame: the shell says the gateway was heard."""
    device = welcomed_device(now=0.0, heartbeat=1.0)
    device.heard(2.5)
    assert device.next_timer() == 5.5
    device.heard(1.0)  # an older moment never moves the deadline back
    assert device.next_timer() == 5.5
    assert device.handle_timer(5.4) == []
    assert_closed(device.handle_timer(5.5), ByeReason.HEARTBEAT_TIMEOUT, "gateway_silent")


def test_device_bye_from_gateway():
    device = welcomed_device()
    bye = {"type": "bye", "reason": "replaced", "code": "replaced", "message": "newer hello"}
    events = device.receive_data(frame(bye) + frame(make_push(1).to_dict()), 1.0)
    assert events == [Closed(reason="replaced", code="replaced", message="newer hello",
                             by_peer=True)]
    device.ack(1)
    device.call("busy", "c1")
    assert_dead(device, 1.0)


def test_device_bad_frame_from_gateway_is_reported_and_survived():
    device = welcomed_device()
    events = device.receive_data(frame({"type": "hologram"}) + frame({"type": "push"}), 1.0)
    assert [(type(e), e.error.code) for e in events] == [
        (ErrorReceived, "unknown_type"), (ErrorReceived, "missing_field")]
    assert device.closed is None
    events = device.receive_data(frame(make_push(1).to_dict()), 1.0)
    assert events == [PushReceived(make_push(1), False)]


def test_device_error_from_gateway_is_an_event():
    device = welcomed_device()
    events = device.receive_data(frame({"type": "error", "code": "bad_field",
                                        "message": "no"}), 1.0)
    assert [(type(e), e.error.code) for e in events] == [(ErrorReceived, "bad_field")]


def test_device_adopts_the_welcome_max_frame():
    big_push = make_push(1, payload={"blob": "x" * 20000})
    data = frame(big_push.to_dict())

    device = DeviceSession(make_hello(), now=0.0)  # before welcome: the 16 KiB default
    assert_closed(device.receive_data(data, 0.0), ByeReason.PROTOCOL_ERROR, "frame_too_large")

    device = DeviceSession(make_hello(), now=0.0)
    device.receive_data(frame(make_welcome(max_frame=65536).to_dict()), 0.0)
    assert device.receive_data(data, 0.0) == [PushReceived(big_push, False)]


# --- both ends together --------------------------------------------------------------


def test_gateway_and_device_agree_end_to_end():
    settings = SessionSettings(heartbeat=10.0, heartbeat_misses=3, hello_timeout=5.0)
    hello = make_hello(client="e2e")
    gw = GatewaySession(settings, now=0.0)
    device = DeviceSession(hello, now=0.0)

    # hello
    events = gw.receive_data(device.data_to_send(), 0.1)
    assert events == [HelloReceived(hello)]

    # welcome and a push, as the core would answer
    welcome = make_welcome(heartbeat=10.0, max_frame=settings.max_frame)
    push = make_push(1, "8e6a1d2c-6f49-4c8a-9d4b-0a1b2c3d4e5f", sent_at=0.2)
    gw.welcome(welcome, 0.2)
    gw.push(push)
    events = device.receive_data(gw.data_to_send(), 0.2)
    assert events == [Welcomed(welcome), PushReceived(push, False)]
    assert events[1].push.sent_at == 0.2

    # the device acks; the gateway sees the ack
    device.ack(push.seq)
    assert gw.receive_data(device.data_to_send(), 0.3) == [AckReceived(1)]

    # a redelivery of the same id is a duplicate at the device
    gw.push(make_push(2, push.id))
    events = device.receive_data(gw.data_to_send(), 0.4)
    assert events == [PushReceived(make_push(2, push.id), True)]

    # a call action goes the other way
    device.call("ringing", "call-1")
    assert gw.receive_data(device.data_to_send(), 0.5) == [
        CallActionReceived(CallAction("ringing", "call-1"))]

    # heartbeats for a long while: every ping is answered, neither end gives up
    t = 0.2
    for _ in range(20):
        t += 10.0
        assert gw.next_timer() == pytest.approx(t)
        assert gw.handle_timer(t) == []
        assert device.receive_data(gw.data_to_send(), t) == []
        assert gw.receive_data(device.data_to_send(), t) == []
        assert device.handle_timer(t) == []
        assert gw.misses == 0
    assert gw.closed is None
    assert device.closed is None

    # the gateway shuts down: the device hears why
    gw.close(ByeReason.SHUTDOWN)
    events = device.receive_data(gw.data_to_send(), t + 1)
    assert events == [Closed(reason="shutdown", by_peer=True)]
    assert device.data_to_send() == b""


def test_device_bye_reaches_the_gateway():
    gw = welcomed_gateway()
    device = welcomed_device()
    device.close(ByeReason.CLIENT)
    events = gw.receive_data(device.data_to_send(), 1.0)
    assert events == [Closed(reason="client", by_peer=True)]


def test_gateway_acks_owed_for_pushes_are_never_a_flood():
    """A reconnect with a backlog: one ack per push, all at once, far above the burst."""
    gw = welcomed_gateway(now=0.0)
    for seq in range(1, 101):
        gw.push(make_push(seq))
    acks = b"".join(frame({"type": "ack", "seq": n}) for n in range(1, 101))
    assert gw.receive_data(acks, 0.0) == [AckReceived(n) for n in range(1, 101)]
    assert gw.closed is None
    # once the owed answers are spent, unprompted acks count against the rate again
    more = b"".join(frame({"type": "ack", "seq": 100}) for _ in range(10))
    assert_closed(gw.receive_data(more, 0.0), ByeReason.FLOOD, "flood")
