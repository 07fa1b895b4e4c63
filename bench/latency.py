"""The *latency* scenario: a push to one of N connected devices, lpgw beside Mosquitto.

What an app server sees: it sends a push to one phone among thousands that are connected
and idle; how long until the phone has it? Each system under test gets the same run,
one after the other in this one command (so the figures share a machine state and a run
id):

1. Start the server (lpgw: `python -m gateway.cli run -c CFG` with its HTTP/2 API on a
   loopback port and `store.synchronous: FULL`, every push fsynced before its 200;
   Mosquitto: one TLS 1.3 listener, persistence off) pinned like the other scenarios.
2. Connect N devices from the load generator's workers (ramped), let them settle.
3. A publisher in this process sends `--pushes` pushes, one every 1/`--rate` s, each to a
   device picked at random (the same sequence for every system): lpgw through its API
   (HTTP/2 over TLS, `POST /3/device/<token>` with a provider JWT, one connection, as an app
   server would), Mosquitto as a QoS 1 PUBLISH to the device's topic (MQTT over TLS, one
   connection). The payload carries `bench_t`, the publisher's time.monotonic_ns() taken
   just before the write; the device reads it when the push arrives (CLOCK_MONOTONIC is one
   clock for every process on the machine), so the figure is publisher write -> device
   read, end to end, through the server. The publisher also times the accept (lpgw: the
   200, which means fsynced; Mosquitto: the PUBACK, which means in memory).
4. Per system: delivery latency p50/p90/p99/max, accept latency, pushes lost (accepted but
   never read), the server's CPU while publishing, its RSS, and for lpgw its
   garbage-collector passes meanwhile (`lpgw_gc_pause_seconds` from GET /metrics: a full
   pass stops everything, for longer the more phones are held). JSON,
   Markdown and a PNG (the latency distributions) per system in bench/results/.

    .venv/bin/python bench/latency.py --devices 10k --pushes 2000 --rate 100
    .venv/bin/python bench/latency.py --systems lpgw-tls --synchronous NORMAL  # the fsync's share

Bounded: the quiet wait and each system's run fit in `--budget` (240 s) per system; every
process this run started is stopped by its pid, also on failure, Ctrl-C or SIGTERM.
Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Protocol

import h2.config
import h2.connection
import h2.events
import report
from api_throughput import ApiTarget
from lib import host
from lib.host import (
    Background,
    cap_devices,
    plan_cpus,
)
from lib.mqtt import client_context
from lib.payloads import STAMPED, TOPIC
from loadgen import (
    LoadGen,
    Target,
    common_arguments,
    default_workers,
    parse_steps,
    result_head,
    running,
    summary,
)
from peer_mosquitto import MosquittoTarget, MqttPublisher
from prometheus_client.parser import text_string_to_metric_families

SYSTEMS = ("lpgw-tls", "lpgw-quic", "mosquitto")


class Publisher(Protocol):
    """One connection to the server; `send` writes one stamped push and returns when the
    server accepted it: (stamp ns, accept ns or None, outcome)."""

    async def open(self) -> None: ...

    async def send(self, address: str) -> tuple[int, int | None, str]: ...

    async def close(self) -> None: ...


class ApiPublisher:
    """An app server on lpgw's HTTP/2 API (the h2 state machine, nothing in between)."""

    def __init__(self, host: str, port: int, jwt: str) -> None:
        self.host, self.port, self.jwt = host, port, jwt
        self.pending: dict[int, tuple[asyncio.Future, list[str]]] = {}
        self.window = asyncio.Event()

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.wait_for(asyncio.open_connection(
            self.host, self.port, ssl=client_context("h2")), 10)
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding="utf-8"))
        self.h2.initiate_connection()
        self.writer.write(self.h2.data_to_send())
        self.reading = asyncio.get_running_loop().create_task(self.read())

    async def read(self) -> None:
        try:
            while data := await self.reader.read(65536):
                now = time.monotonic_ns()
                for ev in self.h2.receive_data(data):
                    if isinstance(ev, h2.events.ResponseReceived):
                        slot = self.pending.get(ev.stream_id)
                        if slot:
                            slot[1].append(dict(ev.headers).get(":status", "?"))
                    elif isinstance(ev, h2.events.DataReceived):
                        self.h2.acknowledge_received_data(ev.flow_controlled_length,
                                                          ev.stream_id)
                    elif isinstance(ev, h2.events.StreamEnded | h2.events.StreamReset):
                        fut, status = self.pending.pop(ev.stream_id, (None, []))
                        if fut is not None and not fut.done():
                            fut.set_result((now, status[0] if status else "reset"))
                    elif isinstance(ev, h2.events.WindowUpdated):
                        self.window.set()
                self.writer.write(self.h2.data_to_send())
        finally:
            for fut, _ in self.pending.values():
                if not fut.done():
                    fut.set_result((None, "connection closed"))

    async def send(self, address: str) -> tuple[int, int | None, str]:
        while self.h2.outbound_flow_control_window < 200:  # a new stream's own is 64 KiB
            self.window.clear()
            await asyncio.wait_for(self.window.wait(), 10)
        sid = self.h2.get_next_available_stream_id()
        fut = asyncio.get_running_loop().create_future()
        self.pending[sid] = (fut, [])
        stamp = time.monotonic_ns()
        body = (STAMPED % stamp).encode()
        self.h2.send_headers(sid, [
            (":method", "POST"), (":scheme", "https"),
            (":authority", f"{self.host}:{self.port}"), (":path", f"/3/device/{address}"),
            ("authorization", f"bearer {self.jwt}"), ("apns-topic", TOPIC),
            ("apns-push-type", "alert"), ("content-type", "application/json"),
            ("content-length", str(len(body)))])
        self.h2.send_data(sid, body, end_stream=True)
        self.writer.write(self.h2.data_to_send())
        at, status = await fut
        return stamp, at, "ok" if status == "200" else f"status {status}"

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.h2.close_connection()
            self.writer.write(self.h2.data_to_send())
            self.writer.close()
        self.reading.cancel()


