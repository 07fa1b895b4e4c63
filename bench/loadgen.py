"""Simulated devices by the thousand, and the *idle* scenario.

The load generator runs worker processes (multiprocessing, fork), each an asyncio loop that
holds many lightweight devices:

- lpgw/1 over TLS: TCP + `gateway.transport.tls.TlsStream` (ssl.MemoryBIO, no 256 KiB
  buffer per connection) driving `gateway.protocol.session.DeviceSession`;
- lpgw/1 over QUIC: one aioquic `QuicConnection` and one UDP socket per device, driven by a
  small datagram protocol (no asyncio.Event or stream readers per connection);
- MQTT 3.1.1 over TLS (for the Mosquitto peer): the same TlsStream with a minimal MQTT
  codec (CONNECT/CONNACK, SUBSCRIBE/SUBACK, PUBLISH QoS 1/PUBACK, PINGREQ/PINGRESP).

Devices pin the gateway's key (SHA-256 of the SPKI), answer pings, ack pushes, retry with
backoff when a connection fails before it is welcomed, and count everything. Workers take
commands and report counts and timings back over a pipe. Every worker binds its own
loopback source address (127.0.0.2, 127.0.0.3, ...) so ephemeral ports never run out.

The idle scenario (this file's command line): start the gateway (`python -m gateway.cli
run -c CFG`, discovery, SIP and the API off), connect devices in steps (N = 1k, 2k, ...),
and at each step let them heartbeat for a while and read the gateway's RSS (/proc/PID/status)
and CPU (/proc/PID/task/*/schedstat).

    .venv/bin/python bench/loadgen.py --transport tls --devices 1000,2000,5000,10000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import gc
import json
import math
import multiprocessing as mp
import os
import platform
import random
import resource
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from aioquic.quic import events as qevents  # noqa: E402
from aioquic.quic.configuration import QuicConfiguration  # noqa: E402
from aioquic.quic.connection import QuicConnection  # noqa: E402
from cryptography.hazmat.primitives.serialization import Encoding  # noqa: E402

from gateway import internals  # noqa: E402
from gateway.certs import pin_of_der  # noqa: E402
from gateway.core.metrics import Metrics  # noqa: E402
from gateway.protocol import ALPN, VERSIONS  # noqa: E402
from gateway.protocol.frames import HEADER, encode_frame  # noqa: E402
from gateway.protocol.messages import ByeReason, Hello  # noqa: E402
from gateway.protocol.session import Closed, DeviceSession, PushReceived, Welcomed  # noqa: E402
from gateway.service import watch_garbage_collector  # noqa: E402
from gateway.transport.link import ignore  # noqa: E402
from gateway.transport.tls import TlsStream  # noqa: E402

RESULTS = ROOT / "bench" / "results"
TOPIC = "com.example.bench"
# Every result this command writes carries it: figures compared "on the same run" (lpgw
# beside Mosquitto) are the ones that share it.
RUN_ID = f"{datetime.datetime.now(datetime.UTC):%Y%m%dT%H%M%SZ}-{os.getpid()}"
# A push whose payload carries this key (time.monotonic_ns() when the publisher wrote it)
# is timed at the device: CLOCK_MONOTONIC is one clock for every process on the machine.
STAMP = "bench_t"
STAMPED = '{"aps":{"alert":"Bed 12 calls"},"ward":3,"' + STAMP + '":%d}'  # % monotonic_ns()
FINAL = {ByeReason.REPLACED, ByeReason.UNREGISTERED, ByeReason.UNAUTHORIZED,
         ByeReason.UNSUPPORTED_VERSION, "pin_mismatch"}
CLK_TCK = os.sysconf("SC_CLK_TCK")

# CPU placement: the server under test gets a core of its own (as a gateway whose phones
# are other machines would), the load generator the others. None: no pinning.
CPUS: dict[str, set[int]] | None = None
CPU_PLAN: dict[str, Any] = {"pinned": False}


def stop_on_sigterm() -> None:
    """SIGTERM (e.g. from `timeout`) unwinds like an exception, so every `finally` stops
    the processes this run started."""
    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, handler)


def plan_cpus(pin: bool) -> dict[str, Any]:
    """Pin the server to CPU 0 and this harness and its workers to the rest (2+ cores)."""
    global CPUS, CPU_PLAN
    stop_on_sigterm()
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        CPUS, CPU_PLAN = None, {"pinned": False}
        return CPU_PLAN
    CPUS = {"server": {cpus[0]}, "clients": set(cpus[1:])}
    os.sched_setaffinity(0, CPUS["clients"])
    CPU_PLAN = {"pinned": True, "server_cpus": sorted(CPUS["server"]),
                "loadgen_cpus": sorted(CPUS["clients"])}
    return CPU_PLAN


def pin_server(pid: int) -> None:
    if CPUS is not None:
        os.sched_setaffinity(pid, CPUS["server"])
FD_RESERVE = 256  # descriptors a process needs besides its connections


# --- the machine and the processes under test ---------------------------------------------


def raise_nofile() -> dict[str, int]:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {"soft": soft, "hard": hard}


def cap_devices(wanted: int, per_connection_fds: int = 1) -> tuple[int, str | None]:
    """The most devices the open-file limit lets one server process hold."""
    limit = raise_nofile()["soft"]
    most = (limit - FD_RESERVE) // per_connection_fds
    if wanted > most:
        return most, (f"capped at {most} devices by RLIMIT_NOFILE={limit} "
                      f"(the server holds one descriptor per TCP connection)")
    return wanted, None


def machine() -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError, ValueError):
        mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
    return {"cores": os.cpu_count(), "cpu_model": model, "memory_mib": mem,
            "python": platform.python_version(), "implementation": platform.python_implementation(),
            "kernel": platform.release(), "openssl": ssl.OPENSSL_VERSION,
            "nofile": raise_nofile()}


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"head": git("rev-parse", "HEAD"),
            "gateway_changes": git("status", "--short", "gateway/").splitlines()}


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


class Proc:
    """RSS and CPU of one process, from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def status(self, field: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"no {field} for pid {self.pid}")

    def rss_kib(self) -> int:
        return self.status("VmRSS")

    def hwm_kib(self) -> int:
        return self.status("VmHWM")

    def cpu_seconds(self) -> float:
        """CPU time of the server's threads, in nanoseconds from /proc/PID/task/*/schedstat:
        utime + stime in /proc/PID/stat count 10 ms ticks, too coarse for a few handshakes.
        The servers measured here keep their threads for their whole life (a thread that
        ended would take its time with it); /proc/PID/stat where schedstat is missing."""
        try:
            total = 0
            for task in Path(f"/proc/{self.pid}/task").iterdir():
                with contextlib.suppress(FileNotFoundError):  # a thread that just ended
                    total += int((task / "schedstat").read_text().split()[0])
            return total / 1e9
        except (FileNotFoundError, ValueError, IndexError):
            raw = Path(f"/proc/{self.pid}/stat").read_text()
            fields = raw[raw.rindex(")") + 2:].split()
            return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def kernel_counters() -> dict[str, int]:
    """System-wide drop counters that explain slow storms: UDP receive-buffer overflows
    (QUIC datagrams lost) and TCP listen-queue overflows (SYNs dropped by a full backlog)."""
    out: dict[str, int] = {}
    wanted = {("Udp", "RcvbufErrors"): "udp_rcvbuf_errors",
              ("TcpExt", "ListenOverflows"): "tcp_listen_overflows",
              ("TcpExt", "ListenDrops"): "tcp_listen_drops",
              ("TcpExt", "TCPReqQFullDrop"): "tcp_syn_queue_full_drops"}
    for name in ("/proc/net/snmp", "/proc/net/netstat"):
        with contextlib.suppress(OSError):
            lines = Path(name).read_text().splitlines()
            for head, vals in zip(lines[::2], lines[1::2], strict=False):
                proto, keys = head.split(":")[0], head.split()[1:]
                for k, v in zip(keys, vals.split()[1:], strict=False):
                    if (proto, k) in wanted:
                        out[wanted[(proto, k)]] = int(v)
    return out


