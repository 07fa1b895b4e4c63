"""The lpgw/1 wire format, sans-IO: framing (frames.py) and message validation (messages.py)."""

from __future__ import annotations

import json

import pytest

from gateway.protocol.frames import (
    DEFAULT_MAX_FRAME,
    FrameDecoder,
    FrameError,
    MessageError,
    decode_body,
    encode_frame,
    encode_frame_spliced,
)
from gateway.protocol.messages import (
    DEVICE_MESSAGES,
    GATEWAY_MESSAGES,
    Bye,
    CallAction,
    Error,
    Hello,
    Ping,
    Push,
    Welcome,
    parse_message,
)

INSTALL_ID = "6f9619ff-8b86-4011-b42d-00c04fc964ff"


def over_the_wire(message: dict, table: dict[str, type]):
    """Encode a message dict as a frame, cut it out of the byte stream and parse it back."""
    bodies = FrameDecoder().feed(encode_frame(message))
    assert len(bodies) == 1
    return parse_message(decode_body(bodies[0]), table)


def hello_dict(**changes) -> dict:
    d = {"type": "hello", "version": 1, "install_id": INSTALL_ID, "topic": "com.example.phone",
         "push_types": ["voip", "alert"]}
    d.update(changes)
    return d


# --- framing -------------------------------------------------------------------------


def test_encode_frame_matches_the_spec_example():
    # docs/protocol.md section 4: 00 00 00 19 then {"type":"pong","nonce":1}
    body = b'{"type":"pong","nonce":1}'
    assert encode_frame({"type": "pong", "nonce": 1}) == b"\x00\x00\x00\x19" + body


def test_header_is_big_endian_and_counts_body_bytes_only():
    frame = encode_frame({"type": "push", "pad": "x" * 300})
    body = frame[4:]
    assert len(body) > 0xFF  # so that byte order shows in the header
    assert frame[:4] == len(body).to_bytes(4, "big")
    assert frame[:4] != len(body).to_bytes(4, "little")


def test_encode_frame_writes_compact_raw_utf8():
    frame = encode_frame({"type": "push", "text": "caf\u00e9"})
    body = frame[4:]
    assert body == '{"type":"push","text":"caf\u00e9"}'.encode()
    assert b"\\u" not in body  # not escaped
    assert int.from_bytes(frame[:4], "big") == len(body)  # bytes, not characters


def test_round_trip():
    message = {"type": "push", "seq": 3, "payload": {"aps": {"alert": "hi"}, "n": None}}
    decoder = FrameDecoder()
    bodies = decoder.feed(encode_frame(message))
    assert [decode_body(b) for b in bodies] == [message]
    assert decoder.pending == 0


def test_frame_split_byte_by_byte():
    message = {"type": "ack", "seq": 42}
    frame = encode_frame(message)
    decoder = FrameDecoder()
    for i, byte in enumerate(frame[:-1]):
        assert decoder.feed(bytes([byte])) == []
        assert decoder.pending == i + 1
    bodies = decoder.feed(frame[-1:])
    assert [decode_body(b) for b in bodies] == [message]
    assert decoder.pending == 0


def test_several_frames_in_one_feed_keep_their_order_and_the_rest_waits():
    messages = [{"type": "ack", "seq": n} for n in range(5)]
    data = b"".join(encode_frame(m) for m in messages)
    extra = encode_frame({"type": "pong", "nonce": 9})
    decoder = FrameDecoder()
    bodies = decoder.feed(data + extra[:7])
    assert [decode_body(b) for b in bodies] == messages
    assert decoder.pending == 7
    assert [decode_body(b) for b in decoder.feed(extra[7:])] == [{"type": "pong", "nonce": 9}]
    assert decoder.pending == 0


def test_empty_body_is_cut_out_and_is_bad_json():
    decoder = FrameDecoder()
    assert decoder.feed(b"\x00\x00\x00\x00") == [b""]
    with pytest.raises(MessageError) as info:
        decode_body(b"")
    assert info.value.code == "bad_json"


