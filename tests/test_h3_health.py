"""ALPN "h3" on the device port: GET /healthz over HTTP/3, liveness only, never a device.

Two HTTP/3 stacks ask: ngtcp2's example client (Debian ngtcp2-client, an independent QUIC
and HTTP/3 implementation) and aioquic's own H3Connection.
"""

from __future__ import annotations

import asyncio
import gc
import re
import shutil
import ssl
import weakref

import pytest
from aioquic.asyncio import QuicConnectionProtocol, connect
from aioquic.h3.connection import ErrorCode, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration

from gateway import __version__
from gateway.transport import h3health
from tests.conftest import send

NGTCP2_CLIENT = "gtlsclient"  # ngtcp2's example HTTP/3 client on GnuTLS (ngtcp2-client)


def quic_count(gw, name: str, **labels: str) -> float:
    return gw.metrics.value(name, transport="quic", **labels)


def assert_no_device(gw) -> None:
    assert quic_count(gw, "lpgw_devices_connected") == 0
    assert quic_count(gw, "lpgw_handshakes_total", result="welcome") == 0
    assert gw.delivery.connected() == {}


def assert_reveals_nothing(gw, text: str) -> None:
    for secret in (gw.gateway_id, gw.pin, __version__):
        assert secret not in text


# --- ngtcp2 ----------------------------------------------------------------------------


async def ngtcp2_get(port: int, download, *options: str) -> tuple[int, str]:
    """Run gtlsclient for GET /healthz; (exit status, its log). It verifies no certificate."""
    binary = shutil.which(NGTCP2_CLIENT)
    if binary is None:
        pytest.skip("needs Debian package ngtcp2-client")
    proc = await asyncio.create_subprocess_exec(
        binary, "--exit-on-all-streams-close", "--no-quic-dump", "--timeout=5s",
        f"--download={download}", *options, "127.0.0.1", str(port),
        f"https://127.0.0.1:{port}/healthz",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        async with asyncio.timeout(20):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode, out.decode(errors="replace")


async def test_ngtcp2_client_gets_healthz(gateway_factory, tmp_path):
    gw = await gateway_factory()
    rc, log = await ngtcp2_get(gw.listening.port, tmp_path)
    assert rc == 0, log
    assert "[:status: 200]" in log
    assert "[content-type: text/plain]" in log
    assert "|ok.|" in log  # the body, in the client's hex dump
    assert (tmp_path / "healthz").read_bytes() == b"ok\n"
    assert_reveals_nothing(gw, log)
    assert_no_device(gw)


@pytest.mark.parametrize("rebinding", [False, True], ids=["migration", "nat_rebinding"])
async def test_ngtcp2_client_changes_its_address_mid_connection(gateway_factory, tmp_path,
                                                                rebinding):
    """The client moves to a new local port after the handshake, then asks."""
    gw = await gateway_factory()
    options = ["--change-local-addr=100ms", "--delay-stream=500ms"]
    if rebinding:
        options.append("--nat-rebinding")  # no path validation from the client
    rc, log = await ngtcp2_get(gw.listening.port, tmp_path, *options)
    assert rc == 0, log
    sent_from = re.findall(r"Sent packet: local=(\S+)", log)
    assert len(set(sent_from)) >= 2, log  # it did move
    before_status = log[:log.index("[:status: 200]")]
    answered_at = re.findall(r"Received packet: local=(\S+)", before_status)[-1]
    assert answered_at != sent_from[0]  # the answer reached the new address
    assert (tmp_path / "healthz").read_bytes() == b"ok\n"
    assert_no_device(gw)


# --- aioquic ---------------------------------------------------------------------------


class H3Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.http = H3Connection(self._quic)
        self.responses: dict[int, asyncio.Future] = {}
        self._parts: dict[int, tuple[list, bytearray]] = {}
        self.close_event: events.ConnectionTerminated | None = None

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[dict, bytes]:
        sid = self._quic.get_next_available_stream_id()
        self.http.send_headers(sid, [(b":method", method.encode()), (b":scheme", b"https"),
                                     (b":authority", b"127.0.0.1"), (b":path", path.encode())],
                               end_stream=not body)
        if body:
            self.http.send_data(sid, body, end_stream=True)
        self.responses[sid] = self._loop.create_future()
        self._parts[sid] = ([], bytearray())
        self.transmit()
        async with asyncio.timeout(5):
            return await self.responses[sid]

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.ConnectionTerminated):
            self.close_event = event
        for h3_event in self.http.handle_event(event):
            parts = self._parts.get(getattr(h3_event, "stream_id", -1))
            if parts is None:
                continue
            if isinstance(h3_event, HeadersReceived):
                parts[0].extend(h3_event.headers)
            elif isinstance(h3_event, DataReceived):
                parts[1].extend(h3_event.data)
            if h3_event.stream_ended:
                sid = h3_event.stream_id
                headers = {k.decode(): v.decode() for k, v in self._parts.pop(sid)[0]}
                self.responses[sid].set_result((headers, bytes(parts[1])))