async def publish_paced(publisher: Publisher, addresses: list[str], rate: float,
                        timeout: float) -> list[tuple[int, int | None, str]]:
    """One push every 1/rate s (not waiting for the previous accept), all answered or
    `timeout` after the last write."""
    await publisher.open()
    loop = asyncio.get_running_loop()
    try:
        start = loop.time() + 0.05
        tasks = []
        for i, address in enumerate(addresses):
            delay = start + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(loop.create_task(publisher.send(address)))
        done, _ = await asyncio.wait(tasks, timeout=timeout)
        return [t.result() if t in done and t.exception() is None
                else (0, None, "no answer" if t not in done else f"error: {t.exception()}")
                for t in tasks]
    finally:
        await publisher.close()


def gc_passes(target: Target) -> dict[str, dict[str, float]] | None:
    """lpgw's garbage-collector passes so far, by generation: count and seconds (its
    `lpgw_gc_pause_seconds` on GET /metrics); None for other servers."""
    if not isinstance(target, ApiTarget):
        return None
    url = f"https://{target.host}:{target.api_port}/metrics"
    with urllib.request.urlopen(url, context=client_context(None), timeout=10) as reply:
        text = reply.read().decode()
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "lpgw_gc_pause_seconds":
            continue
        for sample in family.samples:
            kind = sample.name.removeprefix("lpgw_gc_pause_seconds_")
            if kind in ("count", "sum"):
                out.setdefault(sample.labels["generation"], {})[kind] = sample.value
    if not out:
        raise RuntimeError("the gateway's /metrics has no lpgw_gc_pause_seconds")
    return out


def gc_during(before: dict | None, after: dict | None) -> dict[str, dict[str, float]] | None:
    """Passes and seconds per generation between two readings of gc_passes."""
    if before is None or after is None:
        return None
    return {gen: {"passes": int(now.get("count", 0) - before.get(gen, {}).get("count", 0)),
                  "seconds": round(now.get("sum", 0) - before.get(gen, {}).get("sum", 0), 4)}
            for gen, now in sorted(after.items())}


def make_target(system: str, tmp: Path, heartbeat: float, synchronous: str) -> Target:
    if system == "mosquitto":
        return MosquittoTarget(tmp, heartbeat=heartbeat)
    return ApiTarget(system.split("-")[1], tmp, heartbeat=heartbeat, synchronous=synchronous)


def publisher_for(target: Target) -> Publisher:
    if isinstance(target, ApiTarget):
        return ApiPublisher(target.host, target.api_port, target.provider_token())
    return MqttPublisher(target.host, target.port)


