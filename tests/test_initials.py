"""The order new QUIC connections are started in under load (sans-IO), and the header peek."""

from __future__ import annotations

import asyncio
import socket
import ssl

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from gateway.transport.initials import InitialQueue, new_connection_id


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
    assert len(gw._quic._initials) == 0 and not gw._quic._starting


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
