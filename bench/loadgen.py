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
import json
import math
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from lib import host
from lib.devices import worker_entry
from lib.host import (
    FD_RESERVE,
    RESULTS,
    ROOT,
    RUN_ID,
    Background,
    Proc,
    cap_devices,
    git_state,
    machine,
    now_iso,
    pin_server,
    plan_cpus,
    raise_nofile,
    stop_process,
    wait_for_quiet,
)

from gateway.protocol.frames import HEADER, encode_frame
from gateway.service import free_port

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
        self.port = self.port or free_port("127.0.0.1")  # a restart keeps its port, state and key
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
            env=dict(os.environ))
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
    cores = len(host.CPUS["clients"]) if host.CPUS else (os.cpu_count() or 2)
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
                     "settle_s": settle, "cpus": host.CPU_PLAN},
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

