"""The *api* scenario: pushes through the HTTP/2 API at rising rates, each one durable.

1. Start the gateway as its own process (`python -m gateway.cli run -c CFG`, pinned like
   the other scenarios) with the API on a loopback port, one ES256 provider key, the rate
   limiter and the per-device queue raised out of the way, and `store.synchronous: FULL`
   (every 200 means the push is fsynced: group commit, one fsync per event-loop turn).
2. Connect N devices (`--devices`, TLS by default) from the load generator's worker
   processes; they ack every push as they read it. Their tokens come back with the
   connect report and make h2load's URI list (POST /3/device/<token>, round-robin).
3. For each offered rate (`--rates`), h2load (nghttp2, C) sends rate x `--step-seconds`
   pushes at that rate (`--rps` per client, `--clients` connections, at most `--streams`
   in flight on each) and logs every request. Per step: achieved rate (200s over the span
   from the first request to the last response), accept latency p50/p90/p99 (request
   written -> response, h2load's per-request log), answers other than 200, the gateway's
   CPU (/proc/PID/task/*/schedstat), the load generator's and h2load's CPU and other load.
4. Stop early once a step achieves < 80% of its offer, or when the time budget is spent;
   then check that every accepted push reached a device (the devices' count and the
   gateway's own delivered counter, control socket).

"Sustained rate": the highest step with achieved >= 95% of offered, accept p99 <=
`--p99-ms` (50) and no failures. Target (2-core machine): >= 2,000 pushes/s sustained.

    .venv/bin/python bench/api_throughput.py
    .venv/bin/python bench/api_throughput.py --synchronous NORMAL   # tagged "normal"

Bounded: the quiet wait and everything after it fit in `--budget` (180 s); every process
this run started (gateway, load-generator workers, h2load) is stopped by its pid, also on
failure, Ctrl-C or SIGTERM. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import jwt
import report
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from lib import host
from lib.host import (
    Background,
    plan_cpus,
    stop_process,
)
from lib.payloads import TOPIC
from loadgen import (
    LoadGen,
    LpgwTarget,
    common_arguments,
    control_call,
    result_head,
    running,
    summary,
)

from gateway.service import free_port

TEAM, KEY_ID = "BENCH12345", "BENCHKEY01"
BODY = '{"aps":{"alert":"Bed 12 calls"},"ward":3}'
# the issue's target on a 2-core machine (report.py keeps every scenario's targets)
TARGET_RATE = report.TARGETS["api_per_s"]
TARGET_P99_MS = report.TARGETS["api_p99_ms"]
SUSTAINED = 0.95  # a step is sustained if it achieves this share of its offer ...
SATURATED = 0.80  # ... and the sweep stops after a step below this share


class ApiTarget(LpgwTarget):
    """The gateway with its API on a free loopback port, one ES256 provider key for TOPIC,
    the rate limiter and the per-device queue raised so that neither is what is measured."""

    def __init__(self, transport: str, tmp: Path, heartbeat: float = 10.0,
                 synchronous: str = "FULL") -> None:
        super().__init__(transport, tmp, heartbeat=heartbeat, synchronous=synchronous)
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.key_file = tmp / "provider-key.pub"
        self.key_file.write_bytes(self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        self.api_port = 0

    def make_config(self, state: Path) -> dict[str, Any]:
        config = super().make_config(state)
        self.api_port = self.api_port or free_port("127.0.0.1")
        config["api"] = {"enabled": True, "host": "127.0.0.1", "port": self.api_port,
                         "rate_limit": 1e6, "rate_burst": 10**6, "metrics_need_auth": False,
                         "providers": [{"team_id": TEAM, "key_id": KEY_ID,
                                        "key_file": str(self.key_file), "topics": [TOPIC]}]}
        config["delivery"] = {"queue_limit": 100000}
        return config

    def start(self) -> None:
        super().start()
        if self.runtime.get("api_port") != self.api_port:
            raise RuntimeError(f"the gateway is not where it was told to listen: {self.runtime}")

    def provider_token(self) -> str:
        """The JWT an app server sends (valid an hour; a run is minutes)."""
        return jwt.encode({"iss": TEAM, "iat": int(time.time())}, self.key, algorithm="ES256",
                          headers={"kid": KEY_ID})

    def status(self) -> dict[str, Any]:
        """The gateway's own status (control socket): connected devices, pushes delivered."""
        return asyncio.run(control_call(self.control, [{"op": "status"}]))[0]["status"]