def h3_client(port: int):
    config = QuicConfiguration(is_client=True, alpn_protocols=["h3"],
                               verify_mode=ssl.CERT_NONE)
    return connect("127.0.0.1", port, configuration=config, create_protocol=H3Client)


async def test_aioquic_h3_client_healthz_404_405(gateway_factory):
    gw = await gateway_factory()
    async with h3_client(gw.listening.port) as client:
        assert client._quic.tls.alpn_negotiated == "h3"
        headers, body = await client.request("GET", "/healthz")
        assert (headers[":status"], body) == ("200", b"ok\n")
        assert headers["content-type"] == "text/plain"
        headers, body = await client.request("GET", "/healthz?verbose=1")
        assert (headers[":status"], body) == ("200", b"ok\n")
        headers, _ = await client.request("GET", "/other")
        assert headers[":status"] == "404"
        headers, _ = await client.request("GET", "/")
        assert headers[":status"] == "404"
        headers, _ = await client.request("POST", "/healthz", b'{"type": "hello"}')
        assert headers[":status"] == "405"
        assert headers["allow"] == "GET"
        headers, _ = await client.request("HEAD", "/healthz")
        assert headers[":status"] == "405"
        assert_reveals_nothing(gw, repr(headers))
        assert_no_device(gw)
    assert_no_device(gw)
    # many streams, none of them "a second device stream"
    assert gw.metrics.value("lpgw_protocol_errors_total", code="extra_stream") == 0
    assert gw.store.count_devices() == 0


async def test_an_idle_h3_connection_is_closed(gateway_factory, monkeypatch):
    monkeypatch.setattr(h3health, "IDLE_TIMEOUT", 0.3)
    gw = await gateway_factory()
    async with h3_client(gw.listening.port) as client:
        headers, _ = await client.request("GET", "/healthz")
        assert headers[":status"] == "200"
        async with asyncio.timeout(3):
            await client.wait_closed()
        assert client.close_event.error_code == ErrorCode.H3_NO_ERROR
    async with h3_client(gw.listening.port) as silent:  # never asks anything
        async with asyncio.timeout(3):
            await silent.wait_closed()
    assert_no_device(gw)


async def test_a_device_and_health_checks_share_the_port(gateway_factory, devices, tmp_path):
    gw = await gateway_factory()
    device = devices(gw, "quic")
    token = await device.welcome()
    async with h3_client(gw.listening.port) as client:
        headers, body = await client.request("GET", "/healthz")
        assert (headers[":status"], body) == ("200", b"ok\n")
        if shutil.which(NGTCP2_CLIENT):
            rc, log = await ngtcp2_get(gw.listening.port, tmp_path)
            assert rc == 0 and "[:status: 200]" in log, log
        assert quic_count(gw, "lpgw_devices_connected") == 1
        reply = await send(gw, token, {"during": "h3"})
        assert reply["sent"]
        assert (await device.next("push"))["payload"] == {"during": "h3"}
    assert quic_count(gw, "lpgw_devices_connected") == 1
    assert quic_count(gw, "lpgw_handshakes_total", result="welcome") == 1
    assert gw.delivery.connected() == {token: "quic"}
    assert [e for e in device.log if e["event"] == "disconnected"] == []


async def test_a_health_check_connection_is_freed_without_the_cycle_collector(gateway_factory):
    """Like a phone's (tests/test_memory.py): untied when it ends, freed by refcounting."""
    gw = await gateway_factory()
    gc.collect()
    gc.disable()
    try:
        async with h3_client(gw.listening.port) as client:
            headers, _ = await client.request("GET", "/healthz")
            assert headers[":status"] == "200"
            (server_side,) = set(gw._quic._protocols.values())
            refs = [weakref.ref(server_side), weakref.ref(server_side._quic),
                    weakref.ref(server_side._h3)]
            del server_side
        async with asyncio.timeout(5):  # aioquic keeps it through its closing period
            while any(ref() is not None for ref in refs):
                await asyncio.sleep(0.02)
        assert not gw._quic._protocols
    finally:
        gc.enable()

