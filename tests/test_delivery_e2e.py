"""Devices over real QUIC and TLS sockets on 127.0.0.1, pushes through the control socket."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway import internals
from tests.conftest import eventually, new_install, send

TRANSPORTS = ["quic", "tls"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_first_connect_gives_a_stable_token(gateway_factory, devices, tmp_path, transport):
    gw = await gateway_factory()
    install = new_install()
    first = devices(gw, transport, install_id=install)
    token = await first.welcome()
    assert len(token) == 64 and token == token.lower()
    int(token, 16)
    assert gw.delivery.connected() == {token: transport}
    await first.stop()

    other = devices(gw, transport)  # another install, another token
    assert await other.welcome() != token
    await other.stop()

    await gw.stop()  # the same state directory, a new process of the gateway
    gw2 = await gateway_factory(state=tmp_path / "state")
    again = devices(gw2, transport, install_id=install)
    assert await again.welcome() == token


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_push_is_delivered_and_acked(gateway, devices, transport):
    device = devices(gateway, transport)
    token = await device.welcome()
    payload = {"aps": {"alert": {"title": "Bed 12", "body": "call"}}, "n": 1, "ü": "✓"}
    reply = await send(gateway, token, payload, push_type="alert", priority=5)
    assert reply["ok"] and reply["sent"] and reply["stored"]
    push = await device.next("push")
    assert push["id"] == reply["push_id"]
    assert push["payload"] == payload
    assert push["priority"] == 5 and push["push_type"] == "alert" and not push["duplicate"]
    await eventually(lambda: gateway.store.count_pending(token) == 0)
    assert gateway.metrics.value("lpgw_pushes_delivered_total") == 1
    assert gateway.metrics.value("lpgw_delivery_latency_seconds_count") == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_unacked_pushes_are_sent_again_after_reconnect(gateway, devices, transport):
    install = new_install()
    lazy = devices(gateway, transport, install_id=install, ack=False, reconnect=False)
    token = await lazy.welcome()
    ids = [(await send(gateway, token, {"n": i}))["push_id"] for i in range(3)]
    got = [(await lazy.next("push"))["id"] for _ in ids]
    assert got == ids
    await lazy.stop()
    await eventually(lambda: not gateway.delivery.is_connected(token))

    ids.append((await send(gateway, token, {"n": 3}))["push_id"])  # queued while away
    back = devices(gateway, transport, install_id=install)
    assert await back.welcome() == token
    again = [await back.next("push") for _ in ids]
    assert [p["id"] for p in again] == ids
    assert [p["payload"]["n"] for p in again] == [0, 1, 2, 3]
    assert [p["seq"] for p in again] == sorted(p["seq"] for p in again)
    await eventually(lambda: gateway.store.count_pending(token) == 0)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_device_drops_duplicates_by_push_id(gateway, devices, transport):
    install = new_install()
    device = devices(gateway, transport, install_id=install, ack=False)
    token = await device.welcome()
    reply = await send(gateway, token, {"x": 1})
    assert not (await device.next("push"))["duplicate"]
    # the connection breaks before the ack; the same client (same memory) reconnects
    device.client._on_lost("simulated break")
    await device.next("welcome")
    again = await device.next("push")
    assert again["id"] == reply["push_id"] and again["duplicate"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_second_connection_replaces_the_first(gateway, devices, transport):
    install = new_install()
    first = devices(gateway, transport, install_id=install)
    token = await first.welcome()
    other = "tls" if transport == "quic" else "quic"
    second = devices(gateway, other, install_id=install)
    assert await second.welcome() == token
    bye = await first.next("disconnected")
    assert bye["reason"] == "replaced"
    assert await asyncio.wait_for(first.task, 5) == "replaced"  # and it does not come back
    assert gateway.delivery.connected() == {token: other}
    await send(gateway, token, {"after": "replace"})
    assert (await second.next("push"))["payload"] == {"after": "replace"}
    assert gateway.metrics.value("lpgw_devices_connected", transport=transport) == 0
    assert gateway.metrics.value("lpgw_devices_connected", transport=other) == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_expiration_zero_and_past(gateway, devices, transport):
    install = new_install()
    device = devices(gateway, transport, install_id=install, reconnect=False)
    token = await device.welcome()
    now_only = await send(gateway, token, {"now": True}, expiration=0)
    assert now_only["ok"] and now_only["sent"] and not now_only["stored"]
    assert (await device.next("push"))["payload"] == {"now": True}
    await device.stop()
    await eventually(lambda: not gateway.delivery.is_connected(token))

    gone = await send(gateway, token, {"now": "missed"}, expiration=0)
    assert gone["ok"] and not gone["sent"] and not gone["stored"]
    past = await send(gateway, token, {"past": True}, expiration=int(time.time()) - 10)
    assert past["ok"] and not past["stored"]
    soon = await send(gateway, token, {"soon": True}, expiration=int(time.time()) + 1)
    assert soon["stored"]
    kept = await send(gateway, token, {"kept": True})
    await asyncio.sleep(2.1)  # let "soon" pass its expiration while the device is away

    back = devices(gateway, transport, install_id=install)
    await back.welcome()
    assert (await back.next("push"))["payload"] == {"kept": True}
    with pytest.raises(TimeoutError):
        await back.next("push", timeout=0.5)
    assert kept["ok"]
    assert gateway.metrics.value("lpgw_pushes_expired_total") == 3


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_collapse_id_keeps_only_the_newest(gateway, devices, transport):
    install = new_install()
    device = devices(gateway, transport, install_id=install, reconnect=False)
    token = await device.welcome()
    await device.stop()
    await eventually(lambda: not gateway.delivery.is_connected(token))
    for i in range(3):
        await send(gateway, token, {"score": i}, collapse_id="match-1")
    await send(gateway, token, {"other": True})
    back = devices(gateway, transport, install_id=install)
    await back.welcome()
    first, second = await back.next("push"), await back.next("push")
    assert [first["payload"], second["payload"]] == [{"score": 2}, {"other": True}]
    assert first["collapse_id"] == "match-1"
    assert gateway.metrics.value("lpgw_pushes_dropped_total", reason="collapsed") == 2


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_queue_is_bounded_and_drops_are_counted(gateway_factory, devices, transport):
    gw = await gateway_factory(delivery={"queue_limit": 2})
    install = new_install()
    device = devices(gw, transport, install_id=install, reconnect=False)
    token = await device.welcome()
    await device.stop()
    await eventually(lambda: not gw.delivery.is_connected(token))
    for i in range(5):
        assert (await send(gw, token, {"i": i}))["ok"]
    back = devices(gw, transport, install_id=install)
    await back.welcome()
    assert [(await back.next("push"))["payload"]["i"] for _ in range(2)] == [3, 4]
    assert gw.metrics.value("lpgw_pushes_dropped_total", reason="queue_full") == 3


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_unregister_then_pushes_are_refused(gateway, devices, transport):
    install = new_install()
    device = devices(gateway, transport, install_id=install)
    token = await device.welcome()
    device.client.unregister()
    assert (await device.next("disconnected"))["reason"] == "unregistered"
    reply = await send(gateway, token)
    assert reply["reason"] == "Unregistered" and reply["timestamp"] > 0
    again = devices(gateway, transport, install_id=install)  # the app registers again
    assert await again.welcome() == token
    assert (await send(gateway, token))["ok"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_heartbeats_keep_a_healthy_device(gateway_factory, devices, transport):
    gw = await gateway_factory(protocol={"heartbeat": 0.1, "heartbeat_misses": 2})
    device = devices(gw, transport)
    token = await device.welcome()
    await asyncio.sleep(1.0)  # ten heartbeats
    assert gw.delivery.is_connected(token)
    assert gw.metrics.value("lpgw_heartbeat_timeouts_total") == 0
    assert [e for e in device.log if e["event"] == "disconnected"] == []


async def test_quic_device_keeps_its_session_when_its_address_changes(gateway, devices):
    device = devices(gateway, "quic")
    token = await device.welcome()
    before = device.client._quic._transport.get_extra_info("sockname")[1]
    await device.client.migrate()
    moved = await device.next("migrated")
    assert moved["local"] != before
    await asyncio.sleep(0.3)  # path validation
    reply = await send(gateway, token, {"after": "move"})
    assert (await device.next("push"))["id"] == reply["push_id"]
    assert [e for e in device.log if e["event"] in ("disconnected", "reconnecting")] == []
    assert gateway.metrics.value("lpgw_handshakes_total", transport="quic",
                                 result="welcome") == 1
    # the gateway now talks to the new port
    (conn,) = set(gateway._quic._protocols.values())  # one connection, several ids
    assert internals.peer_address(internals.connection_of(conn))[1] == moved["local"]


async def test_quic_connections_that_end_leave_no_ids_behind(gateway, devices):
    """The listener forgets a connection by its own ids (not aioquic's scan of all of
    them), including ids issued and retired by a migration."""
    ids = gateway._quic._protocols
    assert "_connection_terminated" in vars(gateway._quic)  # ours, not aioquic's O(N) scan
    kept = devices(gateway, "quic")
    token = await kept.welcome()
    kept_ids = set(ids)
    ending = [devices(gateway, "quic") for _ in range(3)]
    for d in ending:
        await d.welcome()
    await ending[0].client.migrate()
    await ending[0].next("migrated")
    await asyncio.sleep(0.3)
    assert len(set(ids.values())) == 4 and len(ids) > 8
    for d in ending:
        await d.stop()
    await eventually(lambda: set(ids) == kept_ids)
    assert (await send(gateway, token, {"still": "here"}))["sent"]


async def test_wrong_pin_is_refused_before_hello(gateway, devices):
    device = devices(gateway, "tls", reconnect=False)
    device.client.o.pin = "sha256/" + "A" * 43 + "="
    event = await device.next("disconnected")
    assert event["reason"] == "pin_mismatch"
    assert gateway.metrics.value("lpgw_handshakes_total", transport="tls", result="welcome") == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_logs_hold_no_full_token_install_id_or_assertion(gateway, devices, caplog,
                                                               transport):
    caplog.set_level("DEBUG")
    install = new_install()
    device = devices(gateway, transport, install_id=install, assertion="not.a.jwt")
    token = await device.welcome()
    await send(gateway, token, {"secret": "payload"})
    await device.next("push")
    device.client.unregister()
    await device.next("disconnected")
    assert token[:8] in caplog.text  # the logs do speak of the device...
    for secret in (token, install, "not.a.jwt", "payload"):
        assert secret not in caplog.text  # ...but never in full


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_user_assertion_binds_and_bad_ones_are_refused(gateway_factory, devices, tmp_path,
                                                             transport):
    import jwt

    secret = "k" * 40
    (tmp_path / "jwt.secret").write_text(secret)
    gw = await gateway_factory(assertions={"hs256_secret_file": str(tmp_path / "jwt.secret"),
                                           "required": True})
    good = jwt.encode({"sub": "nurse.alice", "exp": int(time.time()) + 60}, secret, "HS256")
    device = devices(gw, transport, assertion=good)
    assert (await device.next("welcome"))["user"] == "nurse.alice"

    expired = jwt.encode({"sub": "bob", "exp": int(time.time()) - 600}, secret, "HS256")
    forged = jwt.encode({"sub": "bob", "exp": int(time.time()) + 60}, "x" * 40, "HS256")
    for assertion, words in ((expired, "expired"), (forged, "Signature"), (None, "requires")):
        refused = devices(gw, transport, assertion=assertion)
        bye = await refused.next("disconnected")
        assert bye["reason"] == "unauthorized" and words in bye["message"]
        assert await asyncio.wait_for(refused.task, 5) == "unauthorized"
    assert gw.metrics.value("lpgw_handshakes_total", transport=transport,
                            result="unauthorized") == 3


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_call_actions_reach_the_core(gateway, devices, transport):
    heard = []

    class Calls:  # where the pump hands what devices did about calls (no SIP here)
        def device_event(self, event):
            heard.append((event.token, event.action.action, event.action.call_id))

        def answers_to_send(self):
            return []

    gateway.pump.calls = Calls()
    device = devices(gateway, transport)
    token = await device.welcome()
    device.client.call("ringing", "call-7")
    device.client.call("busy", "call-8")
    await eventually(lambda: len(heard) == 2)
    assert heard == [(token, "ringing", "call-7"), (token, "busy", "call-8")]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_dead_connection_cannot_speak_into_the_next(gateway, devices, transport):
    """Found by the SIGKILL test: a QUIC close completes later, and its late events once
    ended the device's new connection and fed it the old stream's bytes."""
    device = devices(gateway, transport)
    await device.welcome()
    old = device.client._quic if transport == "quic" else None
    old_callbacks = (old.on_data, old.on_lost) if old else None
    device.client.session.close("client")  # the device leaves; it reconnects by itself
    device.client._flush()
    device.client._finish("test")
    await device.next("welcome")
    if old is not None:
        assert (old.on_data, old.on_lost) != old_callbacks
        old.on_data(b"\x00\x00\x10\x00garbage")  # what a late stream frame would do
        old.on_lost("QUIC closed: bye")
    await asyncio.sleep(0.3)
    assert device.client.session.closed is None  # the new connection is untouched


async def _ticket_after_request(port: int, alpn: str, request: bytes) -> bool:
    """Whether the server sent a TLS 1.3 session ticket once the client had read a reply."""
    from tests.rawpeer import RawTls
    peer = await RawTls.open(port, alpn=[alpn])
    try:
        await peer.send_bytes(request)
        await asyncio.wait_for(peer.incoming.get(), 5)
        ssl_object = peer.writer.get_extra_info("ssl_object")
        assert ssl_object.version() == "TLSv1.3"
        return ssl_object.session is not None and ssl_object.session.has_ticket
    finally:
        await peer.close()


async def test_the_device_port_sends_no_session_tickets_the_api_does(gateway_factory):
    """Devices never resume: a ticket per connect would be work for nothing in a storm.
    The API keeps OpenSSL's tickets (app servers do resume); it is also the control that
    shows this client sees tickets when they are sent."""
    from gateway.protocol.frames import encode_frame
    from tests.rawpeer import hello
    gw = await gateway_factory(api={"host": "127.0.0.1", "port": 0})
    assert not await _ticket_after_request(gw.listening.port, "lpgw/1", encode_frame(hello()))
    assert await _ticket_after_request(gw.api_port, "http/1.1",
                                       b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
