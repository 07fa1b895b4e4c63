"""Durable pushes per second through the APNs-compatible API, and accept latency.

Starts `lpgw run` as its own process on 127.0.0.1 with one provider key and N reference
devices (TLS) that ack, then drives POST /3/device/<token> with h2load (Debian
nghttp2-client: a C HTTP/2 load generator, so the client is not the bottleneck) over one
connection with C streams in flight, round-robin over the devices. Every 200 means the push
was fsynced (store.synchronous FULL, group commit). Prints the sustained rate and the
accept latency p50/p99 from h2load's per-request log, and checks that every push reached
its device.

    .venv/bin/python bench/api_throughput.py --pushes 20000 --concurrency 50 --devices 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
        "store": {"synchronous": synchronous}, "log": {"level": "error"},
        "sip": {"enabled": False}, "discovery": {"enabled": False},
        "delivery": {"queue_limit": 100000},
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


async def run(synchronous: str, pushes: int, concurrency: int, devices: int) -> dict:
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        key = ec.generate_private_key(ec.SECP256R1())
        key_file = tmp / "key.pub"
        key_file.write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        proc, rt = start(tmp, synchronous, key_file)
        tokens: list[str] = []
        received = 0
        welcomed = asyncio.Event()

        def emit(event: dict) -> None:
            nonlocal received
            if event["event"] == "welcome":
                tokens.append(event["token"])
                if len(tokens) == devices:
                    welcomed.set()
            elif event["event"] == "push":
                received += 1

        clients = [DeviceClient(DeviceOptions(host="127.0.0.1", port=rt["port"], pin=rt["pin"],
                                              transport="tls", topic=TOPIC), emit)
                   for _ in range(devices)]
        tasks = [asyncio.create_task(c.run()) for c in clients]
        try:
            await asyncio.wait_for(welcomed.wait(), 30)
            auth = "bearer " + jwt.encode({"iss": "BENCH12345", "iat": int(time.time())}, key,
                                          algorithm="ES256", headers={"kid": "BENCHKEY01"})
            base = f"https://127.0.0.1:{rt['api_port']}/3/device/"
            (tmp / "uris").write_text("".join(f"{base}{t}\n" for t in tokens))
            (tmp / "body").write_text('{"aps":{"alert":"Bed 12 calls"},"ward":3}')
            started = time.perf_counter()
            h2load = await asyncio.create_subprocess_exec(
                "h2load", "-n", str(pushes), "-c", "1", "-m", str(concurrency),
                "-i", str(tmp / "uris"), "-d", str(tmp / "body"), "-H",
                f"authorization: {auth}", "--log-file", str(tmp / "log"),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            out, _ = await asyncio.wait_for(h2load.communicate(), 300)
            elapsed = time.perf_counter() - started
            deadline = time.monotonic() + 60
            while received < pushes and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        finally:
            for c in clients:
                c.stop()
            await asyncio.gather(*tasks, return_exceptions=True)
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
        rows = [line.split("\t") for line in (tmp / "log").read_text().splitlines()]
        ok = sorted(int(r[2]) / 1000 for r in rows if r[1] == "200")
        if len(ok) != pushes:
            raise SystemExit(f"only {len(ok)} of {pushes} got 200:\n{out.decode()[-1500:]}")
        return {"synchronous": synchronous, "pushes": pushes, "concurrency": concurrency,
                "devices": devices, "per_second": round(pushes / elapsed),
                "accept_ms_p50": round(statistics.median(ok), 2),
                "accept_ms_p99": round(ok[int(len(ok) * 0.99) - 1], 2),
                "delivered": received}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pushes", type=int, default=20000)
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--devices", type=int, default=20)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if shutil.which("h2load") is None:
        raise SystemExit("needs h2load: apt-get install nghttp2-client")
    for mode in ("FULL", "NORMAL"):
        r = asyncio.run(run(mode, args.pushes, args.concurrency, args.devices))
        print(json.dumps(r) if args.json else
              f"synchronous={mode}: {r['per_second']} pushes/s accepted over one HTTP/2 "
              f"connection ({r['concurrency']} streams in flight, {r['devices']} devices); "
              f"accept p50 {r['accept_ms_p50']} ms, p99 {r['accept_ms_p99']} ms; "
              f"{r['delivered']}/{r['pushes']} delivered", flush=True)


if __name__ == "__main__":
    main()