def counters_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after}


def system_busy_seconds() -> float:
    """CPU seconds all processes on this machine have used (/proc/stat, all cores)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / CLK_TCK


def cpu_of(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, RuntimeError, ValueError):
            total += Proc(pid).cpu_seconds()
    return total


class Background:
    """How busy the rest of the machine is while we measure (other users' processes).

    Everything the system used minus what the server, the workers and this harness used,
    in cores (1.0 = one core busy all the time). Wall-clock figures (storm times) are only
    as good as this is small; CPU-seconds figures are less affected.
    """

    def __init__(self, pids: list[int]) -> None:
        self.pids = [*pids, os.getpid()]
        self.t0, self.sys0, self.ours0 = time.monotonic(), system_busy_seconds(), cpu_of(self.pids)

    def cores(self) -> float:
        wall = max(1e-6, time.monotonic() - self.t0)
        others = (system_busy_seconds() - self.sys0) - (cpu_of(self.pids) - self.ours0)
        return round(max(0.0, others) / wall, 2)


def wait_for_quiet(limit: float = 0.3, most: float = 60.0) -> float:
    """Wait (at most `most` s) until other processes use less than `limit` cores; return
    the last reading."""
    if most <= 0:
        return -1.0
    deadline = time.monotonic() + most
    while True:
        b = Background([])
        time.sleep(2)
        load = b.cores()
        if load < limit or time.monotonic() > deadline:
            if load >= limit:
                print(f"note: the machine is busy with other work ({load} cores); "
                      "wall-clock figures will suffer", flush=True)
            return load


def stop_process(proc: subprocess.Popen, grace: float = 20) -> int | None:
    """SIGTERM by pid, wait, then SIGKILL by pid."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return proc.returncode


def free_port() -> int:
    """A port free on 127.0.0.1 for both TCP and UDP."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind(("127.0.0.1", 0))
            port = t.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise OSError("no free port")


# --- the system under test --------------------------------------------------------------------


class Target:
    """A server the devices talk to: started and stopped by pid, measured through /proc."""

    system = "?"
    kind = "lpgw"  # device protocol: lpgw | mqtt
    host = "127.0.0.1"

    def __init__(self, transport: str, tmp: Path, heartbeat: float) -> None:
        self.transport = transport
        self.tmp = tmp
        self.heartbeat = heartbeat
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.pin = ""
        self.log = tmp / f"{self.system}.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def pids(self) -> list[int]:
        return [self.pid]

    @property
    def meter(self) -> Proc:
        return Proc(self.pid)

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            tail = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{self.system} is not running:\n{tail}")

    def connected(self) -> int | None:
        """How many devices the server says are connected, if it can say."""
        return None

    def restart(self) -> None:
        """Kill the server (as a power cut would) and start it again on the same state."""
        if self.proc is not None:
            stop_process(self.proc, grace=0.5)
        self.start()

    def queue_pushes(self, addresses: list[str], per_device: int) -> dict[str, Any]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"system": self.system, "transport": self.transport, "heartbeat": self.heartbeat}


# An experiment, not the product: run the unchanged gateway with a bigger UDP receive buffer
# and/or TCP listen backlog, to show what those two settings are worth in a storm.
TUNED_GATEWAY = r"""
import sys
from gateway import service
service.LISTEN_BACKLOG = int(sys.argv[1])  # over what the gateway asks for (4,096)
from gateway.cli import main
sys.exit(main(sys.argv[2:]))
"""


class LpgwTarget(Target):
    system = "lpgw"

    def __init__(self, transport: str, tmp: Path, heartbeat: float = 10.0,
                 synchronous: str = "FULL", udp_rcvbuf: int | None = None,
                 backlog: int = 0, quic_budget: tuple[int, int] | None = None) -> None:
        super().__init__(transport, tmp, heartbeat)
        self.synchronous = synchronous
        self.udp_rcvbuf = udp_rcvbuf  # None: the gateway's default (listen.quic_receive_buffer)
        # (listen.quic_retry_above, quic_half_open_limit); None: the gateway's defaults
        self.quic_budget = quic_budget
        self.tuning = {"tcp_backlog": backlog}
        self.control: Path | None = None
        self.config: dict[str, Any] = {}
        self.runtime: dict[str, Any] = {}  # the gateway's runtime.json (ports, pin, pid)

    def make_config(self, state: Path) -> dict[str, Any]:
        """The gateway's configuration; a scenario that needs SIP or the API extends it."""
        listen = {"host": "127.0.0.1", "port": self.port,
                  "tls": self.transport == "tls", "quic": self.transport == "quic"}
        if self.udp_rcvbuf is not None:
            listen["quic_receive_buffer"] = self.udp_rcvbuf
        if self.quic_budget is not None:
            listen["quic_retry_above"], listen["quic_half_open_limit"] = self.quic_budget
        return {
            "state_dir": str(state),
            "listen": listen,
            "protocol": {"heartbeat": self.heartbeat, "hello_timeout": 30},
            "store": {"synchronous": self.synchronous},
            "log": {"level": "warning"},
            "api": {"enabled": False}, "sip": {"enabled": False},
            "discovery": {"enabled": False},  # never mDNS on the real interfaces
        }

    def start(self) -> None:
        self.port = self.port or free_port()  # a restart keeps its port, state and key
        state = self.tmp / "state"
        with contextlib.suppress(FileNotFoundError):
            (state / "runtime.json").unlink()
        self.config = self.make_config(state)
        cfg = self.tmp / "lpgw.yaml"
        cfg.write_text(json.dumps(self.config, indent=1))  # JSON is YAML
        out = self.log.open("w")
        command = [sys.executable, "-m", "gateway.cli", "run", "-c", str(cfg)]
        if any(self.tuning.values()):
            command[1:3] = ["-c", TUNED_GATEWAY, str(self.tuning["tcp_backlog"])]
        self.proc = subprocess.Popen(
            command, cwd=ROOT,
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        out.close()
        pin_server(self.proc.pid)
        runtime = state / "runtime.json"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            self.alive()
            if runtime.exists():
                with contextlib.suppress(ValueError):
                    rt = json.loads(runtime.read_text())
                    self.pin, self.control = rt["pin"], Path(rt["control"])
                    self.runtime = rt
                    return
            time.sleep(0.05)
        raise RuntimeError("the gateway did not start within 60 s")

    def connected(self) -> int | None:
        status = asyncio.run(control_call(self.control, [{"op": "status"}]))[0]
        return sum(status["status"]["devices"]["connected"].values())

    def queue_pushes(self, addresses: list[str], per_device: int) -> dict[str, Any]:
        """K pushes for each token through the control socket (the `lpgw send` path)."""
        payload = {"aps": {"alert": "bench"}}
        reqs = [{"op": "send", "token": tok, "push_type": "alert", "payload": payload}
                for _ in range(per_device) for tok in addresses]
        started = time.monotonic()
        replies = asyncio.run(control_call(self.control, reqs))
        took = time.monotonic() - started
        bad = [r for r in replies if not r.get("ok")]
        if bad:
            raise RuntimeError(f"{len(bad)} pushes refused, e.g. {bad[0]}")
        return {"queued": len(replies), "seconds": round(took, 3),
                "per_second": round(len(replies) / took, 1) if took else None,
                "sent_at_once": sum(1 for r in replies if r.get("sent"))}

    def describe(self) -> dict[str, Any]:
        tuned = any(self.tuning.values())
        return {**super().describe(), "config": self.config,
                "command": "python -m gateway.cli run -c CFG" + (
                    " (wrapped: bench-only socket tuning)" if tuned else ""),
                "tuning": self.tuning if tuned else None}


async def control_call(path: Path | None, requests: list[dict], window: int = 64,
                       timeout: float = 120) -> list[dict]:
    """Requests over one control-socket connection, `window` in flight; replies in order.

    The same frames as gateway.transport.control.request() (and so `lpgw send`), pipelined.
    """
    assert path is not None
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 10)
    replies: list[dict] = []
    try:
        async def read_one() -> None:
            (length,) = HEADER.unpack(await reader.readexactly(HEADER.size))
            replies.append(json.loads(await reader.readexactly(length)))

        async def run() -> None:
            for sent, req in enumerate(requests, 1):
                writer.write(encode_frame(req))
                if sent - len(replies) >= window:
                    await writer.drain()
                    await read_one()
            await writer.drain()
            while len(replies) < len(requests):
                await read_one()

        await asyncio.wait_for(run(), timeout)
    finally:
        writer.close()
    return replies


# --- MQTT 3.1.1, just enough ------------------------------------------------------------


def mqtt_len(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mqtt_str(s: str) -> bytes:
    b = s.encode()
    return len(b).to_bytes(2, "big") + b


def mqtt_connect(client_id: str, keepalive: int, clean: bool) -> bytes:
    body = mqtt_str("MQTT") + bytes([4, 0x02 if clean else 0x00]) + keepalive.to_bytes(2, "big")
    body += mqtt_str(client_id)
    return b"\x10" + mqtt_len(len(body)) + body


def mqtt_subscribe(topic: str, packet_id: int = 1, qos: int = 1) -> bytes:
    body = packet_id.to_bytes(2, "big") + mqtt_str(topic) + bytes([qos])
    return b"\x82" + mqtt_len(len(body)) + body


def mqtt_publish(topic: str, payload: bytes, packet_id: int, qos: int = 1) -> bytes:
    body = mqtt_str(topic) + (packet_id.to_bytes(2, "big") if qos else b"") + payload
    return bytes([0x30 | (qos << 1)]) + mqtt_len(len(body)) + body


PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"


def client_context(alpn: str | None) -> ssl.SSLContext:
    """TLS 1.3 to a loopback server the bench started itself: no CA to check against (the
    devices check the server's pin instead)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols([alpn])
    return ctx


def mqtt_stamp(payload: bytes) -> Any:
    """The publisher's STAMP in a PUBLISH payload (JSON), if it has one."""
    if STAMP.encode() not in payload:
        return None
    try:
        return json.loads(payload).get(STAMP)
    except (ValueError, AttributeError):
        return None


class MqttDecoder:
    """Cuts a byte stream into (packet type byte, body)."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self.buf += data
        out = []
        while len(self.buf) >= 2:
            mult, length, i = 1, 0, 1
            while True:
                if i >= len(self.buf):
                    return out
                b = self.buf[i]
                length += (b & 0x7F) * mult
                mult *= 128
                i += 1
                if not b & 0x80:
                    break
                if i > 4:
                    raise ValueError("bad MQTT remaining length")
            if len(self.buf) < i + length:
                break
            out.append((self.buf[0], bytes(self.buf[i:i + length])))
            del self.buf[:i + length]
        if not self.buf:
            self.buf = bytearray()
        return out


# --- devices (in the workers) -------------------------------------------------------------

IDLE, CONNECTING, WELCOMED, FINAL_STATE = 0, 1, 2, 3


class BenchSession(DeviceSession):
    """DeviceSession that counts the pongs it sends (one per gateway heartbeat)."""

    pongs = 0  # per process: each worker is one

    def _send(self, message: dict[str, Any]) -> None:
        if message.get("type") == "pong":
            BenchSession.pongs += 1
        super()._send(message)


class QuicClientProtocol(asyncio.DatagramProtocol):
    """One device's UDP socket: datagrams into its QuicConnection, timers, out again."""

    __slots__ = ("dev", "loop", "quic", "stream_id", "timer", "timer_at", "transport")
    heard = 0  # per process: datagrams welcomed devices received (idle: the gateway's PINGs)

    def __init__(self, dev: Device, quic: QuicConnection) -> None:
        self.dev = dev
        self.quic = quic
        self.transport: asyncio.DatagramTransport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at: float | None = None
        self.loop = asyncio.get_running_loop()
        self.stream_id: int | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.dev is None:
            return
        self.quic.receive_datagram(data, addr, now=self.loop.time())
        if self.dev.state == WELCOMED:
            QuicClientProtocol.heard += 1
        self.process()

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors: aioquic retransmits or times out on its own

    def process(self) -> None:
        event = self.quic.next_event()
        while event is not None and self.dev is not None:
            if isinstance(event, qevents.HandshakeCompleted):
                self.dev.quic_open(self)
            elif isinstance(event, qevents.StreamDataReceived):
                if event.data:
                    self.dev.on_data(event.data)
                if event.end_stream:
                    self.dev.on_lost("gateway ended the stream")
            elif isinstance(event, qevents.ConnectionTerminated):
                self.dev.on_lost(f"QUIC closed: {event.reason_phrase or event.error_code}")
            event = self.quic.next_event()
        self.transmit()

    def transmit(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        for data, addr in self.quic.datagrams_to_send(now=self.loop.time()):
            self.transport.sendto(data, addr)
        at = self.quic.get_timer()
        if self.timer is not None and self.timer_at != at:
            self.timer.cancel()
            self.timer = None
        if self.timer is None and at is not None:
            self.timer = self.loop.call_at(at, self.on_timer)
        self.timer_at = at

    def on_timer(self) -> None:
        self.timer = None
        if self.dev is None:
            return
        now = max(self.timer_at or 0.0, self.loop.time())
        self.timer_at = None
        self.quic.handle_timer(now=now)
        self.process()

    def write(self, data: bytes) -> None:
        if self.stream_id is not None:
            self.quic.send_stream_data(self.stream_id, data)
            self.transmit()

    def close(self) -> None:
        self.dev = None
        if self.transport is None or self.transport.is_closing():
            return
        with contextlib.suppress(Exception):
            self.quic.close(error_code=0, reason_phrase="bye")
            self.transmit()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.transport.close()


class Device:
    """One simulated phone: connect, hello (or MQTT CONNECT), answer, ack, count."""

    __slots__ = (
        "assertion",
        "attempts",
        "drops",
        "final",
        "gateway_id",
        "i",
        "ident",
        "last_ack",
        "mqtt",
        "mqtt_decoder",
        "pings",
        "prepared",
        "pushes",
        "retry",
        "seen",
        "session",
        "state",
        "stream",
        "subscribed",
        "t_attempt",
        "t_delivered",
        "t_push",
        "t_start",
        "t_welcome",
        "task",
        "token",
        "w",
        "want_pushes",
    )

    def __init__(self, w: Worker, i: int, ident: str) -> None:
        self.w = w
        self.i = i
        self.ident = ident
        self.assertion: str | None = None  # a user assertion (JWT) for its hello, if any
        self.state = IDLE
        self.attempts = 0
        self.t_start = 0.0
        self.t_attempt = 0.0
        self.t_welcome = 0.0
        self.t_delivered = 0.0
        self.session: DeviceSession | None = None
        self.stream: Any = None  # TlsStream or QuicClientProtocol
        self.token: str | None = None
        self.last_ack = 0
        self.gateway_id: str | None = None
        self.seen: list[str] = []
        self.pushes = 0
        self.want_pushes = 0
        self.t_push = 0.0
        self.final: str | None = None
        self.retry: asyncio.TimerHandle | None = None
        self.drops = 0
        self.mqtt = w.kind == "mqtt"
        self.mqtt_decoder: MqttDecoder | None = None
        self.pings = 0
        self.subscribed = False
        self.task: asyncio.Task | None = None
        self.prepared: tuple[QuicClientProtocol, list[tuple[bytes, Any]]] | None = None

    # connecting

    def start(self) -> None:
        """Begin connecting (the scheduled start of this device in this round)."""
        self.t_start = self.w.loop.time()
        self.attempt()

    def attempt(self) -> None:
        self.retry = None
        if self.state in (WELCOMED, FINAL_STATE) or self.w.stopping:
            self.drop_prepared()
            return
        prepared, self.prepared = self.prepared, None
        self.state = CONNECTING
        self.attempts += 1
        self.t_attempt = self.w.loop.time()
        self.w.inflight += 1
        if prepared is None:
            self.task = self.w.loop.create_task(self.open())
            return
        proto, first_flight = prepared
        self.stream = proto
        for data, addr in first_flight:
            proto.transport.sendto(data, addr)
        proto.transmit()  # nothing more to send yet: arms its retransmission timer

    async def prepare(self, at: float) -> None:
        """Build this phone's first QUIC flight now, for sending at `at` (loop time).

        A storm of real phones is thousands of CPUs each building its own ClientHello
        (~0.6 ms of Python here: key share, Initial keys, packet; ~1.2 ms with its socket).
        One load-generator core building 10,000 of them in the storm's first second kept
        the gateway waiting (40% busy for ~9 s, measured), so the harness does it before
        the storm. aioquic is given `at` as the time, so its timers and RTT samples are as
        if built then.
        """
        proto = await self.quic_endpoint()
        proto.quic.connect((self.w.host, self.w.port), now=at)
        self.prepared = (proto, proto.quic.datagrams_to_send(now=at))

    async def quic_endpoint(self) -> QuicClientProtocol:
        """A fresh UDP socket on this worker's source address with a new QuicConnection."""
        w = self.w
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.bind((w.src, 0))
        quic = QuicConnection(configuration=w.qconfig)
        _, proto = await w.loop.create_datagram_endpoint(
            lambda: QuicClientProtocol(self, quic), sock=sock)
        return proto

    async def open(self) -> None:
        w = self.w
        try:
            if w.transport == "quic":
                proto = await self.quic_endpoint()
                self.stream = proto
                proto.quic.connect((w.host, w.port), now=w.loop.time())
                proto.transmit()
            else:
                def factory() -> TlsStream:
                    s = TlsStream(w.ctx, False, w.connect_timeout, self.tls_open, self.on_error,
                                  alpn=w.alpn)
                    s.on_lost = self.on_lost
                    self.stream = s
                    return s
                await w.loop.create_connection(factory, w.host, w.port,
                                               local_addr=(w.src, 0))
        except OSError as exc:
            self.failed(f"connect: {exc.strerror or exc}")

    def check_pin(self, der: bytes) -> bool:
        w = self.w
        if der and der == w.good_der:
            return True
        if der and pin_of_der(der) == w.pin:
            w.good_der = der
            return True
        self.final = "pin_mismatch"
        self.give_up()
        return False

    def tls_open(self, stream: TlsStream) -> None:
        if self.state != CONNECTING or stream is not self.stream:
            stream.close()
            return
        if not self.check_pin(stream.ssl.getpeercert(binary_form=True)):
            return
        stream.on_data = self.on_data
        self.opened()

    def quic_open(self, proto: QuicClientProtocol) -> None:
        if self.state != CONNECTING or proto is not self.stream:
            proto.close()
            return
        peer = internals.peer_certificate(proto.quic.tls)
        if not self.check_pin(peer.public_bytes(Encoding.DER) if peer is not None else b""):
            return
        proto.stream_id = proto.quic.get_next_available_stream_id()
        self.opened()

    def opened(self) -> None:
        """Transport up and the pin checked: say hello (or CONNECT)."""
        w = self.w
        if self.mqtt:
            self.mqtt_decoder = MqttDecoder()
            self.stream.write(mqtt_connect(self.ident, int(w.heartbeat * 1.5) + 1, w.clean))
            return
        self.session = BenchSession(
            Hello(version=VERSIONS[-1], install_id=self.ident, topic=TOPIC,
                  push_types=("alert", "voip", "background"), assertion=self.assertion,
                  last_ack=self.last_ack, gateway_id=self.gateway_id, client="lpgw-bench"),
            w.loop.time(), welcome_timeout=w.connect_timeout)
        if self.seen:
            self.session.remember_ids(self.seen)
        self.flush()

    def on_error(self, why: str) -> None:
        self.w.count("handshake_errors")

    def failed(self, why: str) -> None:
        """This attempt failed before the device was welcomed: retry with backoff."""
        if self.state != CONNECTING:
            return
        self.w.inflight -= 1
        self.w.count("attempt_failures")
        self.w.last_error = why
        self.drop_stream()
        self.state = IDLE
        w = self.w
        if w.stopping or w.loop.time() > w.deadline or self.attempts >= w.max_attempts:
            self.final = self.final or f"gave up after {self.attempts} attempts: {why}"
            self.state = FINAL_STATE
            return
        delay = min(w.backoff * 2 ** (self.attempts - 1), 8.0) * random.uniform(0.8, 1.2)
        self.retry = w.loop.call_later(delay, self.attempt)

    def give_up(self) -> None:
        if self.state == CONNECTING:
            self.w.inflight -= 1
        self.drop_stream()
        self.state = FINAL_STATE

    def drop_prepared(self) -> None:
        """A first flight built but never sent: its socket goes too."""
        prepared, self.prepared = self.prepared, None
        if prepared is not None:
            prepared[0].close()

    def drop_stream(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()  # a TCP connect still pending
        self.task = None
        self.drop_prepared()
        stream, self.stream = self.stream, None
        if isinstance(stream, TlsStream):
            stream.on_lost = stream.on_data = ignore  # no late callbacks from this one
        if stream is not None:
            stream.close()
        if self.session is not None:
            self.seen = self.session.seen_ids
            self.session = None

    def on_lost(self, why: str) -> None:
        if self.state == CONNECTING:
            self.failed(why)
        elif self.state == WELCOMED:
            self.drop_stream()
            self.state = IDLE
            self.w.count("drops")
            self.drops += 1
            if self.w.reconnect and not self.w.stopping:
                self.retry = self.w.loop.call_later(random.uniform(0.2, 1.0), self.attempt)

    def welcomed(self) -> None:
        self.state = WELCOMED
        self.t_welcome = self.w.loop.time()
        self.w.inflight -= 1
        self.w.welcomed += 1
        self.w.maybe_done()

    # talking

    def flush(self) -> None:
        if self.session is not None and self.stream is not None:
            data = self.session.data_to_send()
            if data:
                self.stream.write(data)

    def on_data(self, data: bytes) -> None:
        if self.mqtt:
            self.on_mqtt(data)
            return
        if self.session is None:
            return
        ack = 0
        for event in self.session.receive_data(data, self.w.loop.time()):
            if isinstance(event, Welcomed):
                self.token = event.welcome.token
                if event.welcome.user:
                    self.w.count("welcomed_as_user")
                if self.gateway_id != event.welcome.gateway_id:
                    self.gateway_id, self.last_ack = event.welcome.gateway_id, 0
                if self.state == CONNECTING:
                    self.welcomed()
            elif isinstance(event, PushReceived):
                ack = max(ack, event.push.seq)
                if not event.duplicate:
                    self.got_push(event.push.payload.get(STAMP))
                else:
                    self.w.count("duplicates")
            elif isinstance(event, Closed):
                self.closed_by_gateway(event.reason)
                return
        if ack and self.session is not None:
            self.session.ack(ack)
            self.last_ack = self.session.last_ack
        self.flush()

    def got_push(self, stamp: Any = None) -> None:
        if isinstance(stamp, int):
            self.w.latencies.append((time.monotonic_ns() - stamp) / 1e6)
        self.pushes += 1
        self.t_push = self.w.loop.time()
        self.w.pushes += 1
        if self.want_pushes and self.pushes >= self.want_pushes and not self.t_delivered:
            self.t_delivered = self.t_push
            self.w.delivered_devices += 1
            self.w.maybe_done()

    def closed_by_gateway(self, reason: str) -> None:
        self.w.count(f"bye_{reason}")
        if reason in FINAL:
            self.final = reason
            self.give_up()
        else:
            self.on_lost(f"bye {reason}")

    def on_mqtt(self, data: bytes) -> None:
        assert self.mqtt_decoder is not None
        try:
            packets = self.mqtt_decoder.feed(data)
        except ValueError as exc:
            self.on_lost(str(exc))
            return
        for first, body in packets:
            kind = first >> 4
            if kind == 2:  # CONNACK
                if body[1] != 0:
                    self.final = f"connack_{body[1]}"
                    self.give_up()
                    return
                if self.w.subscribe and not self.subscribed:
                    self.stream.write(mqtt_subscribe(f"bench/{self.ident}"))
                elif self.state == CONNECTING:
                    self.welcomed()
            elif kind == 9:  # SUBACK
                self.subscribed = True
                if self.state == CONNECTING:
                    self.welcomed()
            elif kind == 3:  # PUBLISH
                qos = (first >> 1) & 3
                tlen = int.from_bytes(body[:2], "big")
                if qos:
                    pid = body[2 + tlen:4 + tlen]
                    self.stream.write(b"\x40\x02" + pid)
                if first & 0x08:  # DUP: the broker re-sent it
                    self.w.count("duplicates")
                else:
                    self.got_push(mqtt_stamp(body[2 + tlen + (2 if qos else 0):]))
            elif kind == 13:  # PINGRESP
                self.pings += 1
                self.w.pings += 1

    def ping(self) -> None:
        """MQTT keepalive: the client pings (lpgw: the gateway pings and we answer)."""
        if self.mqtt and self.state == WELCOMED and self.stream is not None:
            self.stream.write(PINGREQ)

    def close(self) -> None:
        if self.retry is not None:
            self.retry.cancel()
            self.retry = None
        if self.state == CONNECTING:
            self.w.inflight -= 1
        if self.stream is not None:
            if self.mqtt and self.state == WELCOMED:
                self.stream.write(DISCONNECT)
            elif self.session is not None and self.session.closed is None:
                self.session.close(ByeReason.CLIENT)
                self.flush()
        self.drop_stream()
        if self.state != FINAL_STATE:
            self.state = IDLE


class Worker:
    """One process: an asyncio loop, its devices, and a pipe to the harness."""

    def __init__(self, conn: Connection, wid: int) -> None:
        self.conn = conn
        self.wid = wid
        self.src = f"127.0.0.{2 + wid}"
        self.devices: list[Device] = []
        self.counts: dict[str, int] = {}
        self.inflight = 0
        self.welcomed = 0
        self.pushes = 0
        self.pings = 0
        self.latencies: list[float] = []  # ms, publisher write -> device read (STAMP)
        self.delivered_devices = 0
        self.stopping = False
        self.reconnect = True
        self.deadline = 0.0
        self.max_attempts = 20
        self.backoff = 0.5
        self.last_error = ""
        self.good_der: bytes | None = None
        self.waiter: asyncio.Future | None = None
        self.target_welcomed = 0
        self.target_delivered = 0
        self.ping_task: asyncio.Task | None = None
        self.subscribe = False
        self.clean = True
        # a full pass over thousands of simulated phones stops them all at once, which a
        # real phone (one connection, its own CPU) never sees: counted, so that such a stall
        # is not taken for the server's (the gateway's own timing, on this worker)
        self.gc = Metrics()
        watch_garbage_collector(self.gc)

    def count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    async def main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.done = self.loop.create_future()
        self.loop.add_reader(self.conn.fileno(), self.on_command)
        await self.done
        for d in self.devices:
            d.close()
        await asyncio.sleep(0.1)

    def on_command(self) -> None:
        try:
            msg = self.conn.recv()
        except (EOFError, OSError):
            self.loop.remove_reader(self.conn.fileno())
            if not self.done.done():
                self.done.set_result(None)
            return
        self.loop.create_task(self.run_command(msg))

    async def run_command(self, msg: dict) -> None:
        op = msg["op"]
        try:
            reply = await getattr(self, "cmd_" + op)(**msg.get("args", {}))
        except Exception as exc:  # report, don't die: the harness decides
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        self.conn.send({"op": op, "wid": self.wid, **(reply or {})})

    async def cmd_setup(self, kind: str, transport: str, host: str, port: int, pin: str,
                        idents: list[str], heartbeat: float, connect_timeout: float = 20.0,
                        assertions: list[str | None] | None = None) -> dict:
        self.kind, self.transport, self.host, self.port = kind, transport, host, port
        self.pin = pin.removeprefix("sha256/")
        self.heartbeat = heartbeat
        self.connect_timeout = connect_timeout
        self.alpn: tuple[str | None, ...] = (ALPN,) if kind == "lpgw" else (None,)
        self.ctx = client_context(ALPN if kind == "lpgw" else None)  # the pin is the check
        self.qconfig = QuicConfiguration(is_client=True, alpn_protocols=[ALPN],
                                         verify_mode=ssl.CERT_NONE, idle_timeout=60.0)
        if transport == "quic":
            internals.offer_one_key_share()
        self.devices = [Device(self, i, ident) for i, ident in enumerate(idents)]
        for d, assertion in zip(self.devices, assertions or (), strict=False):
            d.assertion = assertion
        if kind == "mqtt":
            self.ping_task = self.loop.create_task(self.mqtt_pinger())
        return {"devices": len(self.devices)}

    async def mqtt_pinger(self) -> None:
        """Every device sends PINGREQ once per heartbeat, spread over the interval."""
        tick = 0
        slots = max(1, int(self.heartbeat * 10))
        while True:
            await asyncio.sleep(0.1)
            tick += 1
            for d in self.devices[tick % slots::slots]:
                d.ping()

    def maybe_done(self) -> None:
        if self.waiter is not None and not self.waiter.done() \
                and self.welcomed >= self.target_welcomed \
                and self.delivered_devices >= self.target_delivered:
            self.waiter.set_result(None)

    async def cmd_connect(self, first: int, count: int, start_at: float, spread: float,
                          concurrency: int, deadline: float, expect_pushes: int = 0,
                          subscribe: bool = False, clean: bool = True,
                          max_attempts: int = 20, prepare: bool = False) -> dict:
        """Connect devices [first, first+count): start times spread over `spread` seconds
        from `start_at` (monotonic), at most `concurrency` handshakes in flight (0: no cap);
        return when all are welcomed (and got `expect_pushes` each) or at `deadline`."""
        loop = self.loop
        gc.unfreeze()  # what went before may be garbage now
        targets = self.devices[first:first + count]
        self.deadline, self.max_attempts = deadline, max_attempts
        self.subscribe, self.clean, self.stopping = subscribe, clean, False
        self.welcomed = sum(1 for d in self.devices if d.state == WELCOMED)
        self.target_welcomed = self.welcomed + sum(1 for d in targets if d.state != WELCOMED)
        self.delivered_devices = 0
        self.target_delivered = len(targets) if expect_pushes else 0
        for d in targets:
            d.pushes, d.t_delivered, d.want_pushes = 0, 0.0, expect_pushes
            d.attempts, d.t_welcome, d.final = 0, 0.0, None
            if d.state == FINAL_STATE:
                d.state = IDLE
        cpu0 = time.process_time()
        self.waiter = loop.create_future()
        self.maybe_done()
        pending = [d for d in targets if d.state != WELCOMED]
        pump: asyncio.Task | None = None
        if concurrency:
            async def feed() -> None:
                for d in pending:
                    while self.inflight >= concurrency:
                        await asyncio.sleep(0.005)
                    d.start()
            await asyncio.sleep(max(0.0, start_at - loop.time()))
            pump = loop.create_task(feed())
        else:
            step = spread / max(1, len(pending))
            if prepare and self.transport == "quic":
                for k, d in enumerate(pending):
                    await d.prepare(start_at + k * step)
                late = sum(1 for k in range(len(pending)) if start_at + k * step < loop.time())
                if late:  # built after their start time: the harness asked too little time
                    self.counts["prepared_late"] = self.counts.get("prepared_late", 0) + late
            for k, d in enumerate(pending):
                loop.call_at(start_at + k * step, d.start)
        sweeper = loop.create_task(self.sweep(targets))
        try:
            await asyncio.wait_for(self.waiter, max(0.1, deadline - loop.time()))
        except TimeoutError:
            pass
        finally:
            sweeper.cancel()
            if pump is not None:
                pump.cancel()
        self.stopping = True  # no more retries from this round
        for d in targets:
            if d.retry is not None:
                d.retry.cancel()
                d.retry = None
        # the phones held now stay: no later pass of this worker's collector need visit
        # them (a full pass over 10,000 of them stalled every one for ~1 s).
        # Once the reply has gone: the harness times this command (a ramp's seconds).
        loop.call_soon(self.freeze)
        return self.report(targets, start_at, time.process_time() - cpu0)

    def freeze(self) -> None:
        gc.collect()
        gc.freeze()

    async def sweep(self, targets: list[Device]) -> None:
        """Abort attempts that take longer than connect_timeout (then they retry)."""
        while True:
            await asyncio.sleep(0.5)
            limit = self.loop.time() - self.connect_timeout
            for d in targets:
                if d.state == CONNECTING and d.t_attempt < limit:
                    self.count("attempt_timeouts")
                    d.failed("no welcome within the connect timeout")

    def report(self, targets: list[Device], start_at: float, cpu: float) -> dict:
        welcome = [d.t_welcome - start_at for d in targets if d.t_welcome]
        latency = [d.t_welcome - d.t_start for d in targets if d.t_welcome]
        delivered = [d.t_delivered - start_at for d in targets if d.t_delivered]
        return {
            "devices": len(targets),
            "welcomed": len(welcome),
            "welcome_at": welcome,
            "welcome_latency": latency,
            "delivered_at": delivered,
            "pushes": sum(d.pushes for d in targets),
            "attempts": sum(d.attempts for d in targets),
            "retried": sum(1 for d in targets if d.attempts > 1),
            "final": [d.final for d in targets if d.final],
            "not_welcomed": sum(1 for d in targets if not d.t_welcome),
            "tokens": [d.token if not d.mqtt else f"bench/{d.ident}" for d in targets],
            "counts": dict(self.counts),
            "last_error": self.last_error,
            "cpu_seconds": round(cpu, 3),
        }

    async def cmd_stats(self) -> dict:
        rusage = resource.getrusage(resource.RUSAGE_SELF)
        return {"connected": sum(1 for d in self.devices if d.state == WELCOMED),
                "pings": self.pings + BenchSession.pongs + QuicClientProtocol.heard,
                "pushes": self.pushes, "counts": dict(self.counts),
                "cpu_seconds": round(rusage.ru_utime + rusage.ru_stime, 3),
                "maxrss_kib": rusage.ru_maxrss,
                "gc_full_passes": int(self.gc.value("lpgw_gc_pause_seconds_count",
                                                    generation="2")),
                "gc_full_seconds": self.gc.value("lpgw_gc_pause_seconds_sum", generation="2")}

    async def cmd_latencies(self) -> dict:
        """The push latencies measured since the last call (and forget them)."""
        out, self.latencies = self.latencies, []
        return {"latencies": out}

    async def cmd_close(self, timeout: float = 10.0) -> dict:
        gc.unfreeze()
        self.stopping = True
        for d in self.devices:
            d.close()
        await asyncio.sleep(0.2)
        return {"closed": len(self.devices)}

    async def cmd_exit(self) -> dict:
        self.done.set_result(None)
        return {}


def worker_entry(conn: Connection, wid: int) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise_nofile()
    if CPUS is not None:
        os.sched_setaffinity(0, CPUS["clients"])
    with contextlib.suppress(KeyboardInterrupt):
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the harness stops us
        asyncio.run(Worker(conn, wid).main())


# --- the harness (in the parent) ----------------------------------------------------------


class LoadGen:
    """Worker processes and the commands to them; every worker is stopped by its pid."""

    def __init__(self, workers: int) -> None:
        self.n = workers
        self.procs: list[mp.process.BaseProcess] = []
        self.conns: list[Connection] = []
        self.split: list[tuple[int, int]] = []

    def __enter__(self) -> LoadGen:
        ctx = mp.get_context("fork")
        for wid in range(self.n):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=worker_entry, args=(child, wid), daemon=True,
                            name=f"loadgen-{wid}")
            p.start()
            child.close()
            self.procs.append(p)
            self.conns.append(parent)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid]

    def stop(self) -> None:
        for c in self.conns:
            with contextlib.suppress(OSError, ValueError):
                c.send({"op": "exit"})
        deadline = time.monotonic() + 5
        for p in self.procs:
            p.join(max(0.1, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive() and p.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
                p.join(5)
        for c in self.conns:
            c.close()
        self.procs, self.conns = [], []

    def call(self, op: str, args: list[dict] | dict | None = None,
             timeout: float = 60) -> list[dict]:
        """Send `op` to every worker (per-worker args if a list) and wait for every reply."""
        for i, c in enumerate(self.conns):
            a = args[i] if isinstance(args, list) else (args or {})
            c.send({"op": op, "args": a})
        replies: dict[int, dict] = {}
        deadline = time.monotonic() + timeout
        while len(replies) < len(self.conns):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"workers did not answer {op} within {timeout} s")
            for c in wait([c for i, c in enumerate(self.conns) if i not in replies], left):
                try:
                    msg = c.recv()
                except EOFError:
                    raise RuntimeError("a load generator worker died") from None
                if msg.get("error"):
                    raise RuntimeError(f"worker {msg['wid']}: {msg['error']}")
                replies[msg["wid"]] = msg
        return [replies[i] for i in range(len(self.conns))]

    def setup(self, target: Target, devices: int, connect_timeout: float = 20.0,
              assertions: list[str | None] | None = None) -> None:
        """`devices` simulated devices split over the workers; device i says hello with
        `assertions[i]` (a user assertion, lpgw only) when given."""
        per = math.ceil(devices / self.n)
        self.split = [(min(i * per, devices), min(per, max(0, devices - i * per)))
                      for i in range(self.n)]
        self.call("setup", [{"kind": target.kind, "transport": target.transport,
                             "host": target.host, "port": target.port, "pin": target.pin,
                             "idents": [str(uuid.uuid4()) for _ in range(count)],
                             "heartbeat": target.heartbeat, "connect_timeout": connect_timeout,
                             "assertions": assertions[first:first + count] if assertions
                             else None}
                            for first, count in self.split])

    def connect(self, upto: int, *, start_in: float = 0.3, spread: float = 1.0,
                concurrency: int = 0, timeout: float = 120, expect_pushes: int = 0,
                subscribe: bool = False, clean: bool = True, first: int = 0,
                prepare: bool = False) -> dict:
        """Connect the devices [first, upto) of each worker's share (spread evenly), all
        starting within `spread` s of a common start (or at most `concurrency` in flight
        per worker). Returns the merged report; times are seconds from the common start.
        `prepare` (QUIC): first flights are built before the start (Device.prepare);
        give `start_in` of at least `prepare_time(upto - first)`."""
        start_at = time.monotonic() + start_in
        deadline = start_at + timeout
        args = []
        for _wid, (_, count) in enumerate(self.split):
            lo = min(count, math.ceil(first * count / max(1, sum(c for _, c in self.split))))
            hi = min(count, math.ceil(upto * count / max(1, sum(c for _, c in self.split))))
            args.append({"first": lo, "count": max(0, hi - lo), "start_at": start_at,
                         "spread": spread, "concurrency": concurrency, "deadline": deadline,
                         "expect_pushes": expect_pushes, "subscribe": subscribe,
                         "clean": clean, "prepare": prepare})
        replies = self.call("connect", args, timeout=timeout + 30)
        return merge(replies)

    def prepare_time(self, devices: int) -> float:
        """Seconds to allow for building `devices` first flights: ~1.1-1.25 ms each per
        worker process, measured in the storm (with its socket and endpoint), given twice
        that and a second."""
        return 1.0 + 0.0025 * math.ceil(devices / max(1, self.n))

    def close_all(self) -> None:
        self.call("close", timeout=60)

    def latencies(self) -> list[float]:
        """Every worker's push latencies (ms) since the last call."""
        return [x for r in self.call("latencies", timeout=30) for x in r["latencies"]]

    def stats(self) -> dict:
        replies = self.call("stats", timeout=30)
        out: dict[str, Any] = {"connected": 0, "pings": 0, "pushes": 0, "cpu_seconds": 0.0,
                               "counts": {}, "gc_full_passes": 0, "gc_full_seconds": 0.0}
        for r in replies:
            for k in ("connected", "pings", "pushes", "cpu_seconds", "gc_full_passes",
                      "gc_full_seconds"):
                out[k] += r[k]
            for k, v in r["counts"].items():
                out["counts"][k] = out["counts"].get(k, 0) + v
        out["cpu_seconds"] = round(out["cpu_seconds"], 2)
        return out


def merge(replies: list[dict]) -> dict:
    out: dict[str, Any] = {"devices": 0, "welcomed": 0, "pushes": 0, "attempts": 0,
                           "retried": 0, "not_welcomed": 0, "final": [], "tokens": [],
                           "welcome_at": [], "welcome_latency": [], "delivered_at": [],
                           "counts": {}, "cpu_seconds": 0.0, "last_error": ""}
    for r in replies:
        for k in ("devices", "welcomed", "pushes", "attempts", "retried", "not_welcomed",
                  "cpu_seconds"):
            out[k] += r[k]
        for k in ("final", "tokens", "welcome_at", "welcome_latency", "delivered_at"):
            out[k].extend(r[k])
        for k, v in r["counts"].items():
            out["counts"][k] = out["counts"].get(k, 0) + v
        out["last_error"] = out["last_error"] or r["last_error"]
    return out


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def summary(values: list[float], digits: int = 3) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    return {"p50": round(pct(values, 50), digits), "p90": round(pct(values, 90), digits),
            "p99": round(pct(values, 99), digits), "max": round(max(values), digits)}


def default_workers(devices: int) -> int:
    """One worker per CPU the load generator may use, more if the fd limit needs them."""
    cores = len(CPUS["clients"]) if CPUS else (os.cpu_count() or 2)
    per_worker = max(1000, raise_nofile()["soft"] - FD_RESERVE)
    return max(min(cores, 4), math.ceil(devices / per_worker))


def result_head(scenario: str, target: Target) -> dict[str, Any]:
    """What every result starts with: what ran, against what, when, on which machine and
    commit."""
    return {"scenario": scenario, "system": target.system, "transport": target.transport,
            "when": now_iso(), "run": RUN_ID, "machine": machine(), "git": git_state()}


@contextlib.contextmanager
def running(target: Target, result: dict[str, Any], quiet_wait: float) -> Iterator[None]:
    """The machine quiet (up to `quiet_wait` s), then the server started and described in
    `result`; it is stopped by its pid at the end, whatever happens."""
    result["quiet_before_start_cores"] = wait_for_quiet(most=quiet_wait)
    target.start()
    try:
        result["target"] = target.describe()
        yield
    finally:
        target.stop()


# --- the idle scenario -------------------------------------------------------------------


def idle(target: Target, steps: list[int], *, window: float, workers: int,
         concurrency: int = 32, warmup: int = 10, settle: float = 3.0,
         budget: float = 260, quiet_wait: float = 30) -> dict[str, Any]:
    """Connect devices in steps; at each, idle `window` s and read RSS and CPU."""
    began = time.monotonic()
    top, limit_note = cap_devices(max(steps))
    steps = sorted({min(s, top) for s in steps})
    result: dict[str, Any] = {
        **result_head("idle", target),
        "settings": {"steps": steps, "window_s": window, "warmup_devices": warmup,
                     "concurrency_per_worker": concurrency, "workers": workers,
                     "settle_s": settle, "cpus": CPU_PLAN},
        "fd_limit_note": limit_note, "points": [], "complete": False}
    with running(target, result, quiet_wait):
        meter = target.meter
        with LoadGen(workers) as lg:
            lg.setup(target, warmup + steps[-1])
            # the warmup devices are connected first and excluded from the per-device figure
            r = lg.connect(warmup, concurrency=concurrency, timeout=60,
                           subscribe=target.kind == "mqtt", clean=False)
            if r["not_welcomed"]:
                raise RuntimeError(f"warmup: {r['welcomed']}/{r['devices']} welcomed "
                                   f"({r['last_error']})")
            warm = r["devices"]
            time.sleep(settle)
            base_rss = meter.rss_kib()
            result["baseline_rss_kib"] = base_rss
            connected = 0
            per_connect = 0.01  # seconds per ramped connect, refined by each step
            for n in steps:
                left = budget - (time.monotonic() - began)
                need = (n - connected) * per_connect * 1.2 + window + settle + 15
                if left < need:
                    result["stopped_early"] = (f"time budget of {budget} s: the step to {n} "
                                               f"would need ~{need:.0f} s, {left:.0f} s left")
                    print(result["stopped_early"], flush=True)
                    break
                cpu0, t0 = meter.cpu_seconds(), time.monotonic()
                r = lg.connect(warmup + n, first=warmup + connected, concurrency=concurrency,
                               timeout=min(180, left - window - 10),
                               subscribe=target.kind == "mqtt", clean=False)
                ramp_s, ramp_cpu = time.monotonic() - t0, meter.cpu_seconds() - cpu0
                new = r["devices"]
                connected = n
                per_connect = ramp_s / max(1, new)
                held = lg.stats()["connected"] - warm  # devices beyond the warmup, exactly
                time.sleep(settle)
                target.alive()
                before = lg.stats()
                background = Background(target.pids() + lg.pids)
                cpu0, t0 = meter.cpu_seconds(), time.monotonic()
                time.sleep(window)
                cpu1, t1 = meter.cpu_seconds(), time.monotonic()
                after = lg.stats()
                rss = meter.rss_kib()
                point = {
                    "devices": n, "connected": after["connected"] - warm,
                    "server_says_connected": target.connected(),
                    "rss_kib": rss,
                    "rss_per_device_bytes": round((rss - base_rss) * 1024 / max(1, held)),
                    "idle_cpu_percent": round(100 * (cpu1 - cpu0) / (t1 - t0), 2),
                    "idle_window_s": round(t1 - t0, 1),
                    "ramp_devices": new, "ramp_seconds": round(ramp_s, 2),
                    "ramp_cpu_ms_per_connect": round(1000 * ramp_cpu / new, 3) if new else None,
                    "ramp_not_welcomed": r["not_welcomed"], "ramp_retried": r["retried"],
                    "heartbeats_in_window": after["pings"] - before["pings"],
                    "drops": after["counts"].get("drops", 0),
                    "loadgen_cpu_seconds": after["cpu_seconds"],
                    "other_load_cores": background.cores(),
                }
                result["points"].append(point)
                print(f"idle {target.system}/{target.transport}: {n} devices: "
                      f"RSS {rss / 1024:.1f} MiB, {point['rss_per_device_bytes'] / 1024:.1f} KiB "
                      f"per device, idle CPU {point['idle_cpu_percent']}%, ramp "
                      f"{point['ramp_seconds']} s ({point['ramp_cpu_ms_per_connect']} ms CPU "
                      f"per connect)", flush=True)
                if r["not_welcomed"]:
                    result["stopped_early"] = (f"{r['not_welcomed']} devices not welcomed "
                                               f"({r['last_error']})")
                    break
            result["final_rss_hwm_kib"] = meter.hwm_kib()
            lg.close_all()
        result["complete"] = "stopped_early" not in result
    result["seconds"] = round(time.monotonic() - began, 1)
    return result


def parse_steps(text: str) -> list[int]:
    return [int(float(x.strip().lower().replace("k", "e3"))) for x in text.split(",") if x.strip()]


def common_arguments(p: argparse.ArgumentParser, others: str, quiet_wait: float = 30,
                     tag: bool = True) -> None:
    """The switches every scenario has: machine quiet, CPU placement, where results go."""
    p.add_argument("--quiet-wait", type=float, default=quiet_wait,
                   help="wait up to this long for other processes to go quiet first")
    p.add_argument("--no-pin", action="store_true",
                   help=f"don't give the server a CPU of its own (default: CPU 0 for it, "
                        f"the rest for {others})")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--no-report", action="store_true", help="skip writing files")
    if tag:
        p.add_argument("--tag", default="", help="suffix for the result files (experiments)")


def main() -> None:
    p = argparse.ArgumentParser(description="idle devices: gateway RSS per device and CPU")
    p.add_argument("--transport", choices=("tls", "quic", "both"), default="both")
    p.add_argument("--devices", default="1000,2000,5000,10000",
                   help="comma-separated steps (e.g. 1k,2k,5k,10k)")
    p.add_argument("--window", type=float, default=20.0,
                   help="seconds of idling measured at each step (two heartbeats by default)")
    p.add_argument("--heartbeat", type=float, default=10.0, help="protocol.heartbeat, s")
    p.add_argument("--workers", type=int, default=0, help="load generator processes")
    p.add_argument("--concurrency", type=int, default=32,
                   help="handshakes in flight per worker while ramping")
    p.add_argument("--budget", type=float, default=260,
                   help="seconds per transport, at most (the quiet wait included)")
    p.add_argument("--settle", type=float, default=3.0, help="pause after connecting, s")
    common_arguments(p, "the load generator")
    args = p.parse_args()
    import report  # bench/report.py

    plan_cpus(not args.no_pin)
    steps = parse_steps(args.devices)
    workers = args.workers or default_workers(max(steps))
    for transport in ("tls", "quic") if args.transport == "both" else (args.transport,):
        with tempfile.TemporaryDirectory(prefix="lpgw-bench-") as tmp:
            target = LpgwTarget(transport, Path(tmp), heartbeat=args.heartbeat)
            result = idle(target, steps, window=args.window, workers=workers,
                          concurrency=args.concurrency, budget=args.budget,
                          settle=args.settle, quiet_wait=args.quiet_wait)
        if not args.no_report:
            report.save(result, args.out, tag=args.tag)
        print(json.dumps({k: result[k] for k in ("scenario", "system", "transport", "points")}),
              flush=True)


if __name__ == "__main__":
    main()
