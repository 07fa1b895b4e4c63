"""What one idle device costs the gateway, per transport.

Starts `lpgw run` as its own process on 127.0.0.1, connects N reference devices (in this
process, at most --window handshakes in flight), lets them idle, and reads the gateway's
memory from /proc: RSS (VmRSS) and, from smaps_rollup, Pss and private dirty pages. With
--heap the gateway also runs under tracemalloc and reports its Python heap (the RSS numbers
of such a run include tracemalloc's own bookkeeping: take them from a run without --heap).
Prints one line per transport, or JSON with --json.

    .venv/bin/python bench/idle_memory.py --devices 1000
    .venv/bin/python bench/idle_memory.py --devices 10000 --transport quic

Each device is one socket here (and one more in the gateway for TLS): the open-file limit
is raised to what N needs, the hard limit too when allowed (root); if it can't be, say so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lib.host import raise_nofile

from gateway.client import DeviceClient, DeviceOptions
from gateway.service import free_port

WARMUP = 20
ATTEMPTS = 5  # a handshake lost on a busy loopback is retried with a fresh device

# Runs the gateway with tracemalloc; SIGUSR1 writes the traced Python heap (bytes) to argv[1].
HEAP_SHIM = """
import signal, sys, tracemalloc
from pathlib import Path
out = Path(sys.argv[1])
def dump(*_):
    tmp = out.with_suffix(".tmp")
    tmp.write_text(str(tracemalloc.get_traced_memory()[0]))
    tmp.replace(out)
signal.signal(signal.SIGUSR1, dump)
from gateway.cli import main
sys.exit(main(sys.argv[2:]))
"""


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def smaps_kib(pid: int) -> dict[str, int]:
    """Pss and Private_Dirty (KiB) of the whole process, or {} where smaps_rollup is missing."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return {}
    found = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("Pss", "Private_Dirty"):
            found[key] = int(rest.split()[0])
    return found


class Probe:
    """The gateway's memory, sampled the same way before and after."""

    def __init__(self, proc: subprocess.Popen, heap_file: Path | None) -> None:
        self.proc = proc
        self.heap_file = heap_file

    async def sample(self) -> dict[str, int]:
        pid = self.proc.pid
        sample = {"rss": rss_kib(pid) * 1024}
        sample.update({k.lower(): v * 1024 for k, v in smaps_kib(pid).items()})
        if self.heap_file is not None:
            self.heap_file.unlink(missing_ok=True)
            self.proc.send_signal(signal.SIGUSR1)
            for _ in range(200):
                if self.heap_file.exists():
                    sample["heap"] = int(self.heap_file.read_text())
                    break
                await asyncio.sleep(0.05)
            else:
                raise RuntimeError("the gateway did not report its heap")
        return sample