def test_frame_exactly_at_the_cap_is_accepted():
    decoder = FrameDecoder(max_frame=100)
    body = b"x" * 100
    assert decoder.feed(len(body).to_bytes(4, "big") + body) == [body]


def test_frame_over_the_cap_is_refused_from_its_header_alone():
    decoder = FrameDecoder(max_frame=100)
    with pytest.raises(FrameError) as info:
        decoder.feed((101).to_bytes(4, "big"))  # no body needed: the header says enough
    assert info.value.code == "frame_too_large"


def test_default_cap_is_16_kib():
    assert DEFAULT_MAX_FRAME == 16384
    decoder = FrameDecoder()
    assert decoder.feed((16384).to_bytes(4, "big")) == []  # allowed: waits for the body
    with pytest.raises(FrameError) as info:
        FrameDecoder().feed((16385).to_bytes(4, "big"))
    assert info.value.code == "frame_too_large"


def test_oversize_header_after_partial_header_bytes():
    decoder = FrameDecoder(max_frame=10)
    assert decoder.feed(b"\x00\x00") == []
    with pytest.raises(FrameError):
        decoder.feed(b"\x01\x00")  # 256 > 10


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"\xff\xfe{}", "bad_utf8"),
        (b'{"type":"ack","seq":\xc3}', "bad_utf8"),
        (b"not json", "bad_json"),
        (b'{"type":"ack"', "bad_json"),
        (b"[1, 2]", "not_object"),
        (b"3", "not_object"),
        (b'"hello"', "not_object"),
        (b"null", "not_object"),
    ],
)
def test_decode_body_refuses(body, code):
    with pytest.raises(MessageError) as info:
        decode_body(body)
    assert info.value.code == code


def test_decode_body_refuses_deeply_nested_json_as_bad_json():
    # 10 KB, well under the 16 KiB cap: a device can send this before hello.
    body = b'{"type":"ack","x":' + b"[" * 5000 + b"]" * 5000 + b"}"
    assert len(body) < DEFAULT_MAX_FRAME
    with pytest.raises(MessageError) as info:
        decode_body(body)
    assert info.value.code == "bad_json"


# --- messages: hello -----------------------------------------------------------------


def test_hello_parse_valid_fields():
    hello = Hello.parse(hello_dict(
        install_id=INSTALL_ID.upper(),  # Swift's uuidString spelling
        push_types=["voip", "alert", "voip"],
        assertion="eyJ.eyJ.sig",
        last_ack=41,
        gateway_id="lpgw-deck5",
        client="Phone/2.1 iOS/17.5",
    ))
    assert hello == Hello(version=1, install_id=INSTALL_ID, topic="com.example.phone",
                          push_types=("voip", "alert"), assertion="eyJ.eyJ.sig", last_ack=41,
                          gateway_id="lpgw-deck5", client="Phone/2.1 iOS/17.5")


def test_hello_optional_fields_default_and_null_counts_as_absent():
    hello = Hello.parse(hello_dict(assertion=None, last_ack=None, gateway_id=None))
    assert hello.assertion is None
    assert hello.last_ack == 0
    assert hello.gateway_id is None
    assert hello.client is None


def test_hello_client_is_cut_to_128_characters():
    assert Hello.parse(hello_dict(client="c" * 500)).client == "c" * 128


def test_hello_ignores_unknown_push_types_next_to_known_ones():
    assert Hello.parse(hello_dict(push_types=["hologram", "voip"])).push_types == ("voip",)


def test_hello_topic_of_155_characters_is_accepted():
    topic = "c" * 155
    assert Hello.parse(hello_dict(topic=topic)).topic == topic


