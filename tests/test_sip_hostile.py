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

import asyncio
import itertools
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

import pytest

from gateway import faults
from gateway.config import SipConfig, SipRegistration
from gateway.service import free_port
from gateway.sip.transaction import Peer, Send
from gateway.transport import control
from gateway.transport.sip import start_sip
from tests.conftest import GatewayProcess, eventually
from tests.test_sip import SECRET, assertion

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
    """A PBX-like UDP peer on 127.0.0.1; every wait is bounded."""

    def __init__(self, sip_port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.target = ("127.0.0.1", sip_port)

    async def send(self, data: bytes) -> None:
        await self.send_to(data, self.target[1])

    async def send_to(self, data: bytes, port: int) -> None:
        await asyncio.get_running_loop().sock_sendto(self.sock, data, ("127.0.0.1", port))

    async def until(self, call_id: str, timeout: float = 5.0,
                    statuses: Collection[int] = ()) -> list[bytes]:
        """Everything that arrives up to and including the first message for `call_id`
        (with one of `statuses`, when given)."""
        loop = asyncio.get_running_loop()
        got: list[bytes] = []
        deadline = loop.time() + timeout
        while (left := deadline - loop.time()) > 0:
            try:
                data = await asyncio.wait_for(loop.sock_recv(self.sock, 65535), left)
            except TimeoutError:
                break
            got.append(data)
            if call_id_of(data) == call_id and (not statuses or status_of(data) in statuses):
                return got
        firsts = [d.split(b"\r\n")[0] for d in got]
        raise AssertionError(f"no answer for {call_id} in {timeout} s; got {firsts}")

    async def exchange(self, data: bytes, timeout: float = 5.0) -> list[int]:
        """Send `data`, then a healthy OPTIONS: the statuses `data` got (the gateway takes
        datagrams in order, so everything for it comes before the OPTIONS' 200)."""
        await self.send(data)
        return await self.options(timeout)

    async def options(self, timeout: float = 5.0) -> list[int]:
        """A healthy OPTIONS must get 200; returns the statuses that arrived before it."""
        call_id = f"healthy-{next(_ids)}"
        await self.send(request("OPTIONS", self.port, call_id=call_id))
        got = await self.until(call_id, timeout)
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
        self.sip_port = free_port("127.0.0.1")
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
        return self.exited()

    def exited(self) -> int:
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


async def test_malformed_flood_costs_no_memory(gateway_proc, udp):
    """50,000 malformed datagrams of 18 kinds: RSS within 5 MiB of where it was after a
    warm-up of 5,000, every one handled (a marker is answered every 100), and a healthy
    OPTIONS still gets 200. Before: the bad Vias and Froms alone kept hundreds of MiB."""
    kinds = malformed_kinds(udp.port)
    mark = len(gateway_proc.lines)
    deadline = time.monotonic() + 45

    async def flood(count: int) -> float:
        started = time.monotonic()
        for i in range(count):
            await udp.send(kinds[i % len(kinds)](i))
            if i % 100 == 99:  # answered statelessly (400: its CSeq is not a number), and
                marker = f"marker-{next(_ids)}"  # only after everything sent before it
                await udp.send(request("OPTIONS", udp.port, call_id=marker, cseq="x OPTIONS"))
                got = await udp.until(marker, timeout=min(10.0, deadline - time.monotonic()))
                assert status_of(got[-1]) == 400
        return time.monotonic() - started

    warm = await flood(5000)
    before = gateway_proc.proc.rss_kib()
    took = await flood(50_000)
    after = gateway_proc.proc.rss_kib()
    print(f"\nmalformed flood: RSS {before} KiB after 5,000 (warm-up {warm:.1f} s), {after} KiB "
          f"after 50,000 more ({took:.1f} s, {50_000 / took:,.0f}/s): {after - before:+} KiB")
    assert after - before < 5 * 1024
    assert await udp.options() == []
    no_traceback(gateway_proc, mark)


# --- each hostile value: 400 or silence, never a ring, never a traceback -------------------

def invite_via(params: str, hostport: str = "127.0.0.1:{port}",
               method: str = "INVITE") -> Callable[[int, str], bytes]:
    """An INVITE (for a user who would ring) whose top Via says something hostile."""
    return lambda port, transport: request(
        method, port, transport=transport,
        via=f"SIP/2.0/{transport} {hostport.format(port=port)};branch=z9hG4bK-v{next(_ids)}"
            f"{params}")


def invite(method: str = "INVITE", **parts: str) -> Callable[[int, str], bytes]:
    return lambda port, transport: request(method, port, transport=transport, **parts)


ARABIC_5060 = "\u0665\u0660\u0666\u0660"
HOSTILE: dict[str, tuple[Callable[[int, str], bytes], list[int]]] = {
    "via-comma": (invite(via=","), []),  # no Via value: nowhere to match an answer
    "rport-abc": (invite_via(";rport=abc"), [400]),
    "rport-70000": (invite_via(";rport=70000"), [400]),
    "rport-0": (invite_via(";rport=0"), [400]),
    "via-port-70000": (invite_via("", hostport="127.0.0.1:70000"), [400]),
    "via-port-arabic": (invite_via("", hostport=f"127.0.0.1:{ARABIC_5060}"), [400]),
    "received-hostname": (invite_via(";rport;received=pbx.example"), [400]),
    "content-length-arabic": (invite(content_length="\u0660"), [400]),
    "content-length-5000-digits": (invite(content_length="9" * 5000), [400]),
    "max-forwards-arabic": (invite(max_forwards="\u0667\u0660"), [400]),
    "max-forwards-5000-digits": (invite(max_forwards="7" * 5000), [400]),
    "cseq-arabic": (invite(cseq="\u0661 INVITE"), [400]),
    "ack-via-comma": (invite("ACK", via=","), []),  # an ACK is never answered
    "ack-cseq-words": (invite("ACK", cseq="one INVITE"), []),
}
OVER_TCP = ["rport-abc", "via-port-70000", "received-hostname", "max-forwards-arabic",
            "max-forwards-5000-digits", "cseq-arabic", "ack-via-comma", "via-comma"]


@pytest.mark.parametrize("name", sorted(HOSTILE))
async def test_hostile_value_over_udp(gateway_proc, udp, name):
    """Answered 400 at the packet's source, or not at all: never 100/180 (a ring), and the
    next healthy OPTIONS is answered. Before: tracebacks (Via ',', rport=abc, 5000 digits),
    answers sent to port 70000 or to pbx.example, calls rung for Arabic-Indic digits."""
    make, expected = HOSTILE[name]
    mark = len(gateway_proc.lines)
    assert await udp.exchange(make(udp.port, "UDP")) == expected
    no_traceback(gateway_proc, mark)


@pytest.mark.parametrize("name", OVER_TCP)
def test_hostile_value_over_tcp(gateway_proc, name):
    """The same over TCP: the answer on the same connection, which stays open."""
    make, expected = HOSTILE[name]
    mark = len(gateway_proc.lines)
    tcp = SipTcp(gateway_proc.sip_port)
    try:
        assert tcp.exchange(make(tcp.port, "TCP")) == expected
    finally:
        tcp.close()
    no_traceback(gateway_proc, mark)


def test_unframeable_tcp_stream_closes_that_connection_only(gateway_proc):
    """A Content-Length that cannot frame a stream closes that one connection (its next
    message cannot be found); another connection is served. Before, thousands of digits
    raised inside data_received (a logged traceback)."""
    mark = len(gateway_proc.lines)
    bad, good = SipTcp(gateway_proc.sip_port), SipTcp(gateway_proc.sip_port)
    try:
        bad.send(request("OPTIONS", bad.port, transport="TCP", content_length="9" * 5000))
        assert bad.read() is None  # closed, nothing answered
        assert good.exchange(b"") == []
    finally:
        bad.close()
        good.close()
    no_traceback(gateway_proc, mark)


async def test_responses_go_to_the_real_source(gateway_proc, udp):
    """received/rport are stamped from the socket, whatever the Via claims (RFC 3261
    18.2.1, RFC 3581); without rport the sent-by port is used (RFC 3261 18.2.2)."""
    call_id = f"liar-{next(_ids)}"
    await udp.send(request("OPTIONS", udp.port, call_id=call_id,
                           via="SIP/2.0/UDP 192.0.2.7:5999;branch=z9hG4bK-liar;rport=5999;"
                               "received=127.0.0.2"))
    (answer,) = await udp.until(call_id)
    via = re.search(rb"(?im)^via: (.*)$", answer).group(1).decode().strip()
    assert status_of(answer) == 200
    assert via == (f"SIP/2.0/UDP 192.0.2.7:5999;branch=z9hG4bK-liar;rport={udp.port};"
                   "received=127.0.0.1")
    listener = SipUdp(gateway_proc.sip_port)  # sent-by names another port of this host
    try:
        call_id = f"sent-by-{next(_ids)}"
        await udp.send(request("OPTIONS", udp.port, call_id=call_id,
                               via=f"SIP/2.0/UDP 127.0.0.1:{listener.port};branch=z9hG4bK-sb"))
        (answer,) = await listener.until(call_id)
        assert status_of(answer) == 200
    finally:
        listener.close()


async def test_unanswerable_invites_do_not_fill_the_transaction_table(gateway_proc, udp):
    """4,200 INVITEs whose Via says received=<a host name> (more than the 4,096-entry
    table): each is answered 400 at its source and keeps no transaction, so an OPTIONS and
    an INVITE after them are served. Before: the answers went to the host name, the
    transactions never ended, and everything after got 503 for good."""
    mark = len(gateway_proc.lines)
    for batch in range(42):
        for _ in range(100):
            await udp.send(invite_via(";received=pbx.example")(udp.port, "UDP"))
        statuses = await udp.options()
        assert statuses == [400] * 100, (batch, statuses[:5])
    call_id = f"after-{next(_ids)}"
    await udp.send(request("INVITE", udp.port, user="nobody", call_id=call_id))
    got = await udp.until(call_id)
    assert status_of(got[-1]) in (100, 480)
    no_traceback(gateway_proc, mark)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_port_70000_under_both_event_loops(tmp_path, loop):
    """A Via port or rport of 70000 gets 400 at the source; the UDP listener stays open.
    Before: asyncio's loop closed the SIP UDP socket (OverflowError in sendto), uvloop sent
    the answer to port 4464."""
    gw = Followed(tmp_path, loop=loop)
    udp = SipUdp(gw.sip_port)
    try:
        for params, hostport in (("", "127.0.0.1:70000"), (";rport=70000", "127.0.0.1:{port}")):
            for method in ("OPTIONS", "INVITE"):
                make = invite_via(params, hostport=hostport, method=method)
                assert await udp.exchange(make(udp.port, "UDP")) == [400]
        assert await udp.options() == []
        assert gw.stop() == 0
        out = gw.output_since(0)
        assert "Traceback" not in out and "internal error" not in out, out[-3000:]
    finally:
        udp.close()
        gw.kill()


# --- what real PBXs send still rings; a MESSAGE too big for a push is 513 -------------------

@pytest.fixture
async def sip_gw(gateway_factory, tmp_path):
    """An in-process gateway whose devices bind to users by assertion, SIP on UDP and TCP."""
    secret = tmp_path / "jwt.secret"
    secret.write_text(SECRET)
    gw = await gateway_factory(assertions={"hs256_secret_file": str(secret)})
    gw.sip = await start_sip(SipConfig(host="127.0.0.1", port=free_port("127.0.0.1"),
                                       ring_window=8.0, reach_timeout=3.0),
                             gw.delivery, gw.store, gw.metrics, "lpgw-test", gw.pump)
    yield gw
    await gw.sip.stop()


@pytest.fixture
def pbx(sip_gw) -> Iterator[SipUdp]:
    peer = SipUdp(sip_gw.sip.port)
    yield peer
    peer.close()


@pytest.fixture(autouse=True)
def _log_budget():
    faults.reset_log_limits()
    yield
    faults.reset_log_limits()


def internal(gw, where: str) -> float:
    return gw.metrics.value("lpgw_internal_errors_total", where=where)


async def test_latin1_display_name_rings_readably(sip_gw, devices, pbx):
    """A PBX's Latin-1 display name (not UTF-8, as RFC 3261 wants) rings, and the phone
    shows it readably. Before: 400 "headers are not UTF-8", no call."""
    device = devices(sip_gw, "quic", assertion=assertion("nurse"))
    await device.welcome()
    call_id = f"latin1-{next(_ids)}"
    await pbx.send(request("INVITE", pbx.port, call_id=call_id,
                           from_='"José Müller" <sip:2001@127.0.0.1>;tag=pbx'.encode("latin-1")))
    call = (await device.next("push"))["payload"]["call"]
    assert call["display_name"] == "José Müller" and call["from"] == "sip:2001@127.0.0.1"
    got = await pbx.until(call_id, statuses=[180])
    assert [status_of(d) for d in got if call_id_of(d) == call_id] == [100, 180]


async def test_message_too_large_for_a_push_is_513(sip_gw, devices, pbx):
    """A MESSAGE whose push would pass the 4096-byte alert limit gets 513 Message Too Large
    (480 told the PBX the nurse was away); one in Latin-1 with its charset arrives readably."""
    device = devices(sip_gw, "tls", assertion=assertion("nurse"))
    await device.welcome()
    call_id = f"big-{next(_ids)}"
    await pbx.send(request("MESSAGE", pbx.port, call_id=call_id, body=b"x" * 5000,
                           extra="Content-Type: text/plain\r\n"))
    (answer,) = await pbx.until(call_id)
    assert status_of(answer) == 513 and b"Message Too Large" in answer.split(b"\r\n")[0]
    call_id = f"latin1-{next(_ids)}"
    text = "Zimmer 12: Frau Müller ruft"
    await pbx.send(request("MESSAGE", pbx.port, call_id=call_id, body=text.encode("latin-1"),
                           extra="Content-Type: text/plain; charset=ISO-8859-1\r\n"))
    (answer,) = await pbx.until(call_id)
    assert status_of(answer) == 200
    push = await device.next("push")  # the first push: the big one never went out
    assert push["payload"]["message"]["text"] == text


# --- a failure in the bridge costs one transaction or one timer tick -----------------------

async def test_a_failing_request_costs_its_own_transaction(sip_gw, pbx):
    """The bridge's work for one request raises (injected: no real input is known to any
    more): that request gets 500, its transaction ends, it is counted, and the next request
    is served. Before: no answer, a traceback per datagram, the transaction never ended."""
    bridge = sip_gw.sip.bridge
    original = bridge._request

    def failing(tx, now):
        bridge._request = original
        raise RuntimeError("injected failure")

    bridge._request = failing
    call_id = f"boom-{next(_ids)}"
    await pbx.send(request("OPTIONS", pbx.port, call_id=call_id))
    (answer,) = await pbx.until(call_id)
    assert status_of(answer) == 500
    assert internal(sip_gw, "sip_request") == 1
    assert [tx.state for tx in bridge.tx.server.values()
            if tx.request.call_id == call_id] == ["completed"]
    assert await pbx.options() == []


async def test_an_unsendable_response_still_ends_its_transaction(sip_gw, pbx):
    """Every answer to one INVITE fails to go out (injected in the SIP transport's write):
    its transaction still ends instead of staying in the table for good, and others are
    answered. Before: the first failing send (the 100) left it 'proceeding' forever; now
    the bridge only returns what to send, so no failure to send can reach it at all."""
    transport = sip_gw.sip
    original = transport._send_one
    call_id = f"unsendable-{next(_ids)}"

    def failing(send):
        if call_id.encode() in send.data:
            raise OSError("injected: cannot send")
        original(send)

    transport._send_one = failing
    await pbx.send(request("INVITE", pbx.port, user="nobody", call_id=call_id))
    assert await pbx.options() == []  # nothing for the INVITE, the OPTIONS answered
    states = [tx.state for tx in sip_gw.sip.bridge.tx.server.values()
              if tx.request.call_id == call_id]
    assert states in ([], ["completed"], ["terminated"])
    assert internal(sip_gw, "sip_send") >= 1


async def test_a_failing_answer_costs_the_phone_nothing(sip_gw, devices, pbx):
    """The 180 for a phone's ack raises (injected; the real trigger, rport=abc, is now
    refused with 400): counted under sip_answer, the phone keeps its connection, and the
    call can still be cancelled. Before: the failure went up into the phone's QUIC
    connection, which was closed with bye internal_error."""
    device = devices(sip_gw, "quic", assertion=assertion("nurse"))
    await device.welcome()
    bridge = sip_gw.sip.bridge
    original = bridge._reply

    def failing(tx, status, now, *args, **kwargs):
        if status == 180:
            raise RuntimeError("injected failure in the 180")
        return original(tx, status, now, *args, **kwargs)

    bridge._reply = failing
    call_id = f"answer-{next(_ids)}"
    via = f"SIP/2.0/UDP 127.0.0.1:{pbx.port};branch=z9hG4bK-answer;rport"
    await pbx.send(request("INVITE", pbx.port, call_id=call_id, via=via))
    await device.next("push")
    await eventually(lambda: internal(sip_gw, "sip_answer") == 1)
    await pbx.send(request("CANCEL", pbx.port, call_id=call_id, via=via))
    got = await pbx.until(call_id, statuses=[487])
    assert [status_of(d) for d in got if call_id_of(d) == call_id] in ([100, 200, 487],
                                                                        [100, 487, 200])
    ended = (await device.next("push"))["payload"]["call_ended"]
    assert ended["status"] == 487
    assert [e for e in device.log if e["event"] == "disconnected"] == []


async def test_a_failing_timer_tick_is_contained_and_rearmed(sip_gw, pbx):
    """The bridge's timer raises (injected): counted, not called again at once (no spin),
    and armed again so the timers run once it works: a 480 is retransmitted with no
    datagram from anyone to re-arm it. Before: the first failure stopped every SIP timer."""
    bridge = sip_gw.sip.bridge
    original = bridge.handle_timer
    calls: list[float] = []

    def failing(now):
        calls.append(now)
        raise RuntimeError("injected timer failure")

    bridge.handle_timer = failing
    call_id = f"timer-{next(_ids)}"
    await pbx.send(request("INVITE", pbx.port, user="nobody", call_id=call_id))
    await pbx.until(call_id, statuses=[480])
    await eventually(lambda: calls, timeout=3)  # timer G's first retransmission, failed
    await asyncio.sleep(0.5)
    assert len(calls) == 1  # not again at once
    assert internal(sip_gw, "sip_timer") == 1
    bridge.handle_timer = original
    got = await pbx.until(call_id, timeout=3, statuses=[480])  # retransmitted after all
    assert status_of(got[-1]) == 480


async def test_one_unsendable_answer_does_not_stop_the_others(sip_gw, pbx):
    """Of two answers, the first to a port that does not exist: it is dropped and counted,
    the second arrives, and the UDP listener stays open. Before (asyncio's loop): the
    socket was closed by the first, and the second never went out."""
    sip_gw.sip.carry_out([Send(b"first", Peer("udp", "127.0.0.1", 70000)),
                          Send(b"second", Peer("udp", "127.0.0.1", pbx.port))])
    async with asyncio.timeout(3):
        assert await asyncio.get_running_loop().sock_recv(pbx.sock, 100) == b"second"
    assert sip_gw.metrics.value("lpgw_sip_errors_total", kind="bad_destination") == 1
    assert await pbx.options() == []


# --- lpgw toward a PBX that says odd things ------------------------------------------------

@pytest.fixture
async def linked(gateway_factory, tmp_path):
    """A bare UDP socket as the PBX, and an in-process gateway registering 2001 with it
    and pinging it every second."""
    secret = tmp_path / "2001.secret"
    secret.write_text("s3cret\n")
    pbx = SipUdp(0)
    gw = await gateway_factory()
    try:
        gw.sip = await start_sip(SipConfig(
            host="127.0.0.1", port=free_port("127.0.0.1"), pbx_host="127.0.0.1",
            pbx_port=pbx.port, keepalive_interval=1,
            register=(SipRegistration(user="2001", password_file=str(secret)),)),
            gw.delivery, gw.store, gw.metrics, "lpgw-test", gw.pump)
        yield pbx, gw
    finally:
        pbx.close()
        if gw.sip is not None:
            await gw.sip.stop()


def copied(msg: bytes, start: str, names: str, extra: str = "") -> bytes:
    """`start`, then `msg`'s header lines named in `names` ('via|from|...'), then `extra`."""
    lines = [line for line in msg.split(b"\r\n") if re.match(rf"(?i)({names})\s*:".encode(), line)]
    return (f"{start}\r\n".encode() + b"\r\n".join(lines)
            + f"\r\n{extra}Content-Length: 0\r\n\r\n".encode())


def answer(req: bytes, status: str, extra: str = "") -> bytes:
    """A response to `req`: its Via, From, To, Call-ID and CSeq, then `extra` headers."""
    return copied(req, f"SIP/2.0 {status}", "via|from|to|call-id|cseq", extra)


def ack_for(final: bytes) -> bytes:
    """The ACK for a non-2xx final answer to an INVITE (RFC 3261 17.1.1.3)."""
    return copied(final, "ACK sip:nurse@127.0.0.1 SIP/2.0", "via|from|to|call-id",
                  "CSeq: 1 ACK\r\nMax-Forwards: 70\r\n")


async def next_request(pbx: SipUdp, method: str, timeout: float = 5.0) -> bytes:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        while True:
            data = await loop.sock_recv(pbx.sock, 65535)
            if data.startswith(method.encode() + b" "):
                return data


async def test_unanswerable_digest_challenge_fails_the_registration_not_the_timers(linked):
    """A registrar that challenges with a digest algorithm lpgw lacks: the registration is
    'failed' with that reason and retried later; the OPTIONS keepalive (a timer) goes on.
    Before: the timer raised, every SIP timer stopped, the registration hung in
    'registering' without a word."""
    pbx, gw = linked
    register = await next_request(pbx, "REGISTER")
    await pbx.send_to(answer(register, "401 Unauthorized",
                             'WWW-Authenticate: Digest realm="pbx.test", nonce="n1", '
                             'algorithm=SHA-512-256\r\n'), gw.sip.port)
    ping = await next_request(pbx, "OPTIONS", timeout=3)
    await pbx.send_to(answer(ping, "200 OK"), gw.sip.port)
    (reg,) = gw.sip.bridge.status(time.time())["pbx"]["registrations"]
    assert reg["state"] == "failed" and "SHA-512-256" in reg["error"]
    assert gw.sip.bridge.pbx.registrations[0].due > time.time() + 3  # backing off
    await eventually(lambda: gw.sip.bridge.pbx.pbx_ok is True)


async def test_status_code_in_other_digits_is_not_an_answer(linked):
    """'SIP/2.0 ٢٠٠ OK' (Arabic-Indic digits pass str.isdigit) is no answer to lpgw's
    OPTIONS: the request is retransmitted (timer E) until a real 200 comes. Before: it
    was taken for 200 and the PBX marked reachable."""
    pbx, gw = linked
    await next_request(pbx, "REGISTER")  # left unanswered
    ping = await next_request(pbx, "OPTIONS", timeout=3)
    await pbx.send_to(answer(ping, "\u0662\u0660\u0660 OK"), gw.sip.port)
    again = await next_request(pbx, "OPTIONS", timeout=2)
    assert again == ping  # the same request (its branch too), retransmitted
    assert gw.sip.bridge.pbx.pbx_ok is None
    await pbx.send_to(answer(again, "200 OK"), gw.sip.port)
    await eventually(lambda: gw.sip.bridge.pbx.pbx_ok is True)


async def test_a_pbx_named_by_host_name_is_reached_under_uvloop(tmp_path):
    """`sip.pbx_host: localhost` (docs/sip.md names the PBX by name) under `lpgw run`'s
    default uvloop: the keepalive OPTIONS reaches it. Before: uvloop's sendto refused the
    name, which raised in the timer; nothing was ever sent to the PBX."""
    pbx = SipUdp(0)
    gw = Followed(tmp_path, pbx_host="localhost", pbx_port=pbx.port, keepalive_interval=1)
    try:
        ping = await next_request(pbx, "OPTIONS", timeout=4)
        assert ping.startswith(f"OPTIONS sip:127.0.0.1:{pbx.port} SIP/2.0".encode())
    finally:
        pbx.close()
        gw.kill()


# --- SIGTERM with a call open ---------------------------------------------------------------

async def test_sigterm_with_a_call_open_drains(tmp_path, devices):
    """`lpgw run` with a QUIC phone ringing for one call, after an INVITE whose Via says
    rport=abc for the same user (answered 400, never rung): SIGTERM ends the open call with
    a final answer to the PBX and exits 0 without a traceback. Before: the rport=abc INVITE
    raised in the shell (no answer, a traceback) after ringing the phone."""
    gw = Followed(tmp_path, ring_window=60)
    pbx = SipUdp(gw.sip_port)
    try:
        handle = gw.proc.handle()
        nurse = devices(handle, "quic", reconnect=False)
        token = await nurse.welcome()
        reply = await control.request(handle.config.control_path,
                                      {"op": "bind", "token": token, "user": "nurse"})
        assert reply["ok"], reply
        open_call = f"open-{next(_ids)}"
        await pbx.send(request("INVITE", pbx.port, call_id=open_call))
        await pbx.until(open_call, statuses=[180])  # the phone took it: ringing
        await nurse.next("push")
        assert await pbx.exchange(invite_via(";rport=abc")(pbx.port, "UDP")) == [400]
        gw.proc.proc.send_signal(signal.SIGTERM)
        final = (await pbx.until(open_call, statuses=range(300, 700)))[-1]
        assert status_of(final) in (480, 503)
        await pbx.send(ack_for(final))  # the PBX's ACK lets the drain end early
        assert await asyncio.to_thread(gw.exited) == 0
        calls = [e["payload"]["call"]["sip_call_id"] for e in nurse.log
                 if e["event"] == "push" and "call" in e["payload"]]
        assert calls == [open_call]  # the rport=abc INVITE never rang
        out = gw.output_since(0)
        assert "Traceback" not in out and "internal error" not in out, out[-3000:]
    finally:
        pbx.close()
        gw.kill()
