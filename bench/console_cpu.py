"""What the operator console costs the gateway: its CPU with N idle TLS devices (10 s
heartbeats, the default) while nobody looks, then while one console is open in a headless
Chromium (the page reads /console/api/state every 2 s), and how long one such read takes.

    .venv/bin/python bench/console_cpu.py --devices 10000 --seconds 60

The gateway runs as its own process (`lpgw run`), the devices in this one, the browser in
its own (Debian's chromium, driven by Playwright); the gateway's CPU is read from
/proc/<pid>/stat over each window. No Mosquitto figure: a broker has no console to compare.
Bounded: each window lasts --seconds; everything started here is stopped by its pid.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from idle_memory import connect
from lib.host import RESULTS, git_state, machine, now_iso, raise_nofile

from gateway.service import free_port

ADMIN = "bench-console-admin-token-0123456789"
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


async def window(pid: int, seconds: float) -> float:
    """The gateway's CPU over `seconds`, in percent of one core."""
    before, started = cpu_seconds(pid), time.monotonic()
    await asyncio.sleep(seconds)
    return 100 * (cpu_seconds(pid) - before) / (time.monotonic() - started)


def start(tmp: Path) -> tuple[subprocess.Popen, dict, str]:
    admin = tmp / "admin.token"
    admin.write_text(ADMIN)
    admin.chmod(0o600)
    port = free_port("127.0.0.1")
    cfg = tmp / "bench.yaml"
    cfg.write_text(f"state_dir: {tmp / 'state'}\nlisten: {{host: 127.0.0.1, port: {port}}}\n"
                   "protocol: {hello_timeout: 60, frame_burst: 1000}\nlog: {level: warning}\n"
                   f"api: {{host: 127.0.0.1, port: 0, admin_token_file: {admin}}}\n"
                   "sip: {enabled: false}\ndiscovery: {enabled: false}\n")
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "-c", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline().decode()
        if "pin sha256/" in line:
            runtime = json.loads((tmp / "state" / "runtime.json").read_text())
            return proc, runtime, line.split("pin ")[1].strip()
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError("gateway did not start")


def state_read_ms(port: int, cert: Path, cookie: str, n: int = 5) -> float:
    """The median time of one /console/api/state read (what the page asks every 2 s)."""
    ctx = ssl.create_default_context(cafile=str(cert))
    times = []
    for _ in range(n):
        request = urllib.request.Request(f"https://localhost:{port}/console/api/state",
                                         headers={"cookie": f"lpgw_console={cookie}"})
        started = time.perf_counter()
        with urllib.request.urlopen(request, context=ctx, timeout=30) as answer:
            answer.read()
        times.append((time.perf_counter() - started) * 1000)
    return sorted(times)[len(times) // 2]


async def run(args: argparse.Namespace) -> dict:
    from playwright.async_api import async_playwright

    raise_nofile(args.devices * 2 + 1024)
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        proc, runtime, pin = start(tmp)
        clients: list = []
        try:
            connected_in, _ = await connect(args.devices, "tls", runtime["port"], pin,
                                            clients, 64)
            await asyncio.sleep(5)  # settled: handshakes done, heartbeats spread
            closed = await window(proc.pid, args.seconds)
            async with async_playwright() as p:
                browser = await p.chromium.launch(executable_path="/usr/bin/chromium",
                                                  args=["--no-sandbox"])
                page = await (await browser.new_context(ignore_https_errors=True)).new_page()
                base = f"https://localhost:{runtime['api_port']}"
                await page.goto(f"{base}/console/sign-in")
                await page.fill("#token", ADMIN)
                await page.click("#sign-in")
                await page.wait_for_selector("#device-rows tr", timeout=60000)
                cookie = next(c["value"] for c in await page.context.cookies()
                              if c["name"] == "lpgw_console")
                opened = await window(proc.pid, args.seconds)
                read_ms = await asyncio.to_thread(state_read_ms, runtime["api_port"],
                                                  tmp / "state" / "gateway.crt", cookie)
                await browser.close()
        finally:
            for c, _ in clients:
                c.stop()
            await asyncio.gather(*(t for _, t in clients), return_exceptions=True)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return {"scenario": "console-cpu", "when": now_iso(), "machine": machine(),
            "git": git_state(), "devices": args.devices, "seconds": args.seconds,
            "connected_in_s": round(connected_in, 1),
            "gateway_cpu_percent": {"console_closed": round(closed, 2),
                                    "console_open": round(opened, 2)},
            "state_read_ms_median": round(read_ms, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=10000)
    p.add_argument("--seconds", type=float, default=60.0, help="each window's length")
    p.add_argument("--out", help="JSON file (default: bench/results/console-cpu.json)")
    args = p.parse_args()
    result = asyncio.run(run(args))
    out = Path(args.out) if args.out else RESULTS / "console-cpu.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    cpu = result["gateway_cpu_percent"]
    print(f"{args.devices} idle TLS devices: gateway CPU {cpu['console_closed']}% with the "
          f"console closed, {cpu['console_open']}% with one open; one state read "
          f"{result['state_read_ms_median']} ms (median of 5); wrote {out}")


if __name__ == "__main__":
    main()