# --- the disk under the store -----------------------------------------------------------


def fs_type(path: Path) -> str:
    best, kind = "", "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount, fs = line.split()[:3]
            if str(path.resolve()).startswith(mount) and len(mount) > len(best):
                best, kind = mount, fs
    return kind


def fsync_probe(directory: Path, n: int = 20) -> dict[str, Any]:
    """What one fsync costs where the store lives: 4 KiB appended and fsynced, n times. A
    group commit (SQLite WAL, synchronous FULL) costs at least one of these."""
    path = directory / "fsync-probe"
    times = []
    with path.open("wb") as f:
        for _ in range(n):
            f.write(b"x" * 4096)
            f.flush()
            t = time.perf_counter()
            os.fsync(f.fileno())
            times.append((time.perf_counter() - t) * 1000)
    path.unlink()
    return {"filesystem": fs_type(directory), "fsync_4k_ms": summary(times, 3)}


# --- h2load -----------------------------------------------------------------------------------


def h2load_counts(text: str) -> dict[str, Any]:
    """h2load's own summary: its `requests:` and `status codes:` lines."""
    out: dict[str, Any] = {}
    for line in text.splitlines():
        if line.startswith("requests:"):
            out["requests"] = {k: int(v) for v, k in re.findall(r"(\d+) (\w+)", line)}
        elif line.startswith("status codes:"):
            out["status_codes"] = {k: int(v) for v, k in re.findall(r"(\d+) (\w+)", line)}
        elif line.startswith("finished in"):
            out["finished"] = line.strip()
    return out


