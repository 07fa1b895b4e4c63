"""Attackers of the provider API, each in a process of its own (so that its CPU is not
counted in the latency the test measures): `python -m tests.api_attacker <attack> <port>`
prints one JSON line with what it saw.

Raw HTTP/2 clients: the h2 library's client side over Python's ssl, nothing of the gateway's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import sys
import time

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions

TOPIC = "com.example.lpgw"


class RawH2:
    """An HTTP/2 client that sends exactly what the test says."""

    def __init__(self, reader, writer) -> None:
        self.reader, self.writer = reader, writer
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.events: list = []

    @classmethod
    async def open(cls, port: int, read_settings: bool = True) -> RawH2:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        ctx.set_alpn_protocols(["h2"])
        self = cls(*await asyncio.open_connection("127.0.0.1", port, ssl=ctx))
        self.conn.initiate_connection()
        await self.flush()
        if read_settings:
            await self.read(0.05)
        return self

    async def flush(self) -> None:
        """Send what h2 has queued; a connection the gateway closed takes nothing more."""
        data = self.conn.data_to_send()
        if self.writer.is_closing():
            return
        self.writer.write(data)
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()

    def headers(self, stream_id: int, body_length: int | None = None, token: str = "ab" * 32,
                extra: tuple[tuple[str, str], ...] = ()) -> None:
        fields = [(":method", "POST"), (":scheme", "https"), (":authority", "localhost"),
                  (":path", f"/3/device/{token}"), ("apns-topic", TOPIC), *extra]
        if body_length is not None:
            fields.append(("content-length", str(body_length)))
        self.conn.send_headers(stream_id, fields, end_stream=body_length is None)

    async def read(self, timeout: float) -> bool:
        """Read what comes for `timeout` s; False once the gateway closed the connection."""
        try:
            async with asyncio.timeout(timeout):
                while data := await self.reader.read(65536):
                    self.events += self.conn.receive_data(data)
                    await self.flush()
                return False
        except TimeoutError:
            return True
        except (ConnectionError, h2.exceptions.ProtocolError):
            return False

    def goaway(self) -> h2.errors.ErrorCodes | None:
        ended = [e for e in self.events if isinstance(e, h2.events.ConnectionTerminated)]
        return ended[0].error_code if ended else None

    def close(self) -> None:
        self.writer.close()



async def rapid_reset(port: int) -> dict:
    """HEADERS then RST_STREAM, 100 at a time, on one connection after another (10 at
    most, 8 s at most): how each ended. A connection the attacker's own deadline cut short
    (on a machine busy enough that it got no GOAWAY ENHANCE_YOUR_CALM in time: none, or
    the idle timeout's NO_ERROR) is counted apart."""
    codes, streams, cut_short = [], 0, 0
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline and len(codes) < 10:
        raw = await RawH2.open(port)
        sid = 1
        while time.monotonic() < deadline and sid < 40000:
            try:
                for _ in range(100):
                    raw.headers(sid)
                    raw.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
                    sid += 2
                await raw.flush()
            except (ConnectionError, h2.exceptions.ProtocolError):  # it was told GOAWAY
                break
            if not await raw.read(0.001):
                break
        await raw.read(1.0)
        code = raw.goaway()
        streams += sid // 2
        raw.close()
        calm = int(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
        if (code is None or int(code) != calm) and time.monotonic() >= deadline:
            cut_short += 1  # the attacker's own clock ended it (any GOAWAY then: idle)
            continue
        codes.append(None if code is None else int(code))
    return {"goaway": codes, "streams": streams, "cut_short": cut_short}


async def unfinished_bodies(port: int) -> dict:
    """2 connections that open 1,000 streams before reading the gateway's SETTINGS (so
    ignore its stream limit); then 10 that keep to it, each stream with 4,000 of 4,096 body
    bytes, never ended; then wait past request_timeout (2 s) for the answers."""
    rude = [await RawH2.open(port, read_settings=False) for _ in range(2)]
    for raw in rude:
        for i in range(1000):
            raw.headers(1 + 2 * i, body_length=4096)
        await raw.flush()
    conns = [await RawH2.open(port) for _ in range(10)]
    for raw in conns:
        for i in range(200):
            sid = 1 + 2 * i
            try:
                raw.headers(sid, body_length=4096)
            except h2.exceptions.ProtocolError:
                break  # as many as the gateway allows at once (or it closed)
            with contextlib.suppress(h2.exceptions.ProtocolError):  # refused meanwhile
                waited = time.monotonic() + 0.5
                while (raw.conn.local_flow_control_window(sid) < 4000
                       and time.monotonic() < waited):
                    await raw.read(0.02)
                raw.conn.send_data(sid, b"x" * 4000)
            await raw.flush()
            await raw.read(0.001)
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        for raw in conns + rude:
            await raw.read(0.05)
    statuses = sorted({
        next((int(v) for k, v in e.headers if k == b":status"), 0)
        for raw in conns for e in raw.events if isinstance(e, h2.events.ResponseReceived)})
    streams = sum((raw.conn.highest_outbound_stream_id or 0) // 2 + 1 for raw in conns)
    rude_ended = [None if raw.goaway() is None else int(raw.goaway()) for raw in rude]
    for raw in conns + rude:
        raw.close()
    return {"statuses": statuses, "streams": streams, "rude": rude_ended}


async def connection_flood(port: int) -> dict:
    """200 TCP connections from this address, nothing sent: how many were closed at once."""
    opened = [await asyncio.open_connection("127.0.0.1", port) for _ in range(200)]
    await asyncio.sleep(0.3)
    closed = 0
    for reader, _ in opened:
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(0.01):
                if await reader.read() == b"":
                    closed += 1
    await asyncio.sleep(1.0)
    for _, writer in opened:
        writer.close()
    return {"closed": closed}


ATTACKS = {"rapid_reset": rapid_reset, "unfinished_bodies": unfinished_bodies,
           "connection_flood": connection_flood}

if __name__ == "__main__":
    print(json.dumps(asyncio.run(ATTACKS[sys.argv[1]](int(sys.argv[2])))), flush=True)
