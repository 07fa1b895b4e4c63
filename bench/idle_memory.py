"""What one idle device costs the gateway, per transport.

Starts `lpgw run` as its own process on 127.0.0.1, connects N reference devices (in this
process), lets them idle, and reads the gateway's RSS from /proc. Prints one line per
transport, or JSON with --json.

    .venv/bin/python bench/idle_memory.py --devices 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gateway.client import DeviceClient, DeviceOptions
from gateway.service import _free_port

WARMUP = 20


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def start_gateway(state: Path, port: int) -> tuple[subprocess.Popen, str]:
    cfg = state.parent / "bench.yaml"
    cfg.write_text(f"state_dir: {state}\nlisten: {{host: 127.0.0.1, port: {port}}}\n"
                   "protocol: {heartbeat: 60, hello_timeout: 60, frame_burst: 1000}\n"
                   "log: {level: warning}\n"
                   "api: {enabled: false}\nsip: {enabled: false}\n"
                   "discovery: {enabled: false}  # no mDNS on the real interfaces\n")
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "-c", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline().decode()
        if "pin sha256/" in line:
            return proc, line.split("pin ")[1].strip()
        if not line and proc.poll() is not None:
            break
    raise RuntimeError("gateway did not start")


async def connect(n: int, transport: str, port: int, pin: str, clients: list) -> float:
    welcomed = 0
    done = asyncio.Event()

    def emit(event: dict) -> None:
        nonlocal welcomed
        if event["event"] == "welcome":
            welcomed += 1
            if welcomed == n:
                done.set()

    started = time.monotonic()
    for i in range(n):
        c = DeviceClient(DeviceOptions(host="127.0.0.1", port=port, pin=pin,
                                       transport=transport, reconnect=False), emit)
        clients.append((c, asyncio.create_task(c.run())))
        if i % 50 == 49:
            await asyncio.sleep(0.05)  # bounded burst: 50 handshakes at a time
    await asyncio.wait_for(done.wait(), 120)
    return time.monotonic() - started


async def measure(transport: str, devices: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        port = _free_port("127.0.0.1")
        proc, pin = start_gateway(Path(tmp) / "state", port)
        clients: list = []
        try:
            await connect(WARMUP, transport, port, pin, clients)
            await asyncio.sleep(1)
            before = rss_kib(proc.pid)
            seconds = await connect(devices, transport, port, pin, clients)
            await asyncio.sleep(2)  # idle: handshakes done, buffers released
            after = rss_kib(proc.pid)
        finally:
            for c, _ in clients:
                c.stop()
            await asyncio.gather(*(t for _, t in clients), return_exceptions=True)
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
        per_device = (after - before) * 1024 / devices
        return {"transport": transport, "devices": devices, "rss_before_kib": before,
                "rss_after_kib": after, "bytes_per_device": round(per_device),
                "connect_seconds": round(seconds, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--transport", choices=("tls", "quic", "both"), default="both")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * args.devices + 256)), hard))
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    transports = ("tls", "quic") if args.transport == "both" else (args.transport,)
    for transport in transports:
        result = asyncio.run(measure(transport, args.devices))
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            print(f"{transport}: {result['devices']} idle devices cost "
                  f"{result['bytes_per_device'] / 1024:.1f} KiB each "
                  f"(gateway RSS {result['rss_before_kib']} -> {result['rss_after_kib']} KiB; "
                  f"connected in {result['connect_seconds']} s)", flush=True)


if __name__ == "__main__":
    main()
