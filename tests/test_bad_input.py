"""Bad input from devices: each gets a clear error or bye, is counted, and harms no one else."""

from __future__ import annotations

import asyncio
import ssl
import struct

import pytest

from tests.conftest import send
from tests.rawpeer import RawTls, hello, open_raw

TRANSPORTS = ["quic", "tls"]


@pytest.fixture
async def gw(gateway_factory):
    return await gateway_factory(protocol={"hello_timeout": 0.5, "heartbeat": 0.2,
                                           "heartbeat_misses": 2, "frame_burst": 50,
                                           "frame_rate": 20})


@pytest.fixture
async def bystander(gw, devices):
    """A well-behaved device that must not notice anything."""
    device = devices(gw, "quic")
    token = await device.welcome()
    yield token
    reply = await send(gw, token, {"still": "here"})
    assert reply["sent"]
    assert (await device.next("push"))["payload"] == {"still": "here"}
    assert [e for e in device.log if e["event"] == "disconnected"] == []


async def welcomed(transport: str, port: int):
    peer = await open_raw(transport, port)
    await peer.send(hello())
    welcome = await peer.read()
    assert welcome["type"] == "welcome"
    return peer


def errors(gw, code: str) -> float:
    return gw.metrics.value("lpgw_protocol_errors_total", code=code)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_oversize_frame_closes_with_protocol_error(gw, bystander, transport):
    peer = await welcomed(transport, gw.listening.port)
    await peer.send_bytes(struct.pack("!I", 20000) + b"{" * 100)
    frames = await peer.read_until_closed()
    assert frames[-1]["type"] == "bye"
    assert frames[-1]["reason"] == "protocol_error" and frames[-1]["code"] == "frame_too_large"
    assert "16384" in frames[-1]["message"]
    assert errors(gw, "frame_too_large") == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(("body", "code"), [
    (b"not json at all", "bad_json"),
    (b"\xff\xfe", "bad_utf8"),
    (b"[1, 2, 3]", "not_object"),
    (b'{"type": "teleport"}', "unknown_type"),
    (b'{"type": "ack"}', "missing_field"),
    (b'{"type": "ack", "seq": "seven"}', "bad_field"),
    (b'{"seq": 1}', "missing_field"),
])
async def test_bad_frames_get_an_error_and_the_connection_lives(gw, bystander, transport, body,
                                                               code):
    peer = await welcomed(transport, gw.listening.port)
    await peer.send_bytes(struct.pack("!I", len(body)) + body)
    error = await peer.read()
    assert error["type"] == "error" and error["code"] == code and error["message"]
    await peer.send({"type": "ack", "seq": 0})  # still usable
    ping = await peer.read()
    assert ping["type"] == "ping"
    assert errors(gw, code) == 1
    await peer.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_too_many_bad_frames_close_the_connection(gw, bystander, transport):
    peer = await welcomed(transport, gw.listening.port)
    for _ in range(6):
        await peer.send_bytes(struct.pack("!I", 3) + b"bad")
    frames = await peer.read_until_closed()
    assert [f["type"] for f in frames if f["type"] != "ping"] == ["error"] * 5 + ["bye"]
    assert frames[-1]["reason"] == "protocol_error"


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(("first", "code"), [
    ({"type": "ack", "seq": 1}, "hello_required"),
    ({"type": "hello", "version": 1}, "missing_field"),
    (hello(install_id="not-a-uuid"), "bad_field"),
    (hello(push_types=["carrier-pigeon"]), "bad_field"),
])
async def test_anything_but_a_valid_hello_first_is_refused(gw, bystander, transport, first, code):
    peer = await open_raw(transport, gw.listening.port)
    await peer.send(first)
    frames = await peer.read_until_closed()
    assert frames == [frames[-1]] and frames[-1]["type"] == "bye"
    assert frames[-1]["reason"] == "protocol_error" and frames[-1]["code"] == code
    assert errors(gw, code) == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_unknown_version_is_refused_with_the_versions_spoken(gw, bystander, transport):
    peer = await open_raw(transport, gw.listening.port)
    await peer.send(hello(version=9))
    (bye,) = await peer.read_until_closed()
    assert bye["reason"] == "unsupported_version" and bye["versions"] == [1]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_second_hello_is_refused(gw, bystander, transport):
    peer = await welcomed(transport, gw.listening.port)
    await peer.send(hello())
    frames = await peer.read_until_closed()
    assert frames[-1]["reason"] == "protocol_error" and frames[-1]["code"] == "duplicate_hello"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_flood_of_frames_is_cut_off(gw, bystander, transport):
    peer = await welcomed(transport, gw.listening.port)
    flood = b"".join(struct.pack("!I", 27) + b'{"type":"pong","nonce":123}' for _ in range(500))
    await peer.send_bytes(flood)
    frames = await peer.read_until_closed()
    assert frames[-1]["reason"] == "flood"
    assert gw.metrics.value("lpgw_disconnects_total", transport=transport, reason="flood") == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_silent_peer_is_closed_after_the_hello_timeout(gw, bystander, transport):
    peer = await open_raw(transport, gw.listening.port)
    loop = asyncio.get_running_loop()
    started = loop.time()
    frames = await peer.read_until_closed(timeout=3)
    if transport == "tls":
        assert [f["reason"] for f in frames] == ["hello_timeout"]
    else:  # no stream yet to carry a bye: the reason travels in CONNECTION_CLOSE
        assert frames == [] and peer.close_reason == "hello_timeout"
    assert 0.4 < loop.time() - started < 2.5
    assert errors(gw, "hello_timeout") == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_device_that_stops_answering_pings_is_dropped(gw, bystander, transport):
    peer = await welcomed(transport, gw.listening.port)
    peer.mute()  # TLS: answers no ping frame; QUIC: its stack acknowledges no PING frame
    frames = await peer.read_until_closed(timeout=3)
    if transport == "tls":
        assert [f["type"] for f in frames] == ["ping", "ping", "bye"]
    else:  # PING frames, with aioquic's own probes for the unacknowledged ones
        assert len(frames) >= 3 and {f["type"] for f in frames[:-1]} == {"ping"}
    assert frames[-1]["type"] == "bye" and frames[-1]["reason"] == "heartbeat_timeout"
    assert gw.metrics.value("lpgw_heartbeat_timeouts_total") == 1