def latency(target: Target, devices: int, *, pushes: int, rate: float, workers: int,
            seed: int = 7, settle: float = 3.0, concurrency: int = 32, budget: float = 240,
            quiet_wait: float = 30, drain: float = 10.0) -> dict[str, Any]:
    began = time.monotonic()
    devices, note = cap_devices(devices)
    result: dict[str, Any] = {
        **result_head("latency", target),
        "settings": {"devices": devices, "pushes": pushes, "rate_per_s": rate, "seed": seed,
                     "workers": workers, "settle_s": settle, "body": STAMPED % 0,
                     "concurrency_per_worker": concurrency, "budget_s": budget,
                     "cpus": host.CPU_PLAN},
        "fd_limit_note": note, "complete": False}
    with running(target, result, quiet_wait):
        meter = target.meter
        with LoadGen(workers) as lg:
            lg.setup(target, devices)
            gc_start = gc_passes(target)
            t0 = time.monotonic()
            r = lg.connect(devices, concurrency=concurrency, subscribe=target.kind == "mqtt",
                           clean=False, timeout=max(30.0, budget / 2))
            result["connect"] = {"devices": r["devices"], "welcomed": r["welcomed"],
                                 "seconds": round(time.monotonic() - t0, 2),
                                 "last_error": r["last_error"],
                                 "server_gc": gc_during(gc_start, gc_passes(target))}
            if r["not_welcomed"]:
                raise RuntimeError(f"{r['not_welcomed']} of {devices} devices not welcomed "
                                   f"({r['last_error']})")
            addresses = [a for a in r["tokens"] if a]
            time.sleep(settle)
            lg.latencies()  # nothing yet; any stray figure goes
            before = lg.stats()
            rng = random.Random(seed)
            picks = [addresses[rng.randrange(len(addresses))] for _ in range(pushes)]
            left = budget - (time.monotonic() - began)
            need = pushes / rate + drain + 15
            if left < need:
                raise RuntimeError(f"time budget of {budget} s: publishing needs ~{need:.0f} s, "
                                   f"{left:.0f} s left")
            background = Background(target.pids() + lg.pids)
            gc0 = gc_passes(target)
            cpu0, w0 = meter.cpu_seconds(), time.monotonic()
            sent = asyncio.run(publish_paced(publisher_for(target), picks, rate, drain))
            cpu1, w1 = meter.cpu_seconds(), time.monotonic()
            gc_window = gc_during(gc0, gc_passes(target))
            accepted = sum(1 for _, _, outcome in sent if outcome == "ok")
            deadline = time.monotonic() + drain
            while lg.stats()["pushes"] - before["pushes"] < accepted \
                    and time.monotonic() < deadline:
                time.sleep(0.2)
            after = lg.stats()
            delivery = lg.latencies()
            outcomes: dict[str, int] = {}
            for _, _, outcome in sent:
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
            accept = [(at - stamp) / 1e6 for stamp, at, outcome in sent
                      if outcome == "ok" and at is not None]
            result.update({
                "connected": after["connected"],
                "pushes_sent": len(sent), "accepted": accepted, "outcomes": outcomes,
                "delivered": len(delivery),
                "lost": max(0, accepted - len(delivery)),
                "duplicates": after["counts"].get("duplicates", 0)
                - before["counts"].get("duplicates", 0),
                "drops": after["counts"].get("drops", 0) - before["counts"].get("drops", 0),
                "loadgen_cpu_percent_while_publishing":
                    round(100 * (after["cpu_seconds"] - before["cpu_seconds"]) / (w1 - w0), 1),
                "loadgen_gc_full_passes_while_publishing":
                    after["gc_full_passes"] - before["gc_full_passes"],
                "loadgen_gc_full_seconds_while_publishing":
                    round(after["gc_full_seconds"] - before["gc_full_seconds"], 4),
                "delivery_ms": {**summary(delivery, 3), "count": len(delivery)},
                "accept_ms": {**summary(accept, 3), "count": len(accept)},
                "publish_window_s": round(w1 - w0, 2),
                "achieved_per_s": round(len(sent) / (w1 - w0), 1) if w1 > w0 else None,
                "server_cpu_percent": round(100 * (cpu1 - cpu0) / (w1 - w0), 2),
                "server_gc_while_publishing": gc_window,
                "rss_kib": meter.rss_kib(),
                "other_load_cores": background.cores(),
                "samples_ms": {"delivery": sorted(round(x, 3) for x in delivery),
                               "accept": sorted(round(x, 3) for x in accept)},
            })
            lg.close_all()
        result["complete"] = result["lost"] == 0 and accepted == pushes
        if not result["complete"]:
            result["stopped_early"] = (f"{accepted}/{pushes} accepted, {result['lost']} "
                                       f"accepted but not delivered: {outcomes}")
    result["seconds"] = round(time.monotonic() - began, 1)
    return result