def test_hello_assertion_of_8192_characters_is_accepted():
    assert len(Hello.parse(hello_dict(assertion="a" * 8192)).assertion) == 8192


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"version": None}, "missing_field"),
        ({"install_id": None}, "missing_field"),
        ({"topic": None}, "missing_field"),
        ({"push_types": None}, "missing_field"),
        ({"install_id": "not-a-uuid"}, "bad_field"),
        ({"install_id": INSTALL_ID[:-1]}, "bad_field"),
        ({"install_id": 12345}, "bad_field"),
        ({"topic": ""}, "bad_field"),
        ({"topic": ".com.example"}, "bad_field"),
        ({"topic": "com.example app"}, "bad_field"),
        ({"topic": "com.example.app\n"}, "bad_field"),
        ({"topic": "c" * 156}, "bad_field"),
        ({"topic": 7}, "bad_field"),
        ({"push_types": []}, "bad_field"),
        ({"push_types": ["hologram"]}, "bad_field"),
        ({"push_types": "voip"}, "bad_field"),
        ({"push_types": ["voip", 3]}, "bad_field"),
        ({"version": True}, "bad_field"),
        ({"version": 1.0}, "bad_field"),
        ({"version": "1"}, "bad_field"),
        ({"last_ack": True}, "bad_field"),
        ({"last_ack": -1}, "bad_field"),
        ({"last_ack": 2**53}, "bad_field"),
        ({"last_ack": 1.5}, "bad_field"),
        ({"assertion": "a" * 8193}, "bad_field"),
        ({"assertion": 5}, "bad_field"),
        ({"client": False}, "bad_field"),
    ],
)
def test_hello_parse_refuses(changes, code):
    with pytest.raises(MessageError) as info:
        Hello.parse(hello_dict(**changes))
    assert info.value.code == code


def test_hello_last_ack_upper_bound_is_inclusive_of_2_pow_53_minus_1():
    assert Hello.parse(hello_dict(last_ack=2**53 - 1)).last_ack == 2**53 - 1


def test_hello_round_trip():
    hello = Hello(version=1, install_id=INSTALL_ID, topic="com.example.phone",
                  push_types=("voip",), assertion="a.b.c", last_ack=7, gateway_id="gw",
                  client="test")
    assert over_the_wire(hello.to_dict(), DEVICE_MESSAGES) == hello


# --- messages: dispatch --------------------------------------------------------------


@pytest.mark.parametrize(
    ("d", "table", "code"),
    [
        ({"type": "teleport"}, DEVICE_MESSAGES, "unknown_type"),
        ({"type": "ping", "nonce": 1}, DEVICE_MESSAGES, "unknown_type"),  # gateway-only
        ({"type": "welcome"}, DEVICE_MESSAGES, "unknown_type"),
        ({"type": "ack", "seq": 1}, GATEWAY_MESSAGES, "unknown_type"),  # device-only
        ({}, DEVICE_MESSAGES, "missing_field"),
        ({"type": None}, DEVICE_MESSAGES, "missing_field"),
        ({"type": 3}, DEVICE_MESSAGES, "missing_field"),
        ({"type": "ack"}, DEVICE_MESSAGES, "missing_field"),
        ({"type": "ack", "seq": "1"}, DEVICE_MESSAGES, "bad_field"),
        ({"type": "ack", "seq": False}, DEVICE_MESSAGES, "bad_field"),
        ({"type": "pong", "nonce": -3}, DEVICE_MESSAGES, "bad_field"),
        ({"type": "call", "action": "answer", "call_id": "c1"}, DEVICE_MESSAGES, "bad_field"),
        ({"type": "call", "action": "busy", "call_id": ""}, DEVICE_MESSAGES, "bad_field"),
        ({"type": "call", "action": "busy", "call_id": "c" * 257}, DEVICE_MESSAGES,
         "bad_field"),
        ({"type": "bye", "reason": 5}, DEVICE_MESSAGES, "bad_field"),
    ],
)
def test_parse_message_refuses(d, table, code):
    with pytest.raises(MessageError) as info:
        parse_message(d, table)
    assert info.value.code == code


def test_parse_message_ignores_unknown_members():
    ack = parse_message({"type": "ack", "seq": 5, "future": {"x": 1}}, DEVICE_MESSAGES)
    assert ack.seq == 5


def test_bye_without_reason_reads_client():
    assert parse_message({"type": "bye"}, DEVICE_MESSAGES) == Bye(reason="client")


# --- messages: round trips -----------------------------------------------------------