async def test_tcp_peer_that_never_starts_tls_is_closed(gw, bystander):
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.listening.port)
    async with asyncio.timeout(3):
        assert await reader.read() == b""  # closed by the gateway
    writer.close()
    assert errors(gw, "tls_handshake") == 1


async def test_tls_with_the_wrong_alpn_is_refused(gw, bystander):
    try:
        peer = await RawTls.open(gw.listening.port, alpn=["h2"])
    except (ssl.SSLError, ConnectionError):
        pass  # refused inside the handshake
    else:
        assert await peer.read_until_closed() == []
    assert errors(gw, "tls_handshake") == 1
    assert gw.delivery.connected() == {bystander: "quic"}


async def test_quic_with_the_wrong_alpn_is_refused(gw, bystander):
    with pytest.raises(ConnectionError):
        await open_raw("quic", gw.listening.port, alpn=["h2"])


async def test_garbage_tls_bytes_are_refused(gw, bystander):
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.listening.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(3):
        while await reader.read(4096):
            pass
    writer.close()
    assert errors(gw, "tls_handshake") == 1


async def test_a_second_quic_stream_is_refused_and_the_first_lives(gw, bystander):
    peer = await welcomed("quic", gw.listening.port)
    quic = peer.protocol._quic
    extra = quic.get_next_available_stream_id()
    quic.send_stream_data(extra, b"\x00\x00\x00\x02{}")
    peer.protocol.transmit()
    async with asyncio.timeout(3):
        while errors(gw, "extra_stream") < 1:
            await asyncio.sleep(0.02)
    await peer.send({"type": "teleport"})  # the session stream still works: it answers
    frame = await peer.read()
    while frame["type"] == "ping":  # QUIC PINGs (the heartbeat) are shown as they come
        frame = await peer.read()
    assert (frame["type"], frame["code"]) == ("error", "unknown_type")
