"""QUIC address validation and the half-open budget, against `lpgw run`.

A stranger on the Wi-Fi sends Initials and never finishes a handshake. Before issue 15 each
one cost the gateway a connection (~80 KiB, held ~45 s): 3,000 of them +240 MiB. Now, past
`listen.quic_retry_above` half-open connections, an Initial gets a Retry (RFC 9000 8.1.2:
no state until the source proves its address), at most `quic_half_open_limit` handshakes
are kept, and one that does not finish in time is dropped.
"""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import ssl
import time

import httpx
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from tests.conftest import GatewayProcess
from tests.test_h3_health import ngtcp2_get

FLOOD = 3000


def initials(port: int, count: int) -> list[bytes]:
    """The first datagram of `count` real client handshakes (aioquic), each its own ids."""
    config = QuicConfiguration(is_client=True, alpn_protocols=["lpgw/1"],
                               verify_mode=ssl.CERT_NONE)
    found = []
    for _ in range(count):
        client = QuicConnection(configuration=config)
        client.connect(("127.0.0.1", port), now=time.monotonic())
        found.append(client.datagrams_to_send(now=time.monotonic())[0][0])
    return found


async def flood(port: int, datagrams: list[bytes], seconds: float) -> None:
    """Send them over `seconds` from 30 source ports, never answering anything."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(30)]
    try:
        step = seconds / len(datagrams)
        start = time.monotonic()
        for i, data in enumerate(datagrams):
            socks[i % len(socks)].sendto(data, ("127.0.0.1", port))
            if i % 25 == 24:
                await asyncio.sleep(max(0.0, start + (i + 1) * step - time.monotonic()))
    finally:
        for sock in socks:
            sock.close()


def metric(proc: GatewayProcess, name: str) -> float:
    ctx = ssl.create_default_context(cafile=str(proc.state / "gateway.crt"))
    text = httpx.get(f"https://localhost:{proc.runtime['api_port']}/metrics", verify=ctx).text
    return sum(float(m) for m in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def start(tmp_path, **listen) -> GatewayProcess:
    proc = GatewayProcess(tmp_path / "state", 0, {
        "listen": {"host": "127.0.0.1", "port": 0, **listen},
        "api": {"host": "127.0.0.1", "port": 0}, "sip": {"enabled": False},
        "store": {"synchronous": "NORMAL"}})
    proc.start()
    return proc


async def test_initials_that_never_finish_cost_little_and_phones_still_connect(
        tmp_path, devices):
    proc = start(tmp_path)
    try:
        port = proc.runtime["port"]
        datagrams = initials(port, FLOOD)
        await asyncio.sleep(0.5)
        before = proc.rss_kib()
        peak = before
        sending = asyncio.create_task(flood(port, datagrams, 3.0))
        await asyncio.sleep(1.0)
        began = time.monotonic()
        phone = devices(proc.handle(), "quic")
        await phone.welcome()
        welcome_after = time.monotonic() - began
        while not sending.done():
            peak = max(peak, proc.rss_kib())
            await asyncio.sleep(0.05)
        await sending
        for _ in range(20):
            peak = max(peak, proc.rss_kib())
            await asyncio.sleep(0.05)
        grew = (peak - before) / 1024
        retries = metric(proc, "lpgw_quic_retries_sent_total")
        print(f"\n{FLOOD} Initials never finished: RSS {before / 1024:.1f} MiB -> peak "
              f"{peak / 1024:.1f} MiB (+{grew:.1f} MiB); Retries sent {retries:.0f}; a "
              f"phone's welcome during the flood after {welcome_after * 1000:.0f} ms")
        assert grew <= 20, f"+{grew:.1f} MiB"
        assert welcome_after < 5
        assert retries >= FLOOD - 256  # past the first quic_retry_above, each got a Retry
        assert metric(proc, "lpgw_quic_half_open") <= 256
        # the handshakes it did start are dropped once HALF_OPEN_TIMEOUT (10 s) has passed
        deadline = time.monotonic() + 20
        while metric(proc, "lpgw_quic_half_open") > 0:
            assert time.monotonic() < deadline, "half-open connections kept past 20 s"
            await asyncio.sleep(0.5)
        assert metric(proc, "lpgw_quic_half_open_expired_total") >= 50
    finally:
        proc.kill(signal.SIGTERM)


async def test_with_retry_always_real_clients_connect(tmp_path, devices):
    """quic_retry_above: 0, every new connection first proves its address: the gateway's
    device client (aioquic) and an independent client (ngtcp2) both get through."""
    proc = start(tmp_path, quic_retry_above=0)
    try:
        phone = devices(proc.handle(), "quic")
        await phone.welcome()
        rc, log = await ngtcp2_get(proc.runtime["port"], tmp_path)
        assert rc == 0 and "[:status: 200]" in log, log
        assert "Received packet: local=" in log and re.search(r"(?i)retry", log), log
        assert metric(proc, "lpgw_quic_retries_sent_total") >= 2
    finally:
        proc.kill(signal.SIGTERM)
