"""A phone that stops reading: its outgoing buffer is bounded, it is closed with `bye`
slow_reader, and its pushes wait in the store for its next connection.

The non-reading phones are real peers that stop taking data the way a stuck app would:
over TLS the socket is not read any more (TCP's window closes), over QUIC the stack still
acknowledges packets and PINGs but never opens the stream's flow-control window again.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time

import pytest
from aioquic.asyncio import connect
from aioquic.quic.configuration import QuicConfiguration

from gateway.protocol.messages import ByeReason
from tests.conftest import GatewayProcess, eventually, new_install, send
from tests.rawpeer import RawQuic, RawTls, _Proto, hello

LIMIT = 64 * 1024
PAYLOAD = {"aps": {"alert": "x" * 3000}}


class StuckTls(RawTls):
    """Reads its welcome, then never reads its socket again (small receive buffer)."""

    @classmethod
    async def open(cls, port: int, alpn: list[str] | None = None) -> StuckTls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols(["lpgw/1"])
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        self = cls()
        self.reader, self.writer = await asyncio.open_connection(sock=sock, ssl=ctx,
                                                                 server_hostname="lpgw")
        self._pump = asyncio.create_task(self._read_loop())
        return self

    def stop_reading(self) -> None:
        self._pump.cancel()
        self.writer.transport.pause_reading()


class StuckQuic(RawQuic):
    """aioquic acknowledges every packet and PING, but the stream's window is never
    opened again: what an app that stopped reading its stream looks like on the wire."""

    @classmethod
    async def open(cls, port: int, alpn: list[str] | None = None) -> StuckQuic:
        self = cls()
        config = QuicConfiguration(is_client=True, alpn_protocols=["lpgw/1"],
                                   verify_mode=ssl.CERT_NONE, max_stream_data=65536,
                                   max_data=131072)
        self._cm = connect("127.0.0.1", port, configuration=config, create_protocol=_Proto)
        self.protocol = await self._cm.__aenter__()
        self.protocol.peer = self
        self.stream_id = self.protocol._quic.get_next_available_stream_id()
        return self

    def stop_reading(self) -> None:
        quic = self.protocol._quic
        quic._write_stream_limits = lambda *args, **kwargs: None
        quic._write_connection_limits = lambda *args, **kwargs: None


async def stuck(transport: str, port: int, install: str):
    peer = await (StuckQuic if transport == "quic" else StuckTls).open(port)
    await peer.send(hello(install_id=install, topic="com.example.lpgw"))
    welcome = await peer.read()
    assert welcome["type"] == "welcome"
    peer.stop_reading()
    return peer, welcome["token"]


async def push_until_closed(gw, token: str, limit: int = 3000) -> int:
    """Push to the stuck device until the gateway lets it go; bounded in count and time."""
    deadline = time.monotonic() + 60
    for n in range(limit):
        reply = await send(gw, token, PAYLOAD | {"n": n})
        assert reply["ok"] and reply["stored"], reply
        if not gw.delivery.is_connected(token):
            return n + 1
        assert time.monotonic() < deadline, "the stuck device was never closed"
    raise AssertionError(f"still connected after {limit} pushes")


@pytest.mark.parametrize("transport", ["quic", "tls"])
async def test_a_device_that_stops_reading_is_closed_and_its_pushes_wait(
        gateway_factory, devices, transport):
    gw = await gateway_factory(protocol={"send_buffer_limit": LIMIT})
    bystander = devices(gw, transport)
    calm = await bystander.welcome()
    install = new_install()
    peer, token = await stuck(transport, gw.listening.port, install)

    pushed = await push_until_closed(gw, token)
    assert gw.metrics.value("lpgw_slow_readers_total", transport=transport) == 1
    assert gw.metrics.value("lpgw_disconnects_total", transport=transport,
                            reason=ByeReason.SLOW_READER) == 1
    queued = gw.store.count_pending(token)
    assert queued == min(pushed, gw.delivery.settings.queue_limit)
    if transport == "quic":  # the reason reaches the phone in CONNECTION_CLOSE
        await eventually(lambda: peer.close_reason is not None)
        assert peer.close_reason == ByeReason.SLOW_READER

    reply = await send(gw, calm, {"still": "here"})  # the bystander never noticed
    assert reply["sent"]
    assert (await bystander.next("push"))["payload"] == {"still": "here"}

    # the phone's app wakes up: a new connection of the same install gets the queue
    back = devices(gw, transport, install_id=install)
    assert await back.welcome() == token
    got = [await back.next("push", timeout=10) for _ in range(queued)]
    assert [p["payload"]["n"] for p in got] == list(range(pushed - queued, pushed))
    await eventually(lambda: gw.store.count_pending(token) == 0)
    assert [e for e in bystander.log if e["event"] == "disconnected"] == []
    await peer.close()


async def test_a_stuck_phone_costs_at_most_its_limit_in_lpgw_run(tmp_path, devices):
    """`lpgw run` with the default limit (2 MiB): a TLS phone that stops reading while
    pushes keep coming. Before: its buffer grew with every push (+17 MiB and rising)."""
    proc = GatewayProcess(tmp_path / "state", 0, {"listen": {"host": "127.0.0.1", "port": 0},
                                                  "store": {"synchronous": "NORMAL"}})
    proc.start()
    try:
        gw = proc.handle()
        bystander = devices(gw, "quic")
        calm = await bystander.welcome()
        peer, token = await stuck("tls", proc.runtime["port"], new_install())
        start = proc.rss_kib()
        deadline = time.monotonic() + 90
        closed_after = None
        peak = start
        for n in range(3000):
            reply = await send(gw, token, PAYLOAD | {"n": n})
            assert reply["ok"], reply
            peak = max(peak, proc.rss_kib())
            if n % 50 == 0:
                status = (await _status(gw))["devices"]["connected"]
                if status["tls"] == 0:
                    closed_after = n
                    break
            assert time.monotonic() < deadline
        assert closed_after is not None, "the stuck phone was never closed"
        reply = await send(gw, calm, {"still": "here"})
        assert reply["sent"]
        assert (await bystander.next("push"))["payload"] == {"still": "here"}
        grown = peak - start
        print(f"stuck TLS phone closed after {closed_after} pushes of ~3 KB; gateway RSS "
              f"{start} KiB -> peak {peak} KiB (+{grown} KiB)")
        assert grown < 8 * 1024, f"RSS grew {grown} KiB"
        await peer.close()
    finally:
        proc.kill()


async def _status(gw) -> dict:
    from gateway.transport import control
    reply = await control.request(gw.config.control_path, {"op": "status"})
    return reply["status"]