def test_welcome_round_trip():
    welcome = Welcome(version=1, token="ab" * 32, heartbeat=2.5, gateway_id="lpgw-deck5",
                      user="alice", max_frame=32768)
    assert over_the_wire(welcome.to_dict(), GATEWAY_MESSAGES) == welcome


def test_welcome_without_max_frame_assumes_16_kib():
    d = Welcome(version=1, token="ab" * 32, heartbeat=10, gateway_id="g").to_dict()
    del d["max_frame"]
    welcome = parse_message(d, GATEWAY_MESSAGES)
    assert welcome.max_frame == DEFAULT_MAX_FRAME
    assert welcome.heartbeat == 10.0
    assert isinstance(welcome.heartbeat, float)


def test_push_round_trip():
    push = Push(seq=42, id="8e6a1d2c-6f49-4c8a-9d4b-0a1b2c3d4e5f", push_type="voip",
                priority=10, expiration=1767225600, payload={"call": {"id": "a8", "n": None}},
                collapse_id="c1", sent_at=1767225570.125)
    back = over_the_wire(push.to_dict(), GATEWAY_MESSAGES)
    assert back == push
    assert back.sent_at == 1767225570.125  # compare=False in the dataclass: check it apart
    assert back.payload == {"call": {"id": "a8", "n": None}}


def test_push_sent_at_goes_out_with_three_decimals():
    push = Push(seq=1, id="i", push_type="alert", priority=5, expiration=0, payload={"a": 1},
                sent_at=100.123456)
    assert push.to_dict()["sent_at"] == 100.123
    assert "collapse_id" not in push.to_dict()


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"payload": None}, "missing_field"),
        ({"payload": [1]}, "bad_field"),
        ({"priority": True}, "bad_field"),
        ({"seq": -1}, "bad_field"),
    ],
)
def test_push_parse_refuses(changes, code):
    d = Push(seq=1, id="i", push_type="alert", priority=10, expiration=0,
             payload={"a": 1}).to_dict()
    d.update(changes)
    with pytest.raises(MessageError) as info:
        Push.parse(d)
    assert info.value.code == code


def test_numbers_too_big_for_a_float_are_a_message_error():
    # JSON happily carries a 400-digit integer; float() of it raises OverflowError.
    huge = json.loads("1" + "0" * 400)
    push = Push(seq=1, id="i", push_type="alert", priority=10, expiration=0,
                payload={"a": 1}).to_dict()
    with pytest.raises(MessageError) as info:
        Push.parse({**push, "sent_at": huge})
    assert info.value.code == "bad_field"
    welcome = Welcome(version=1, token="ab" * 32, heartbeat=10.0, gateway_id="g").to_dict()
    with pytest.raises(MessageError) as info:
        Welcome.parse({**welcome, "heartbeat": huge})
    assert info.value.code == "bad_field"


@pytest.mark.parametrize(
    ("message", "table"),
    [
        (Ping(nonce=7), GATEWAY_MESSAGES),
        (Error(code="bad_field", message="'seq' must be an integer"), GATEWAY_MESSAGES),
        (Bye(reason="client"), DEVICE_MESSAGES),
        (Bye(reason="unsupported_version", code="unsupported_version",
             message="version 2 is not spoken here", versions=(1,)), GATEWAY_MESSAGES),
        (CallAction(action="ringing", call_id="a84b4c76e66710"), DEVICE_MESSAGES),
        (CallAction(action="decline", call_id="c" * 256), DEVICE_MESSAGES),
    ],
)
def test_message_round_trip(message, table):
    assert over_the_wire(message.to_dict(), table) == message


@pytest.mark.parametrize("payload", [{}, {"aps": {"alert": "Bed 12"}}, {"ü": ["ß", 1.5, None]}])
def test_a_spliced_payload_is_the_same_frame(payload):
    """The gateway writes a stored payload's JSON as is; the bytes match encoding it anew."""
    head = {"type": "push", "seq": 3, "id": "x"}
    raw = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    assert encode_frame_spliced(head, "payload", raw) == encode_frame({**head, "payload": payload})