def h2load_version() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(["h2load", "--version"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    return "?"


def run_h2load(work: Path, tag: str, *, rate: float, count: int, clients: int, streams: int,
               auth: str) -> dict[str, Any]:
    """`count` pushes at `rate`/s: h2load with --rps rate/clients on each of `clients`
    connections, at most `streams` in flight on each. Returns its per-request log, its
    summary, wall time and CPU."""
    log_file, out_file = work / f"{tag}.log", work / f"{tag}.out"
    clients = max(1, min(clients, count))
    limit = count / rate + 30
    command = ["h2load", "-n", str(count), "-c", str(clients), "-m", str(streams),
               f"--rps={rate / clients:g}", "-i", str(work / "uris"), "-d", str(work / "body"),
               "-H", f"authorization: bearer {auth}", "-H", "apns-push-type: alert",
               "-H", f"apns-topic: {TOPIC}", "--log-file", str(log_file)]
    usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    with out_file.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        rc: int | None = proc.wait(limit)
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        stop_process(proc, grace=5)
    wall = time.monotonic() - started
    usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    rows = []
    if log_file.exists():
        for line in log_file.read_text().splitlines():
            f = line.split("\t")
            if len(f) >= 3:
                rows.append((int(f[0]) / 1e6, int(f[1]), int(f[2]) / 1e3))  # s, status, ms
    text = out_file.read_text(errors="replace")
    return {"command": " ".join(c if " " not in c else repr(c) for c in command)
            .replace(auth, "<JWT>"),
            "exit_code": rc if rc is not None else f"killed after {limit:.0f} s",
            "wall_s": wall, "rows": rows, "summary": h2load_counts(text), "tail": text[-1500:],
            "cpu_s": (usage1.ru_utime + usage1.ru_stime) - (usage0.ru_utime + usage0.ru_stime)}


# --- the scenario --------------------------------------------------------------------------


def step_figures(rate: float, count: int, h: dict[str, Any]) -> dict[str, Any]:
    rows = h["rows"]
    ok = [ms for _, status, ms in rows if status == 200]
    statuses: dict[str, int] = {}
    for _, status, _ in rows:
        if status != 200:
            statuses[str(status)] = statuses.get(str(status), 0) + 1
    if rows:
        first = min(t for t, _, _ in rows)
        span = max(t + ms / 1000 for t, _, ms in rows) - first
        issue = max(t for t, _, _ in rows) - first
    else:
        span = issue = 0.0
    achieved = len(ok) / span if span > 0 else 0.0
    lat = summary(ok, 2)
    return {
        "offered_per_s": rate, "pushes": count, "accepted_200": len(ok),
        "other_status": statuses, "no_answer": count - len(rows),
        "span_s": round(span, 3),
        "achieved_per_s": round(achieved, 1),
        "achieved_share": round(achieved / rate, 3),
        "issued_per_s": round((len(rows) - 1) / issue, 1) if issue > 0 else None,
        "accept_ms": {**lat, "mean": round(sum(ok) / len(ok), 2) if ok else None},
        "h2load_exit": h["exit_code"], "h2load_wall_s": round(h["wall_s"], 3),
        "h2load_requests": h["summary"].get("requests"),
    }


def sustained(step: dict[str, Any], p99_ms: float) -> bool:
    p99 = step["accept_ms"]["p99"]
    return (step["achieved_share"] >= SUSTAINED and p99 is not None and p99 <= p99_ms
            and not step["other_status"] and not step["no_answer"])


def api(target: ApiTarget, *, rates: list[float], step_seconds: float, devices: int,
        workers: int, clients: int, streams: int, warmup: float = 1.0, pause: float = 1.0,
        p99_ms: float = TARGET_P99_MS, budget: float = 180, quiet_wait: float = 20,
        keep_going: bool = False) -> dict[str, Any]:
    began = time.monotonic()
    result: dict[str, Any] = {
        **result_head("api", target),
        "settings": {"rates_per_s": rates, "step_seconds": step_seconds, "devices": devices,
                     "workers": workers, "h2load_clients": clients,
                     "h2load_streams_per_client": streams, "in_flight_cap": clients * streams,
                     "warmup_s": warmup, "pause_s": pause, "p99_target_ms": p99_ms,
                     "sustained_share": SUSTAINED, "saturated_share": SATURATED,
                     "budget_s": budget, "body_bytes": len(BODY), "cpus": host.CPU_PLAN},
        "steps": [], "complete": False}
    work = target.tmp / "h2load"
    work.mkdir()
    with running(target, result, quiet_wait):
        result["disk"] = fsync_probe(target.tmp / "state")
        meter = target.meter
        with LoadGen(workers) as lg:
            lg.setup(target, devices)
            r = lg.connect(devices, concurrency=32, timeout=60)
            tokens = [t for t in r["tokens"] if t]
            result["connect"] = {"welcomed": r["welcomed"], "not_welcomed": r["not_welcomed"],
                                 "last_error": r["last_error"]}
            if r["not_welcomed"] or len(tokens) != devices:
                result["stopped_early"] = (f"only {r['welcomed']}/{devices} devices welcomed "
                                           f"({r['last_error']})")
                print(result["stopped_early"], flush=True)
                return result
            base = f"https://127.0.0.1:{target.api_port}/3/device/"
            (work / "uris").write_text("".join(f"{base}{t}\n" for t in tokens))
            (work / "body").write_text(BODY)
            auth = target.provider_token()
            result["h2load"] = {"version": h2load_version(), "command": None}
            accepted = 0
            if warmup > 0:  # the connections, the token cache and the store warm, not counted
                rate = min(rates[0], 200.0)
                h = run_h2load(work, "warmup", rate=rate, count=max(clients, int(rate * warmup)),
                               clients=clients, streams=streams, auth=auth)
                accepted += sum(1 for _, status, _ in h["rows"] if status == 200)
                result["warmup"] = {"pushes": len(h["rows"]), "accepted_200": accepted}
            print(f"api {target.transport}: {devices} devices connected; store synchronous "
                  f"{target.synchronous}, fsync of 4 KiB p50 "
                  f"{result['disk']['fsync_4k_ms']['p50']} ms", flush=True)
            for rate in rates:
                count = max(clients, round(rate * step_seconds))
                left = budget - (time.monotonic() - began)
                need = count / rate + pause + 15
                if left < need:
                    result["stopped_early"] = (f"time budget of {budget:g} s: the step at "
                                               f"{rate:g}/s would need ~{need:.0f} s, "
                                               f"{left:.0f} s left")
                    print(result["stopped_early"], flush=True)
                    break
                time.sleep(pause)
                target.alive()
                lg0 = lg.stats()
                background = Background(target.pids() + lg.pids)
                c0, w0 = meter.cpu_seconds(), time.monotonic()
                h = run_h2load(work, f"step-{rate:g}", rate=rate, count=count, clients=clients,
                               streams=streams, auth=auth)
                c1, w1 = meter.cpu_seconds(), time.monotonic()
                others = background.cores() - h["cpu_s"] / max(1e-9, w1 - w0)
                lg1 = lg.stats()
                step = step_figures(rate, count, h)
                accepted += step["accepted_200"]
                step.update({
                    "gateway_cpu_percent": round(100 * (c1 - c0) / (w1 - w0), 1),
                    "gateway_cpu_ms_per_push": round(1000 * (c1 - c0)
                                                     / max(1, step["accepted_200"]), 3),
                    "loadgen_cpu_percent": round(
                        100 * (lg1["cpu_seconds"] - lg0["cpu_seconds"]) / (w1 - w0), 1),
                    "h2load_cpu_percent": round(100 * h["cpu_s"] / (w1 - w0), 1),
                    "other_load_cores": round(max(0.0, others), 2),
                    "delivered_by_step_end": lg1["pushes"] - lg0["pushes"],
                    "undelivered_at_step_end": accepted - lg1["pushes"],
                    "gateway_rss_kib": meter.rss_kib(),
                    "devices_connected": lg1["connected"],
                })
                step["sustained"] = sustained(step, p99_ms)
                result["steps"].append(step)
                result["h2load"]["command"] = h["command"]
                lat = step["accept_ms"]
                print(f"  offered {rate:g}/s: achieved {step['achieved_per_s']:g}/s "
                      f"({100 * step['achieved_share']:.0f}%), accept p50/p90/p99 "
                      f"{lat['p50']}/{lat['p90']}/{lat['p99']} ms, non-200 "
                      f"{sum(step['other_status'].values())}, no answer {step['no_answer']}, "
                      f"gateway CPU {step['gateway_cpu_percent']}%, other load "
                      f"{step['other_load_cores']} cores", flush=True)
                if step["achieved_share"] < SATURATED and not keep_going:
                    result["saturated_at_per_s"] = rate
                    print(f"  saturated at {rate:g}/s: stopping the sweep", flush=True)
                    break
            # every accepted push reached a device (each acks at once): wait a little
            deadline = time.monotonic() + 30
            while True:
                got = lg.stats()
                status = target.status()
                acked = int(status["pushes"]["delivered"])
                if (got["pushes"] >= accepted and acked >= accepted) \
                        or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            result["delivery"] = {
                "accepted_200": accepted, "received_by_devices": got["pushes"],
                "acked_per_gateway": acked, "duplicates": got["counts"].get("duplicates", 0),
                "device_drops": got["counts"].get("drops", 0),
                "all_delivered": got["pushes"] >= accepted and acked >= accepted,
            }
            result["loadgen_cpu_s"] = got["cpu_seconds"]
            result["gateway_rss_hwm_kib"] = meter.hwm_kib()
            target.stop()
        ok = [s for s in result["steps"] if s["sustained"]]
        result["sustained_per_s"] = max((s["offered_per_s"] for s in ok), default=None)
        result["max_achieved_per_s"] = max((s["achieved_per_s"] for s in result["steps"]),
                                           default=None)
        result["targets"] = verdicts(result)
        if not result["delivery"]["all_delivered"]:
            result["stopped_early"] = (f"only {result['delivery']['received_by_devices']} of "
                                       f"{accepted} accepted pushes reached a device")
        result["complete"] = "stopped_early" not in result
        print(headline(result), flush=True)
    result["seconds"] = round(time.monotonic() - began, 1)
    return result


def verdicts(r: dict[str, Any]) -> list[dict[str, Any]]:
    p99 = r["settings"]["p99_target_ms"]
    best = next((s for s in r["steps"] if s["offered_per_s"] == r.get("sustained_per_s")), None)
    d = r["delivery"]
    sync = r["target"]["config"]["store"]["synchronous"]
    rate_ok = best is not None and best["offered_per_s"] >= TARGET_RATE and sync == "FULL"
    return [
        {"target": f"≥ {TARGET_RATE:,} durably accepted pushes/s sustained, accept p99 ≤ "
                   f"{p99:g} ms",
         "measured": (f"{best['offered_per_s']:,.0f}/s sustained (achieved "
                      f"{best['achieved_per_s']:,.0f}/s, p99 {best['accept_ms']['p99']} ms, "
                      f"synchronous {sync}); max achieved {r['max_achieved_per_s']:,.0f}/s"
                      if best else f"no step sustained (synchronous {sync}); max achieved "
                                   f"{_f(r['max_achieved_per_s'], 0)}/s"),
         "met": "met" if rate_ok else "not met"},
        {"target": "every accepted push delivered",
         "measured": f"{d['received_by_devices']:,}/{d['accepted_200']:,} received, "
                     f"{d['acked_per_gateway']:,.0f} acked (gateway)",
         "met": "met" if d["all_delivered"] else "not met"},
    ]


def headline(r: dict[str, Any]) -> str:
    d = r["delivery"]
    return (f"api {r['transport']}: sustained {_f(r['sustained_per_s'], 0)}/s, max achieved "
            f"{_f(r['max_achieved_per_s'], 0)}/s (synchronous "
            f"{r['target']['config']['store']['synchronous']}); "
            f"{d['received_by_devices']}/{d['accepted_200']} accepted pushes delivered")


def _f(value: Any, digits: int = 1) -> str:
    return report._f(value, digits)


# --- files -----------------------------------------------------------------------------------


def markdown(r: dict[str, Any]) -> str:
    s = r["settings"]
    lines = [f"# api: lpgw, {s['devices']} {r['transport'].upper()} devices", "",
             f"Machine: {report.machine_line(r)}", ""]
    sync = r["target"]["config"]["store"]["synchronous"] if "target" in r else "?"
    disk = r.get("disk", {})
    lines += [f"POST /3/device/<token> over HTTP/2 (h2load: {s['h2load_clients']} connections, "
              f"≤ {s['h2load_streams_per_client']} streams in flight each, {s['body_bytes']} "
              f"byte body), {s['step_seconds']:g} s per step; store synchronous {sync} "
              f"({disk.get('filesystem', '?')}, fsync of 4 KiB p50 "
              f"{_f((disk.get('fsync_4k_ms') or {}).get('p50'), 2)} ms); devices ack every push.",
              ""]
    for key in ("note", "stopped_early"):
        if r.get(key):
            lines += [f"{key.replace('_', ' ').capitalize()}: {r[key]}", ""]
    if r.get("saturated_at_per_s"):
        lines += [f"Saturated at {r['saturated_at_per_s']:,.0f}/s (achieved < "
                  f"{100 * s['saturated_share']:.0f}% of offered): the sweep stopped there.", ""]
    if r["steps"]:
        lines += ["| offered /s | pushes | 200 | other | no answer | achieved /s | of offered | "
                  "accept p50 ms | p90 ms | p99 ms | max ms | gateway CPU % | CPU ms/push | "
                  "devices + h2load CPU % | other load cores | sustained |",
                  "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for x in r["steps"]:
            a = x["accept_ms"]
            other = ", ".join(f"{k}: {v}" for k, v in x["other_status"].items()) or "0"
            lines.append(
                f"| {_f(x['offered_per_s'], 0)} | {_f(x['pushes'])} | {_f(x['accepted_200'])} "
                f"| {other} | {_f(x['no_answer'])} | {_f(x['achieved_per_s'], 0)} | "
                f"{100 * x['achieved_share']:.0f}% | {_f(a['p50'], 2)} | {_f(a['p90'], 2)} | "
                f"{_f(a['p99'], 2)} | {_f(a['max'], 1)} | {_f(x['gateway_cpu_percent'])} | "
                f"{_f(x['gateway_cpu_ms_per_push'], 3)} | "
                f"{_f(x['loadgen_cpu_percent'] + x['h2load_cpu_percent'])} | "
                f"{_f(x['other_load_cores'], 2)} | {'yes' if x['sustained'] else 'no'} |")
        lines.append("")
    if "delivery" in r:
        d = r["delivery"]
        lines += [f"Sustained: **{_f(r['sustained_per_s'], 0)}/s** (the highest step with ≥ "
                  f"{100 * s['sustained_share']:.0f}% of its offer achieved, p99 ≤ "
                  f"{s['p99_target_ms']:g} ms, no failures); max achieved "
                  f"{_f(r['max_achieved_per_s'], 0)}/s. Delivered: "
                  f"{_f(d['received_by_devices'])} of {_f(d['accepted_200'])} accepted pushes "
                  f"(warm-up included), {_f(d['acked_per_gateway'], 0)} acked per the gateway, "
                  f"{_f(d['duplicates'])} duplicates, {_f(d['device_drops'])} device drops.", ""]
    if r.get("targets"):
        lines += ["| target | measured | |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['measured']} | **{t['met']}** |" for t in r["targets"]]
        lines.append("")
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> bool:
    plt = report.pyplot()
    if plt is None:
        return False
    import matplotlib.ticker
    steps = r["steps"]
    offered = [x["offered_per_s"] for x in steps]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.2))
    a.plot(offered, [x["achieved_per_s"] for x in steps], "o-", label="achieved (200s)")
    top = max(offered) * 1.05
    a.plot([0, top], [0, top], ":", c="grey", label="= offered")
    a.plot([0, top], [0, SUSTAINED * top], "--", c="lightgrey",
           label=f"{100 * SUSTAINED:.0f}% of offered")
    if top >= 0.8 * TARGET_RATE:
        a.axhline(TARGET_RATE, ls=":", c="tab:red", label=f"target {TARGET_RATE:,}/s")
    a.set(title="durably accepted pushes per second", xlabel="offered /s", ylabel="achieved /s")
    for key, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^-")):
        b.plot(offered, [x["accept_ms"][key] for x in steps], style, label=key)
    b.axhline(r["settings"]["p99_target_ms"], ls=":", c="tab:red",
              label=f"p99 target {r['settings']['p99_target_ms']:g} ms")
    b.set_yscale("log")
    b.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    b.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    b.set(title="accept latency (request -> 200)", xlabel="offered /s", ylabel="ms")
    c.plot(offered, [x["gateway_cpu_percent"] for x in steps], "o-", label="gateway")
    c.plot(offered, [x["loadgen_cpu_percent"] + x["h2load_cpu_percent"] for x in steps], "s--",
           label="devices + h2load")
    c.set(title="CPU (% of one core)", xlabel="offered /s", ylabel="%")
    sync = r["target"]["config"]["store"]["synchronous"]
    fig.suptitle(f"api: lpgw, store synchronous {sync}, {r['settings']['devices']} "
                 f"{r['transport'].upper()} devices", fontsize=10)
    report.save_figure(fig, (a, b, c), path, from_zero=(a, c))
    return True


def parse_rates(text: str) -> list[float]:
    return [float(x.strip().lower().replace("k", "e3")) for x in text.split(",") if x.strip()]


def main() -> None:
    p = argparse.ArgumentParser(description="durable pushes per second through the HTTP/2 "
                                            "API at rising rates, and accept latency")
    p.add_argument("--rates", default="500,1000,1500,2000,2500,3000,4000",
                   help="offered pushes per second, one step each")
    p.add_argument("--step-seconds", type=float, default=10.0,
                   help="each step sends rate x this many pushes")
    p.add_argument("--devices", type=int, default=100, help="devices receiving the pushes")
    p.add_argument("--transport", choices=("tls", "quic"), default="tls",
                   help="the devices' transport")
    p.add_argument("--clients", type=int, default=4, help="h2load connections (-c)")
    p.add_argument("--streams", type=int, default=100,
                   help="h2load streams in flight per connection at most (-m)")
    p.add_argument("--synchronous", choices=("FULL", "NORMAL"), default="FULL",
                   help="the gateway's store.synchronous (NORMAL: an experiment, tagged)")
    p.add_argument("--p99-ms", type=float, default=TARGET_P99_MS,
                   help="accept p99 a sustained step must keep")
    p.add_argument("--warmup", type=float, default=1.0,
                   help="seconds of pushes (at most 200/s) before the steps, not counted")
    p.add_argument("--pause", type=float, default=1.0, help="seconds between steps")
    p.add_argument("--keep-going", action="store_true",
                   help="run every step even after one saturates")
    p.add_argument("--heartbeat", type=float, default=10.0, help="protocol.heartbeat, s")
    p.add_argument("--workers", type=int, default=1, help="load generator processes")
    p.add_argument("--budget", type=float, default=180,
                   help="seconds for the whole run, at most (the quiet wait included)")
    common_arguments(p, "the devices and h2load", quiet_wait=20, tag=False)
    p.add_argument("--tag", default="", help="suffix for the result files (experiments; "
                                             "--synchronous NORMAL alone means 'normal')")
    args = p.parse_args()
    if shutil.which("h2load") is None:
        raise SystemExit("needs h2load (Debian package nghttp2-client)")
    rates = sorted(parse_rates(args.rates))
    if not rates or min(rates) <= 0 or args.devices < 1 or args.step_seconds <= 0:
        raise SystemExit("--rates, --devices and --step-seconds must be positive")
    tag = args.tag or ("normal" if args.synchronous == "NORMAL" else "")

    plan_cpus(not args.no_pin)
    with tempfile.TemporaryDirectory(prefix="lpgw-bench-") as tmp:
        target = ApiTarget(args.transport, Path(tmp), heartbeat=args.heartbeat,
                           synchronous=args.synchronous)
        result = api(target, rates=rates, step_seconds=args.step_seconds,
                     devices=args.devices, workers=args.workers, clients=args.clients,
                     streams=args.streams, warmup=args.warmup, pause=args.pause,
                     p99_ms=args.p99_ms, budget=args.budget, quiet_wait=args.quiet_wait,
                     keep_going=args.keep_going)
    if not args.no_report:
        report.save(result, args.out, plots=False, tag=tag, markdown_of=markdown,
                    plot=lambda r, path: bool(r["steps"]) and plot(r, path))
    print(json.dumps({k: result.get(k) for k in ("scenario", "transport", "sustained_per_s",
                                                 "max_achieved_per_s", "delivery", "targets",
                                                 "complete", "stopped_early")}), flush=True)
    if not result["complete"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
