"""Pushes per second through the APNs-compatible API, and accept-to-device latency.

Starts `lpgw run` as its own process on 127.0.0.1 with one provider key, connects one
reference device (QUIC) that acks, then sends N pushes over one HTTP/2 connection with C in
flight (httpx). Prints throughput and the median and p99 of the time from sending the
request to the device receiving the push. Runs once per store.synchronous mode.

    .venv/bin/python bench/api_throughput.py --pushes 2000 --concurrency 50
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.client import DeviceClient, DeviceOptions
from gateway.service import _free_port

TOPIC = "com.example.bench"


def start(tmp: Path, synchronous: str, key_file: Path) -> tuple[subprocess.Popen, dict]:
    port, api_port = _free_port("127.0.0.1"), _free_port("127.0.0.1")
    cfg = tmp / "bench.yaml"
    cfg.write_text(json.dumps({
        "state_dir": str(tmp / "state"), "listen": {"host": "127.0.0.1", "port": port},
        "store": {"synchronous": synchronous}, "log": {"level": "warning"},
        "sip": {"enabled": False}, "discovery": {"enabled": False},
        "api": {"host": "127.0.0.1", "port": api_port, "rate_limit": 1e6, "rate_burst": 10**6,
                "providers": [{"team_id": "BENCH12345", "key_id": "BENCHKEY01",
                               "key_file": str(key_file), "topics": [TOPIC]}]}}))
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "-c", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    while True:
        line = proc.stdout.readline().decode()
        if "pin sha256/" in line:
            break
        if not line:
            raise RuntimeError("gateway did not start")
    return proc, json.loads((tmp / "state" / "runtime.json").read_text())


async def run(synchronous: str, pushes: int, concurrency: int) -> dict:
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        key = ec.generate_private_key(ec.SECP256R1())
        key_file = tmp / "key.pub"
        key_file.write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        proc, rt = start(tmp, synchronous, key_file)
        sent_at: dict[str, float] = {}
        latencies: list[float] = []
        welcomed = asyncio.Event()
        all_in = asyncio.Event()
        token_box: list[str] = []

        def emit(event: dict) -> None:
            if event["event"] == "welcome":
                token_box.append(event["token"])
                welcomed.set()
            elif event["event"] == "push":
                marker = event["payload"]["m"]
                latencies.append(time.perf_counter() - sent_at[marker])
                if len(latencies) == pushes:
                    all_in.set()

        device = DeviceClient(DeviceOptions(host="127.0.0.1", port=rt["port"], pin=rt["pin"],
                                            topic=TOPIC), emit)
        task = asyncio.create_task(device.run())
        try:
            await asyncio.wait_for(welcomed.wait(), 10)
            token = token_box[0]
            auth = "bearer " + jwt.encode({"iss": "BENCH12345", "iat": int(time.time())}, key,
                                          algorithm="ES256", headers={"kid": "BENCHKEY01"})
            ctx = ssl.create_default_context(cafile=str(tmp / "state" / "gateway.crt"))
            limits = httpx.Limits(max_connections=1)
            async with httpx.AsyncClient(http2=True, verify=ctx, limits=limits) as h:
                url = f"https://localhost:{rt['api_port']}/3/device/{token}"
                queue = iter(range(pushes))

                async def worker() -> None:
                    for i in queue:
                        marker = str(i)
                        sent_at[marker] = time.perf_counter()
                        r = await h.post(url, headers={"authorization": auth},
                                         content=json.dumps({"aps": {"alert": "x"}, "m": marker}))
                        assert r.status_code == 200, r.text

                started = time.perf_counter()
                await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))),
                                       300)
                await asyncio.wait_for(all_in.wait(), 60)
                elapsed = time.perf_counter() - started
        finally:
            device.stop()
            await task
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
        latencies.sort()
        return {"synchronous": synchronous, "pushes": pushes, "concurrency": concurrency,
                "per_second": round(pushes / elapsed),
                "latency_ms_p50": round(statistics.median(latencies) * 1000, 2),
                "latency_ms_p99": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pushes", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    for mode in ("FULL", "NORMAL"):
        r = asyncio.run(run(mode, args.pushes, args.concurrency))
        print(json.dumps(r) if args.json else
              f"synchronous={mode}: {r['per_second']} pushes/s over one HTTP/2 connection "
              f"({r['concurrency']} in flight); request->device p50 {r['latency_ms_p50']} ms, "
              f"p99 {r['latency_ms_p99']} ms", flush=True)


if __name__ == "__main__":
    main()
