"""From an INVITE read off the socket to its push written to the device: p50 and p99.

Runs a gateway and its SIP bridge in this process with N connected reference devices
(QUIC), each bound to its own user; SIPp (Debian sip-tester) places calls at a fixed rate
to those users, each call INVITE -> 180 (device acked) -> CANCEL -> 487 -> ACK. The time
measured is the gateway's own: datagram in -> every push for it written.

    .venv/bin/python bench/sip_latency.py --calls 500 --rate 50 --devices 20
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import jwt
from lib.host import ROOT

from gateway.client import DeviceClient, DeviceOptions
from gateway.config import SipConfig, from_dict
from gateway.service import Gateway, free_port
from gateway.transport.sip import start_sip

SECRET = "b" * 40


async def main(calls: int, rate: int, devices: int, synchronous: str) -> None:
    tmp = Path(tempfile.mkdtemp())
    (tmp / "jwt").write_text(SECRET)
    gw = await Gateway.start(from_dict({
        "state_dir": str(tmp / "state"), "listen": {"host": "127.0.0.1", "port": 0},
        "api": {"enabled": False}, "sip": {"enabled": False}, "discovery": {"enabled": False},
        "assertions": {"hs256_secret_file": str(tmp / "jwt")}, "log": {"level": "warning"},
        "store": {"synchronous": synchronous}}))
    sip = await start_sip(SipConfig(host="127.0.0.1", port=free_port("127.0.0.1"),
                                    ring_window=30, reach_timeout=10),
                          gw.delivery, gw.store, gw.metrics, "lpgw-bench", gw.pump)
    welcomed = asyncio.Event()
    count = 0

    def emit(event: dict) -> None:
        nonlocal count
        if event["event"] == "welcome":
            count += 1
            if count == devices:
                welcomed.set()

    clients = []
    for i in range(devices):
        token = jwt.encode({"sub": f"user{i}", "exp": int(time.time()) + 3600}, SECRET,
                           algorithm="HS256")
        c = DeviceClient(DeviceOptions(host="127.0.0.1", port=gw.listening.port, pin=gw.pin,
                                       assertion=token), emit)
        clients.append((c, asyncio.create_task(c.run())))
    await asyncio.wait_for(welcomed.wait(), 30)
    users = tmp / "users.csv"
    users.write_text("SEQUENTIAL\n" + "".join(f"user{i}\n" for i in range(devices)))
    scenario = (ROOT / "tests" / "sip" / "uac_cancel.xml").read_text().replace(
        "[service]", "[field0]")
    (tmp / "bench.xml").write_text(scenario)
    proc = await asyncio.create_subprocess_exec(
        "sipp", f"127.0.0.1:{sip.port}", "-sf", str(tmp / "bench.xml"), "-inf", str(users),
        "-m", str(calls), "-r", str(rate), "-i", "127.0.0.1", "-p", str(free_port("127.0.0.1")),
        "-timeout", "120s", "-nostdin", "-nd", stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL, cwd=tmp)
    try:
        await asyncio.wait_for(proc.wait(), 180)
    finally:  # stopped by its pid whatever happens
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    samples = sorted(sip.invite_latencies)
    for c, _ in clients:
        c.stop()
    await asyncio.gather(*(t for _, t in clients), return_exceptions=True)
    await sip.stop()
    await gw.stop()
    if not samples:
        raise SystemExit("no INVITE was measured")
    p99 = samples[max(0, int(len(samples) * 0.99) - 1)]
    print(f"synchronous={synchronous}: {len(samples)} INVITEs at {rate}/s to {devices} "
          f"devices (sipp exit "
          f"{proc.returncode}): INVITE read -> push written p50 "
          f"{statistics.median(samples) * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=500)
    p.add_argument("--rate", type=int, default=50)
    p.add_argument("--devices", type=int, default=20)
    p.add_argument("--synchronous", choices=("FULL", "NORMAL"), default="FULL",
                   help="the store's durability (FULL is the default in lpgw)")
    a = p.parse_args()
    asyncio.run(main(a.calls, a.rate, a.devices, a.synchronous))