def markdown(r: dict[str, Any]) -> str:
    label = report.LABELS.get((r["system"], r["transport"]), r["system"])
    lines = [f"# latency: {label}", "", f"Machine: {report.machine_line(r)}; run {r['run']}", ""]
    if r.get("stopped_early"):
        lines += [f"Stopped early: {r['stopped_early']}", ""]
    if "delivery_ms" not in r:
        return "\n".join(lines) + "\n"
    s, d, a = r["settings"], r["delivery_ms"], r["accept_ms"]
    if r["system"] == "mosquitto":
        accepted = "PUBACK"
    else:
        sync = r["target"]["config"]["store"]["synchronous"]
        accepted = "200, fsynced" if sync == "FULL" else f"200, synchronous {sync}"
    lines += [f"{report._f(r['pushes_sent'])} pushes at {s['rate_per_s']:g}/s to random "
              f"devices among {report._f(r['connected'])} connected; server CPU "
              f"{r['server_cpu_percent']}% while publishing, RSS "
              f"{r['rss_kib'] / 1024:.1f} MiB; load generator CPU "
              f"{r.get('loadgen_cpu_percent_while_publishing', '?')}% (its workers' full GC "
              f"passes meanwhile: {r.get('loadgen_gc_full_passes_while_publishing', '?')}).",
              "",
              "| measure | p50 ms | p90 ms | p99 ms | max ms | count |",
              "|---|---:|---:|---:|---:|---:|",
              f"| publisher write -> device read | {d['p50']} | {d['p90']} | {d['p99']} | "
              f"{d['max']} | {report._f(d['count'])} |",
              f"| publisher write -> accepted ({accepted}) | {a['p50']} | {a['p90']} | "
              f"{a['p99']} | {a['max']} | {report._f(a['count'])} |", "",
              f"Accepted {report._f(r['accepted'])}, delivered {report._f(r['delivered'])}, lost "
              f"{report._f(r['lost'])}, duplicates {report._f(r['duplicates'])}, device drops "
              f"{report._f(r['drops'])}.", ""]
    for when, passes in (("connecting the devices", r.get("connect", {}).get("server_gc")),
                         ("publishing", r.get("server_gc_while_publishing"))):
        if passes:
            lines += [f"Server's garbage-collector passes while {when}: " + ", ".join(
                f"generation {gen}: {x['passes']} in {x['seconds'] * 1000:.1f} ms"
                for gen, x in passes.items()) + ".", ""]
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> bool:
    """The delivery and accept latency distributions (CDF) of one system."""
    plt = report.pyplot()
    samples = r.get("samples_ms", {})
    if plt is None or not samples.get("delivery"):
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key, label in (("delivery", "write -> device read"), ("accept", "write -> accepted")):
        xs = samples.get(key) or []
        if xs:
            ax.plot(xs, [(i + 1) / len(xs) * 100 for i in range(len(xs))], label=label)
    ax.set_xscale("log")
    ax.set_xlabel("ms (log)")
    ax.set_ylabel("% of pushes within")
    ax.set_title(f"push latency, {report.LABELS.get((r['system'], r['transport']))}, "
                 f"{r['connected']:,} connected")
    report.save_figure(fig, (ax,), path)
    return True


def main() -> None:
    p = argparse.ArgumentParser(description="push latency to one of N connected devices, "
                                            "lpgw beside Mosquitto")
    p.add_argument("--systems", default=",".join(SYSTEMS),
                   help=f"comma-separated, in order (from {', '.join(SYSTEMS)})")
    p.add_argument("--devices", default="10000", help="devices connected (e.g. 10k)")
    p.add_argument("--pushes", type=int, default=2000)
    p.add_argument("--rate", type=float, default=100.0, help="pushes per second")
    p.add_argument("--heartbeat", type=float, default=10.0)
    p.add_argument("--synchronous", choices=("FULL", "NORMAL"), default="FULL",
                   help="lpgw's store.synchronous (NORMAL: no fsync before the push leaves; "
                        "results tagged 'normal')")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--settle", type=float, default=3.0)
    p.add_argument("--budget", type=float, default=240, help="seconds per system, at most")
    common_arguments(p, "the load generator", quiet_wait=30)
    args = p.parse_args()
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        raise SystemExit(f"--systems: unknown {sorted(unknown)} (known: {', '.join(SYSTEMS)})")
    if "mosquitto" in systems and not (shutil.which("mosquitto")
                                       or Path("/usr/sbin/mosquitto").exists()):
        raise SystemExit("mosquitto is not installed (Debian: apt-get install mosquitto)")
    plan_cpus(not args.no_pin)
    devices = parse_steps(args.devices)[0]
    workers = args.workers or default_workers(devices)
    for system in systems:
        with tempfile.TemporaryDirectory(prefix="lpgw-bench-") as tmp:
            target = make_target(system, Path(tmp), args.heartbeat, args.synchronous)
            result = latency(target, devices, pushes=args.pushes, rate=args.rate,
                             workers=workers, settle=args.settle, budget=args.budget,
                             quiet_wait=args.quiet_wait)
        if not args.no_report:
            tag = args.tag or ("normal" if args.synchronous == "NORMAL"
                               and system != "mosquitto" else "")
            report.save(result, args.out, tag=tag, markdown_of=markdown, plot=plot)
        print(json.dumps({k: result.get(k) for k in (
            "system", "transport", "connected", "accepted", "delivered", "lost",
            "delivery_ms", "accept_ms", "server_cpu_percent")}), flush=True)


if __name__ == "__main__":
    main()
