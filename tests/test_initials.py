"""A QUIC listener under load: the order new connections start in (sans-IO), the header
peek, work between reads, and the socket buffer that holds a storm."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import subprocess
import sys

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from gateway.protocol.frames import FrameDecoder, decode_body
from gateway.transport import quic
from gateway.transport.initials import InitialQueue, new_connection_id
from tests.conftest import send
from tests.rawpeer import RawQuic, hello


def client_initial() -> tuple[bytes, bytes]:
    """The first datagram of a real aioquic client, and the connection id it chose."""
    conn = QuicConnection(configuration=QuicConfiguration(
        is_client=True, alpn_protocols=["lpgw/1"], verify_mode=ssl.CERT_NONE))
    conn.connect(("127.0.0.1", 4433), now=0.0)
    return conn.datagrams_to_send(now=0.0)[0][0], conn.original_destination_connection_id


def test_the_connection_id_of_a_real_initial_is_read():
    initial, cid = client_initial()
    assert len(cid) == 8 and new_connection_id(initial) == cid


def test_anything_but_a_v1_initial_is_not_taken():
    initial, _ = client_initial()
    assert new_connection_id(b"") is None
    assert new_connection_id(b"\x40" + initial[1:]) is None  # short header
    assert new_connection_id(bytes([initial[0] | 0x20]) + initial[1:]) is None  # Handshake
    assert new_connection_id(initial[:1] + b"\x00\x00\x00\x02" + initial[5:]) is None
    assert new_connection_id(initial[:5] + b"\x30" + initial[6:]) is None  # id over 20
    assert new_connection_id(initial[:8]) is None  # cut inside the id


def test_the_most_recently_heard_starts_first_and_retransmissions_join_their_connection():
    q = InitialQueue(limit=10)
    q.offer(b"a", b"a1", "A")
    q.offer(b"b", b"b1", "B")
    q.offer(b"a", b"a2", "A")  # a retransmits: heard last, so it goes first
    assert len(q) == 2
    assert q.take() == [(b"a1", "A"), (b"a2", "A")]
    assert q.take() == [(b"b1", "B")]
    assert q.take() is None


def test_a_connection_keeps_its_last_few_datagrams():
    q = InitialQueue(per_connection=2)
    for n in range(5):
        q.offer(b"a", f"a{n}".encode(), "A")
    assert q.take() == [(b"a3", "A"), (b"a4", "A")]


def test_when_full_the_one_heard_from_longest_ago_is_dropped_and_counted():
    q = InitialQueue(limit=2)
    assert q.offer(b"a", b"a1", "A") == 0
    assert q.offer(b"b", b"b1", "B") == 0
    assert q.offer(b"a", b"a2", "A") == 0  # a is fresh again; b is now the oldest
    assert q.offer(b"c", b"c1", "C") == 1
    assert q.dropped == 1
    assert [q.take()[0][0], q.take()[0][0]] == [b"c1", b"a1"]


async def test_a_burst_of_new_phones_is_started_and_all_are_welcomed(gateway_factory, devices):
    """Many QUIC handshakes at once through the queue: every one ends in a welcome."""
    gw = await gateway_factory()
    phones = [devices(gw, "quic") for _ in range(30)]
    tokens = await asyncio.gather(*(p.welcome() for p in phones))
    assert len(set(tokens)) == 30
    assert gw.metrics.value("lpgw_quic_initials_dropped_total") == 0
    await asyncio.sleep(0.05)  # the last acknowledgements in flight
    assert len(gw._quic._initials) == 0 and not gw._quic._backlog and not gw._quic._working


async def test_phones_dropped_from_a_full_queue_are_counted_and_answered_when_they_retry(
        gateway_factory):
    gw = await gateway_factory()
    gw._quic._initials = InitialQueue(limit=1)  # a storm in miniature
    port = gw.listening.port
    phones = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(5)]
    try:
        initials = [client_initial()[0] for _ in phones]
        for sock in phones:
            sock.setblocking(False)
            sock.bind(("127.0.0.1", 0))
        # all five read in one turn, as uvloop reads a busy socket (up to 32 datagrams a
        # wake-up; asyncio's own loop reads one)
        for sock, initial in zip(phones, initials, strict=True):
            gw._quic.datagram_received(initial, sock.getsockname())

        async def answered(sock) -> bool:
            await asyncio.sleep(0.3)
            try:
                return bool(sock.recv(65536))
            except BlockingIOError:
                return False

        got = [await answered(s) for s in phones]
        assert got == [False, False, False, False, True]  # the last heard was started
        assert gw.metrics.value("lpgw_quic_initials_dropped_total") == 4
        for sock, initial in zip(phones[:4], initials, strict=False):  # each retries
            sock.sendto(initial, ("127.0.0.1", port))
            assert await answered(sock)
    finally:
        for sock in phones:
            sock.close()


def stray_packet() -> bytes:
    """A short-header packet of no connection: aioquic drops it without a word."""
    return b"\x40" + os.urandom(40)


async def test_known_packets_are_handled_in_slices_before_a_new_connection_starts(
        gateway_factory, monkeypatch):
    """Work between reads is bounded, and a new handshake waits until the backlog is done."""
    monkeypatch.setattr(quic, "WORK_SLICE", 0.0)  # one datagram per turn of the loop
    gw = await gateway_factory()
    server = gw._quic
    phone = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        phone.bind(("127.0.0.1", 0))
        phone.setblocking(False)
        initial, cid = client_initial()
        for _ in range(5):
            server.datagram_received(stray_packet(), ("127.0.0.1", 9))
        server.datagram_received(initial, phone.getsockname())
        assert (len(server._backlog), len(server._initials)) == (5, 1)
        await asyncio.sleep(0)  # one slice
        assert (len(server._backlog), len(server._initials)) == (4, 1)
        for _ in range(4):
            await asyncio.sleep(0)
        assert (len(server._backlog), len(server._initials)) == (0, 1)
        await asyncio.sleep(0)
        assert len(server._initials) == 0 and cid in server._protocols
        await asyncio.sleep(0.2)
        assert phone.recv(65536)  # the phone got the gateway's first flight
    finally:
        phone.close()


async def test_a_full_backlog_drops_what_comes_and_counts_it(gateway_factory, monkeypatch):
    monkeypatch.setattr(quic, "BACKLOG_LIMIT", 3)
    gw = await gateway_factory()
    for _ in range(5):  # all in one turn, as a busy socket is read
        gw._quic.datagram_received(stray_packet(), ("127.0.0.1", 9))
    assert len(gw._quic._backlog) == 3
    assert gw.metrics.value("lpgw_quic_backlog_dropped_total") == 2
    await asyncio.sleep(0.05)
    assert not gw._quic._backlog and not gw._quic._working


def kernel_receive_buffer(sock: socket.socket) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2


async def test_the_quic_socket_gets_the_configured_receive_buffer(gateway_factory):
    """The key reaches the socket; 0 leaves the kernel's default."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as fresh:
        default = kernel_receive_buffer(fresh)
    sized = await gateway_factory(listen={"quic_receive_buffer": 3 * 1024 * 1024})
    plain = await gateway_factory(listen={"quic_receive_buffer": 0})
    for gw, want in ((sized, 3 * 1024 * 1024), (plain, default)):
        sock = gw._quic._transport.get_extra_info("socket")
        assert kernel_receive_buffer(sock) == want