def start_gateway(state: Path, port: int, heap: bool, log: bool) -> tuple[Probe, str]:
    cfg = state.parent / "bench.yaml"
    cfg.write_text(f"state_dir: {state}\nlisten: {{host: 127.0.0.1, port: {port}}}\n"
                   "protocol: {heartbeat: 60, hello_timeout: 60, frame_burst: 1000}\n"
                   "log: {level: warning}\n"
                   "api: {enabled: false}\nsip: {enabled: false}\n"
                   "discovery: {enabled: false}  # no mDNS on the real interfaces\n")
    heap_file = state.parent / "heap" if heap else None
    if heap_file is not None:
        argv = [sys.executable, "-X", "tracemalloc=1", "-c", HEAP_SHIM, str(heap_file)]
    else:
        argv = [sys.executable, "-m", "gateway.cli"]
    proc = subprocess.Popen([*argv, "run", "-c", str(cfg)], stdout=subprocess.PIPE,
                            stderr=None if log else subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline().decode()
        if "pin sha256/" in line:
            return Probe(proc, heap_file), line.split("pin ")[1].strip()
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError("gateway did not start")


async def connect(n: int, transport: str, port: int, pin: str, clients: list,
                  window: int) -> tuple[float, int]:
    """Connect n devices that stay; returns (seconds, handshakes retried)."""
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(window)
    retried = 0

    async def one() -> None:
        nonlocal retried
        for _ in range(ATTEMPTS):
            welcomed: asyncio.Future = loop.create_future()

            def emit(event: dict, welcomed: asyncio.Future = welcomed) -> None:
                if not welcomed.done() and event["event"] in ("welcome", "connect_failed",
                                                              "disconnected"):
                    welcomed.set_result(event["event"] == "welcome")

            c = DeviceClient(DeviceOptions(host="127.0.0.1", port=port, pin=pin,
                                           transport=transport, reconnect=False), emit)
            async with slots:
                task = asyncio.create_task(c.run())
                task.add_done_callback(
                    lambda _, w=welcomed: w.done() or w.set_result(False))
                if await welcomed:
                    clients.append((c, task))
                    return
            c.stop()
            retried += 1
        raise RuntimeError(f"a device failed {ATTEMPTS} handshakes in a row")

    started = time.monotonic()
    await asyncio.gather(*(one() for _ in range(n)))
    return time.monotonic() - started, retried


async def measure(transport: str, devices: int, window: int, idle: float, heap: bool,
                  log: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port("127.0.0.1")
        probe, pin = start_gateway(Path(tmp) / "state", port, heap, log)
        clients: list = []
        try:
            await connect(WARMUP, transport, port, pin, clients, window)
            await asyncio.sleep(1)
            before = await probe.sample()
            seconds, retried = await connect(devices, transport, port, pin, clients, window)
            await asyncio.sleep(idle)  # idle: handshakes done, buffers released
            after = await probe.sample()
        finally:
            for c, _ in clients:
                c.stop()
            with_timeout = asyncio.wait_for(
                asyncio.gather(*(t for _, t in clients), return_exceptions=True), 60)
            await asyncio.gather(with_timeout, return_exceptions=True)
            probe.proc.send_signal(signal.SIGTERM)
            try:
                probe.proc.wait(30)
            except subprocess.TimeoutExpired:
                probe.proc.kill()
                probe.proc.wait()
        result = {"transport": transport, "devices": devices,
                  "rss_before_kib": before["rss"] // 1024,
                  "rss_after_kib": after["rss"] // 1024,
                  "bytes_per_device": round((after["rss"] - before["rss"]) / devices),
                  "connect_seconds": round(seconds, 2), "handshakes_retried": retried}
        for key in ("pss", "private_dirty", "heap"):
            if key in before and key in after:
                result[f"{key}_bytes_per_device"] = round((after[key] - before[key]) / devices)
        if heap:
            result["note"] = "rss/pss include tracemalloc's own bookkeeping"
        return result


def describe(r: dict) -> str:
    extra = []
    if "pss_bytes_per_device" in r:
        extra.append(f"Pss {r['pss_bytes_per_device'] / 1024:.1f} KiB")
    if "heap_bytes_per_device" in r:
        extra.append(f"Python heap {r['heap_bytes_per_device'] / 1024:.1f} KiB")
    return (f"{r['transport']}: {r['devices']} idle devices cost "
            f"{r['bytes_per_device'] / 1024:.1f} KiB RSS each"
            + (f" ({', '.join(extra)})" if extra else "")
            + f" (gateway RSS {r['rss_before_kib']} -> {r['rss_after_kib']} KiB; connected in "
            f"{r['connect_seconds']} s, {r['handshakes_retried']} handshakes retried)"
            + (f" [{r['note']}]" if "note" in r else ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--transport", choices=("tls", "quic", "both"), default="both")
    p.add_argument("--window", type=int, default=64, help="handshakes in flight at most")
    p.add_argument("--idle", type=float, default=2.0, help="seconds idle before measuring")
    p.add_argument("--heap", action="store_true",
                   help="also report the gateway's Python heap (tracemalloc: 3x slower "
                        "handshakes, practical up to a few thousand devices)")
    p.add_argument("--gateway-log", action="store_true", help="show the gateway's stderr")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    raise_nofile(args.devices + WARMUP + 512)  # either process: a socket a device, slack
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    transports = ("tls", "quic") if args.transport == "both" else (args.transport,)
    for transport in transports:
        result = asyncio.run(measure(transport, args.devices, args.window, args.idle,
                                     args.heap, args.gateway_log))
        print(json.dumps(result) if args.json else describe(result), flush=True)


if __name__ == "__main__":
    main()
