"""Hostile and sloppy SIP against a running gateway (issue 14, points 1 and 2).

Malformed SIP costs nothing that stays: 50,000 malformed datagrams of every kind leave
`lpgw run`'s RSS where it was (sipmessage's shared exception objects used to keep every
failure's frames: +182 MiB for 20,000 bad Vias). Each hostile value gets a clean 400, or
silence where RFC 3261 says so, never a traceback and never a ring, over real UDP and
TCP; responses go to the packet's real source. What real PBXes send still rings (a
Latin-1 display name), and a MESSAGE too big for a push gets 513. A failure inside the
bridge costs one message, one transaction or one timer tick, and SIGTERM drains.

Re-run the measurements: `.venv/bin/pytest -s tests/test_sip_hostile.py -k flood`.
"""

from __future__ import annotations

import itertools
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.service import _free_port
from tests.conftest import GatewayProcess

# --- SIP peers that write exactly the bytes a test says ---------------------------------

_ids = itertools.count(1)


def request(method: str, port: int, *, user: str = "nurse", transport: str = "UDP",
            via: str | None = None, from_: bytes = b'"Ward PBX" <sip:1000@127.0.0.1>;tag=pbx',
            call_id: str | None = None, cseq: str | None = None, max_forwards: str = "70",
            content_length: str | None = None, extra: str = "", body: bytes = b"",
            uri: str | None = None) -> bytes:
    """A request from 127.0.0.1:`port`; each part can be replaced by something hostile."""
    n = next(_ids)
    via = via if via is not None else (
        f"SIP/2.0/{transport} 127.0.0.1:{port};branch=z9hG4bK-h{n};rport")
    lines = [f"{method} {uri or f'sip:{user}@127.0.0.1'} SIP/2.0", f"Via: {via}"]
    head = "\r\n".join(lines).encode() + b"\r\nFrom: " + from_ + "\r\n".join([
        "", f"To: <sip:{user}@127.0.0.1>", f"Call-ID: {call_id or f'hostile-{n}'}",
        f"CSeq: {cseq or f'1 {method}'}", f"Max-Forwards: {max_forwards}",
        f"{extra}Content-Length: {content_length if content_length is not None else len(body)}",
        "", ""]).encode()
    return head + body


def status_of(data: bytes) -> int:
    return int(data.split(b" ", 2)[1])


def call_id_of(data: bytes) -> str:
    m = re.search(rb"(?im)^(?:call-id|i)[ \t]*:[ \t]*(\S+)", data)
    return m.group(1).decode() if m else ""


class SipUdp:
    """A PBX-like UDP peer on 127.0.0.1 (blocking socket, bounded waits)."""

    def __init__(self, sip_port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.port = self.sock.getsockname()[1]
        self.target = ("127.0.0.1", sip_port)

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, self.target)

    def until(self, call_id: str, timeout: float = 5.0) -> list[bytes]:
        """Everything that arrives up to and including the first response for `call_id`."""
        got: list[bytes] = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65535)
            except TimeoutError:
                break
            got.append(data)
            if call_id_of(data) == call_id:
                return got
        firsts = [d.split(b"\r\n")[0] for d in got]
        raise AssertionError(f"no answer for {call_id} in {timeout} s; got {firsts}")

    def exchange(self, data: bytes, timeout: float = 5.0) -> list[int]:
        """Send `data`, then a healthy OPTIONS: the statuses `data` got (the gateway takes
        datagrams in order, so everything for it comes before the OPTIONS' 200)."""
        self.send(data)
        statuses = self.options(timeout)
        return statuses

    def options(self, timeout: float = 5.0) -> list[int]:
        """A healthy OPTIONS must get 200; returns what arrived before it."""
        call_id = f"healthy-{next(_ids)}"
        self.send(request("OPTIONS", self.port, call_id=call_id))
        got = self.until(call_id, timeout)
        assert status_of(got[-1]) == 200, got[-1][:200]
        return [status_of(d) for d in got[:-1]]

    def close(self) -> None:
        self.sock.close()


class SipTcp:
    """One TCP connection to the gateway's SIP port; responses framed by Content-Length."""

    def __init__(self, sip_port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", sip_port), timeout=5)
        self.port = self.sock.getsockname()[1]
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self, timeout: float = 5.0) -> bytes | None:
        """The next whole response, or None once the gateway closed the connection."""
        deadline = time.monotonic() + timeout
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end >= 0:
                m = re.search(rb"(?im)^content-length[ \t]*:[ \t]*(\d+)", self.buffer[:end])
                total = end + 4 + int(m.group(1) if m else 0)
                if len(self.buffer) >= total:
                    data, self.buffer = self.buffer[:total], self.buffer[total:]
                    return data
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.sock.recv(65535)
            if not chunk:
                return None
            self.buffer += chunk

    def exchange(self, data: bytes) -> list[int]:
        """Send `data` then a healthy OPTIONS on the same connection (see SipUdp)."""
        self.send(data)
        call_id = f"healthy-{next(_ids)}"
        self.send(request("OPTIONS", self.port, transport="TCP", call_id=call_id))
        statuses = []
        while (data := self.read()) is not None:
            if call_id_of(data) == call_id:
                assert status_of(data) == 200
                return statuses
            statuses.append(status_of(data))
        raise AssertionError(f"connection closed after {statuses}")

    def close(self) -> None:
        self.sock.close()


# --- `lpgw run`, its output followed as it comes -------------------------------------------