def rmem_max() -> int:
    with open("/proc/sys/net/core/rmem_max") as f:
        return int(f.read())


def test_a_buffer_over_the_kernels_cap_is_forced_or_reported(caplog):
    """Past net.core.rmem_max: granted with CAP_NET_ADMIN (root here); else a warning that
    names the sysctl to raise, and the gateway runs on with what it got."""
    wanted = rmem_max() + 1024 * 1024
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock, \
            caplog.at_level(logging.INFO, logger="lpgw.quic"):
        granted = quic.set_receive_buffer(sock, wanted)
        assert granted == kernel_receive_buffer(sock)
    if os.geteuid() == 0:
        assert granted == wanted and f"receive buffer: {wanted} bytes" in caplog.text
    else:
        assert granted < wanted and "raise net.core.rmem_max" in caplog.text


@pytest.mark.skipif(os.geteuid() != 0, reason="drops CAP_NET_ADMIN by changing user: root")
def test_without_the_capability_the_shortfall_is_logged(tmp_path):
    """The appliance's unit has no capabilities: what it gets is rmem_max, said in the log."""
    code = ("import logging, os, socket, sys; logging.basicConfig(level=logging.INFO);"
            "from gateway.transport import quic;"  # imported first: root's files stay root's
            "os.setgid(65534); os.setuid(65534);"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM);"
            "print(quic.set_receive_buffer(s, int(sys.argv[1])))")
    wanted = rmem_max() + 1024 * 1024
    run = subprocess.run([sys.executable, "-c", code, str(wanted)], capture_output=True,
                         text=True, timeout=30, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert run.returncode == 0, run.stderr
    assert int(run.stdout) == rmem_max()
    assert f"raise net.core.rmem_max (sysctl) to at least {wanted}" in run.stderr


async def test_a_silent_phone_gets_the_first_flight_again_after_rfc_9002s_initial_pto(
        gateway_factory):
    """Before a phone first answers, the gateway waits 2 x 333 ms (RFC 9002 §6.2.2) before
    it resends its handshake flight, not aioquic's 2 x 100 ms: in a storm phones answer
    late because they are many, and early resends are work for both sides."""
    gw = await gateway_factory()
    loop = asyncio.get_running_loop()
    phone = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        phone.bind(("127.0.0.1", 0))
        phone.setblocking(False)
        await loop.sock_sendto(phone, client_initial()[0], ("127.0.0.1", gw.listening.port))
        await asyncio.wait_for(loop.sock_recv(phone, 65536), 2)
        first = loop.time()
        while True:  # the rest of the first flight comes at once
            try:
                await asyncio.wait_for(loop.sock_recv(phone, 65536), 0.1)
            except TimeoutError:
                break
        await asyncio.wait_for(loop.sock_recv(phone, 65536), 3)  # the resend
        gap = loop.time() - first
        assert 2 * quic.INITIAL_RTT - 0.05 <= gap < 2 * quic.INITIAL_RTT + 0.5
    finally:
        phone.close()


async def test_a_welcome_and_the_pushes_waiting_for_it_leave_in_one_packet(gateway_factory):
    """A phone back from an outage with a push waiting: one QUIC packet carries both (each
    write sent its own packet: in a storm, a packet more per phone, for both sides)."""
    gw = await gateway_factory()
    first = hello()
    peer = await RawQuic.open(gw.listening.port)
    await peer.send(first)
    token = (await peer.read())["token"]
    await peer.close()
    await asyncio.sleep(0.2)
    waiting = await send(gw, token, {"waiting": 1})
    assert waiting["stored"] and not waiting["sent"]
    again = await RawQuic.open(gw.listening.port)
    try:
        await again.send(hello(install_id=first["install_id"]))
        chunk = await asyncio.wait_for(again.incoming.get(), 5)  # one StreamDataReceived
        frames = [f["type"] for f in map(decode_body, FrameDecoder(1 << 20).feed(chunk))]
        assert frames == ["welcome", "push"]
        live = await send(gw, token, {"live": 1})  # and a push on its own goes at once
        assert live["sent"]
        chunk = await asyncio.wait_for(again.incoming.get(), 5)
        assert [f["type"] for f in map(decode_body, FrameDecoder(1 << 20).feed(chunk))] \
            == ["push"]
    finally:
        await again.close()


def test_the_token_of_an_initial():
    """b"" for a first Initial, the Retry's token when it answers one, None for others."""
    import ssl
    import time

    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection
    from aioquic.quic.packet import encode_quic_retry

    from gateway.transport.initials import initial_token

    client = QuicConnection(configuration=QuicConfiguration(
        is_client=True, alpn_protocols=["lpgw/1"], verify_mode=ssl.CERT_NONE))
    client.connect(("127.0.0.1", 4433), now=time.monotonic())
    first = client.datagrams_to_send(now=time.monotonic())[0][0]
    assert initial_token(first) == b""
    retry = encode_quic_retry(version=1, source_cid=b"S" * 8,
                              destination_cid=client.host_cid,
                              original_destination_cid=client._peer_cid.cid,
                              retry_token=b"T" * 40)
    client.receive_datagram(retry, ("127.0.0.1", 4433), now=time.monotonic())
    again = client.datagrams_to_send(now=time.monotonic())[0][0]
    assert initial_token(again) == b"T" * 40
    assert initial_token(b"\x40" + first[1:]) is None  # a short header
    assert initial_token(first[:8]) is None  # cut off