class Followed:
    """A gateway process whose output is read by a thread (so the pipe never fills)."""

    def __init__(self, tmp: Path, loop: str = "uvloop", **sip) -> None:
        self.sip_port = _free_port("127.0.0.1")
        self.proc = GatewayProcess(tmp / "state", 0, {
            "listen": {"host": "127.0.0.1", "port": 0}, "store": {"synchronous": "NORMAL"},
            "sip": {"enabled": True, "host": "127.0.0.1", "port": self.sip_port, **sip}})
        self.proc.start(env={"LPGW_EVENT_LOOP": loop})
        self.lines = self.proc.lines
        self._reader = threading.Thread(target=self._follow, daemon=True)
        self._reader.start()

    def _follow(self) -> None:
        for raw in iter(self.proc.proc.stdout.readline, b""):
            self.lines.append(raw.decode(errors="replace"))

    def output_since(self, mark: int) -> str:
        return "".join(self.lines[mark:])

    def stop(self) -> int:
        """SIGTERM; the exit status once it drained."""
        self.proc.proc.send_signal(signal.SIGTERM)
        code = self.proc.proc.wait(30)
        self._reader.join(5)
        return code

    def kill(self) -> None:
        self.proc.kill()


@pytest.fixture(scope="module")
def gateway_proc(tmp_path_factory) -> Iterator[Followed]:
    """One `lpgw run` (uvloop) for the hostile values: none may disturb the next."""
    gw = Followed(tmp_path_factory.mktemp("hostile"))
    yield gw
    gw.kill()


@pytest.fixture
def udp(gateway_proc) -> Iterator[SipUdp]:
    peer = SipUdp(gateway_proc.sip_port)
    yield peer
    peer.close()


def no_traceback(gw: Followed, mark: int) -> None:
    time.sleep(0.05)  # the reader thread catches up with what the gateway already wrote
    out = gw.output_since(mark)
    assert "Traceback" not in out and "internal error" not in out, out[-3000:]


# --- 50,000 malformed datagrams ----------------------------------------------------------

def malformed_kinds(port: int) -> list[Callable[[int], bytes]]:
    """Every kind of malformed datagram this file knows, each made unique by `i`."""
    def via(params: str, hostport: str = f"127.0.0.1:{port}") -> Callable[[int], bytes]:
        return lambda i: request("INVITE", port, user="nobody",
                                 via=f"SIP/2.0/UDP {hostport};branch=z9hG4bK-m{i}{params}")
    return [
        lambda i: request("OPTIONS", port, via=f"SIP/2.0/UDP ???;branch=z9hG4bK-{i}"),
        lambda i: request("OPTIONS", port, from_=f"sip:1000@127.0.0.1 junk{i}".encode()),
        lambda i: request("OPTIONS", port, via=","),
        lambda i: request("ACK", port, via=","),
        via(";rport=abc"),
        via(";rport=70000"),
        via("", hostport="127.0.0.1:70000"),
        via(";received=pbx.example"),
        via("", hostport="127.0.0.1:\u0665\u0660\u0666\u0660"),
        lambda i: request("OPTIONS", port, content_length="\u0663"),
        lambda i: request("OPTIONS", port, content_length="9" * 5000),
        lambda i: request("OPTIONS", port, max_forwards="\u0667\u0660"),
        lambda i: request("OPTIONS", port, max_forwards="7" * 5000),
        lambda i: request("OPTIONS", port, cseq=f"x{i} OPTIONS"),
        lambda i: request("OPTIONS", port, uri=f"<sip:{i}@127.0.0.1>"),
        lambda i: (f"SIP/2.0 \u0662\u0660\u0660 OK\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};"
                   f"branch=z9hG4bK-{i}\r\nCall-ID: r{i}\r\nCSeq: 1 OPTIONS\r\n\r\n").encode(),
        lambda i: b"\x00\xff" * 20 + str(i).encode(),
        lambda i: request("OPTIONS", port).replace(b"\r\n\r\n", f"X-{i}: y".encode()),
    ]


def test_malformed_flood_costs_no_memory(gateway_proc, udp):
    """50,000 malformed datagrams of 18 kinds: RSS within 5 MiB of where it was after a
    warm-up of 5,000, every one handled (a marker is answered every 100), and a healthy
    OPTIONS still gets 200. Before: the bad Vias and Froms alone kept hundreds of MiB."""
    kinds = malformed_kinds(udp.port)
    mark = len(gateway_proc.lines)
    deadline = time.monotonic() + 45

    def flood(count: int) -> float:
        started = time.monotonic()
        for i in range(count):
            udp.send(kinds[i % len(kinds)](i))
            if i % 100 == 99:  # answered statelessly (400: its CSeq is not a number), and
                marker = f"marker-{next(_ids)}"  # only after everything sent before it
                udp.send(request("OPTIONS", udp.port, call_id=marker, cseq="x OPTIONS"))
                got = udp.until(marker, timeout=min(10.0, deadline - time.monotonic()))
                assert status_of(got[-1]) == 400
        return time.monotonic() - started

    warm = flood(5000)
    before = gateway_proc.proc.rss_kib()
    took = flood(50_000)
    after = gateway_proc.proc.rss_kib()
    print(f"\nmalformed flood: RSS {before} KiB after 5,000 (warm-up {warm:.1f} s), {after} KiB "
          f"after 50,000 more ({took:.1f} s, {50_000 / took:,.0f}/s): {after - before:+} KiB")
    assert after - before < 5 * 1024
    assert udp.options() == []
    no_traceback(gateway_proc, mark)
