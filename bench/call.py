"""The *call* scenario: calls from SIPp at a steady rate while N devices are connected.

1. Start the gateway as its own process (`python -m gateway.cli run -c CFG`, the same as
   the idle and storm scenarios) with its SIP bridge on a loopback port, the API on another
   (for /metrics) and an HS256 key for user assertions.
2. Connect N idle devices (the load generator's workers, TLS or QUIC, heartbeating) and K
   callee devices in a worker of their own, device i saying hello with a user assertion
   (HS256 JWT, sub=user<i>), so the gateway binds it to user<i>. Every device acks every
   push as soon as it reads it: the callee's ack of the incoming-call push is what makes
   the gateway answer 180.
3. Read the gateway's CPU at idle for `--baseline` s, scrape /metrics, let SIPp place
   `--calls` calls at `--rate` per second to user0..user<K-1> (INVITE -> 100/180 -> CANCEL
   -> 200/487 -> ACK, tests/sip/uac_cancel.xml), scrape /metrics again.

Measured:

- INVITE read -> incoming-call frames written, and INVITE read -> 180 sent: the gateway's
  own histograms (lpgw_sip_invite_to_push_seconds, lpgw_sip_invite_to_ringing_seconds),
  after minus before. Their buckets sit on the targets (1, 5, 10 ms), so the fraction of
  calls within each target is exact; p50/p90/p99 are interpolated linearly within the
  bucket they fall in (as Prometheus' histogram_quantile does) and so are estimates.
- INVITE sent -> 180 received (and INVITE -> 100, CANCEL -> 487) as SIPp saw them, a check
  from outside the gateway: the time of each message from SIPp's message trace
  (-trace_shortmsg: gettimeofday when SIPp sent or read it, in µs), every call. SIPp's
  response-time measurement (rtd) is recorded too, but its values come in steps of 4 ms
  here, too coarse for these targets.
- Calls placed, answered with 180, completed and failed (SIPp's statistics and exit code);
  devices connected at the start and the end (the gateway's control socket); the
  gateway's CPU during the calls, and at idle just before them.

    .venv/bin/python bench/call.py --devices 10000 --callees 50 --calls 1000 --rate 50

Bounded: the quiet wait (`--quiet-wait`), the gateway's start (60 s), connecting
(`--connect-spread` + `--connect-timeout` for the idle devices, 60 s for the callees),
the baseline, SIPp (-timeout of calls/rate + 30 s, killed 15 s after that); every process
this run started is stopped by its pid, also on failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import secrets
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import jwt
import report
from lib import host
from lib.host import (
    ROOT,
    Background,
    cap_devices,
    plan_cpus,
    stop_process,
)
from loadgen import (
    LoadGen,
    LpgwTarget,
    common_arguments,
    default_workers,
    parse_steps,
    pct,
    result_head,
    running,
    summary,
)
from prometheus_client.parser import text_string_to_metric_families

from gateway.service import free_port

PUSH = "lpgw_sip_invite_to_push_seconds"
RINGING = "lpgw_sip_invite_to_ringing_seconds"
# the targets (2-core machine, loopback)
TARGET_DEVICES = 10_000
TARGETS = [  # (histogram, quantile, at most seconds, what)
    (PUSH, 50, 0.001, "INVITE received to incoming-call frame written p50 ≤ 1 ms"),
    (PUSH, 99, 0.005, "INVITE received to incoming-call frame written p99 ≤ 5 ms"),
    (RINGING, 99, 0.010, "INVITE received to 180 sent p99 ≤ 10 ms"),
]
SIPP_EXIT = {0: "all calls successful", 1: "at least one call failed",
             97: "exit on internal command", 99: "normal exit without calls processed",
             255: "fatal error", 254: "fatal error binding a socket"}


class CallTarget(LpgwTarget):
    """The gateway with its SIP bridge and API (for /metrics) on free loopback ports, and an
    HS256 key for device assertions."""

    def __init__(self, transport: str, tmp: Path, heartbeat: float = 10.0,
                 synchronous: str = "FULL") -> None:
        super().__init__(transport, tmp, heartbeat=heartbeat, synchronous=synchronous)
        self.secret = secrets.token_urlsafe(33)  # 44 characters: at least 32 bytes
        self.secret_file = tmp / "assertion-secret"
        self.secret_file.write_text(self.secret)
        self.secret_file.chmod(0o600)
        self.sip_port = 0
        self.api_port = 0

    def make_config(self, state: Path) -> dict[str, Any]:
        config = super().make_config(state)
        self.sip_port = self.sip_port or free_port("127.0.0.1")
        self.api_port = self.api_port or free_port("127.0.0.1")
        config["api"] = {"enabled": True, "host": "127.0.0.1", "port": self.api_port,
                         "metrics_need_auth": False}
        config["sip"] = {"enabled": True, "host": "127.0.0.1", "port": self.sip_port}
        config["assertions"] = {"hs256_secret_file": str(self.secret_file)}
        return config

    def start(self) -> None:
        super().start()
        if (self.runtime.get("sip_port"), self.runtime.get("api_port")) != \
                (self.sip_port, self.api_port):
            raise RuntimeError(f"the gateway is not where it was told to listen: {self.runtime}")

    def assertion(self, user: str, lifetime: float = 86400) -> str:
        """A user assertion as the app's backend would mint it (docs/protocol.md)."""
        return jwt.encode({"sub": user, "exp": int(time.time() + lifetime)}, self.secret,
                          algorithm="HS256")

    def metrics(self) -> str:
        """GET /metrics over HTTPS; the gateway's self-signed certificate is the trust."""
        ctx = ssl.create_default_context(cafile=str(self.tmp / "state" / "gateway.crt"))
        ctx.check_hostname = False  # issued to the gateway's name, reached as 127.0.0.1
        url = f"https://127.0.0.1:{self.api_port}/metrics"
        with urllib.request.urlopen(url, context=ctx, timeout=10) as response:
            return response.read().decode()


# --- histograms from the Prometheus text ---------------------------------------------------


def histogram(text: str, name: str) -> dict[str, Any]:
    """{"buckets": [(upper bound s, cumulative count), ...], "count", "sum"} of one
    histogram; the last bound is +inf."""
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        buckets, count, total = [], 0.0, 0.0
        for s in family.samples:
            if s.name == name + "_bucket":
                buckets.append((float(s.labels["le"]), s.value))
            elif s.name == name + "_count":
                count = s.value
            elif s.name == name + "_sum":
                total = s.value
        if buckets:
            return {"buckets": sorted(buckets), "count": count, "sum": total}
    raise RuntimeError(f"no histogram {name} in /metrics")


def hist_delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    old = dict(before["buckets"])
    return {"buckets": [(le, round(n - old.get(le, 0.0))) for le, n in after["buckets"]],
            "count": round(after["count"] - before["count"]),
            "sum": after["sum"] - before["sum"]}


def within(h: dict[str, Any], bound: float) -> float | None:
    """The exact fraction of observations ≤ `bound` (which must be a bucket bound)."""
    if not h["count"]:
        return None
    for le, n in h["buckets"]:
        if math.isclose(le, bound):
            return n / h["count"]
    raise ValueError(f"{bound} s is not a bucket bound")


def quantile(h: dict[str, Any], q: float) -> dict[str, Any]:
    """The q-th percentile, interpolated linearly within its bucket (histogram_quantile),
    and the bucket it falls in (ms); above the last finite bound: no value."""
    if not h["count"]:
        return {"ms": None, "bucket_ms": None}
    rank = q / 100 * h["count"]
    lower, below = 0.0, 0
    for le, n in h["buckets"]:
        if n >= rank and n > below:
            if math.isinf(le):
                return {"ms": None, "bucket_ms": [round(lower * 1000, 3), None]}
            value = lower + (le - lower) * (rank - below) / (n - below)
            return {"ms": round(value * 1000, 3),
                    "bucket_ms": [round(lower * 1000, 3), round(le * 1000, 3)]}
        lower, below = le, n
    return {"ms": None, "bucket_ms": None}


def describe_hist(h: dict[str, Any], source: str) -> dict[str, Any]:
    out: dict[str, Any] = {"source": source, "count": h["count"],
                           "mean_ms": round(1000 * h["sum"] / h["count"], 3) if h["count"]
                           else None}
    for q in (50, 90, 99):
        est = quantile(h, q)
        out[f"p{q}_ms"], out[f"p{q}_bucket_ms"] = est["ms"], est["bucket_ms"]
    out["within_ms"] = {_ms(le): (round(n / h["count"], 5) if h["count"] else None)
                        for le, n in h["buckets"] if not math.isinf(le)}
    out["buckets_ms"] = [[_ms(le), n] for le, n in h["buckets"]]  # cumulative counts
    return out


def _ms(seconds: float) -> str:
    return "+Inf" if math.isinf(seconds) else f"{seconds * 1000:g}"


# --- SIPp ----------------------------------------------------------------------------------


def scenario_xml() -> str:
    """tests/sip/uac_cancel.xml calling [field0] of the injection file, with SIPp's response
    time 1 running from the INVITE sent to the 180 received."""
    xml = (ROOT / "tests" / "sip" / "uac_cancel.xml").read_text()
    edits = [("[service]", "[field0]"),
             ('<send retrans="500">', '<send retrans="500" start_rtd="1">'),
             ('<recv response="180"/>', '<recv response="180" rtd="1"/>')]
    for old, new in edits:
        if old not in xml:
            raise RuntimeError(f"tests/sip/uac_cancel.xml changed: no {old!r} in it")
        xml = xml.replace(old, new, 1 if old.startswith("<") else -1)
    return xml


def rtd_summary(values: list[float]) -> dict[str, Any]:
    """SIPp's own response time 1 (rtd), kept beside the message trace: its values come in
    steps of several ms (4 ms on the machine this was written on: see clock_step_ms), too
    coarse for millisecond targets."""
    ints = [round(v) for v in values if v > 0]
    return {"source": "SIPp response time (rtd, -trace_rtt): INVITE sent -> 180 received, "
                      "in SIPp's clock steps",
            "count": len(values), **summary(values, 1),
            "clock_step_ms": math.gcd(*ints) if ints else None,
            "ms_counts": {f"{v:g}": values.count(v) for v in sorted(set(values))}}


def run_sipp(target: CallTarget, users: list[str], calls: int, rate: float, work: Path,
             recv_timeout_s: float = 15.0) -> dict[str, Any]:
    """SIPp places `calls` calls at `rate`/s to `users` in turn: its exit code, statistics
    (the last line of its -trace_stat file), every message's time (-trace_shortmsg) and its
    response times INVITE -> 180 (-trace_rtt)."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "call.xml").write_text(scenario_xml())
    (work / "users.csv").write_text("SEQUENTIAL\n" + "".join(f"{u}\n" for u in users))
    limit = math.ceil(calls / rate) + 30
    command = [
        "sipp", f"127.0.0.1:{target.sip_port}", "-sf", "call.xml", "-inf", "users.csv",
        "-m", str(calls), "-r", f"{rate:g}", "-i", "127.0.0.1", "-p", str(free_port("127.0.0.1")),
        "-recv_timeout", str(int(recv_timeout_s * 1000)),  # > the gateway's reach timeout
        "-timeout", f"{limit}s", "-timeout_error", "-nostdin", "-nd",
        "-trace_stat", "-stf", "stat.csv", "-fd", "1",
        "-trace_shortmsg", "-shortmessage_file", "messages.tsv",
        "-trace_rtt", "-rtt_freq", "1", "-trace_err"]
    log = (work / "sipp.log").open("w")
    usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    proc = subprocess.Popen(command, cwd=work, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    log.close()
    try:
        rc = proc.wait(limit + 15)
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        stop_process(proc, grace=5)
    wall = time.monotonic() - started
    usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    stats = sipp_stats(work / "stat.csv")
    rtt = [float(line.split(";")[1]) for f in sorted(work.glob("*_rtt.csv"))
           for line in f.read_text().splitlines()[1:] if line.count(";") >= 2
           and line.split(";")[2].strip() == "1"]
    errors = sorted(work.glob("*_errors.log"))
    return {
        "command": " ".join(command), "exit_code": rc if rc is not None else proc.returncode,
        "exit_meaning": SIPP_EXIT.get(rc, "killed: did not finish within its -timeout + 15 s"
                                      if rc is None else "?"),
        "wall_s": round(wall, 2),
        "cpu_s": round((usage1.ru_utime + usage1.ru_stime)
                       - (usage0.ru_utime + usage0.ru_stime), 3),
        "stats": stats, "rtd_ms": rtt, "calls": sipp_calls(work / "messages.tsv"),
        "errors_head": errors[0].read_text()[:2000] if errors else "",
        "log_tail": (work / "sipp.log").read_text(errors="replace")[-1500:],
    }


def sipp_calls(path: Path) -> dict[str, dict[str, float]]:
    """Call-ID -> the first time (s, SIPp's gettimeofday when it sent or read the message)
    of: INVITE sent, 100, 180 and 487 received, CANCEL sent."""
    calls: dict[str, dict[str, float]] = {}
    if not path.exists():
        return calls
    for line in path.read_text(errors="replace").splitlines():
        f = line.split("\t")  # date, time, epoch s, S|R, Call-ID, CSeq, first line
        if len(f) < 7:
            continue
        what = f[6].split()
        key = (what[0] if f[3] == "S" else what[1]) if len(what) > 1 else ""
        if key in ("INVITE", "CANCEL", "100", "180", "487"):
            calls.setdefault(f[4], {}).setdefault(key, float(f[2]))
    return calls


def deltas_ms(calls: dict[str, dict[str, float]], first: str, then: str) -> list[float]:
    return [1000 * (c[then] - c[first]) for c in calls.values() if first in c and then in c]


def sample_summary(values: list[float], source: str) -> dict[str, Any]:
    """p50/p90/p99/max (nearest rank), the exact fractions within 1, 5 and 10 ms, and a
    101-point CDF (the 0th to 100th percentile) for the plot."""
    return {"source": source, "count": len(values), **summary(values, 3),
            "mean_ms": round(sum(values) / len(values), 3) if values else None,
            "within_ms": {f"{b:g}": (round(sum(1 for v in values if v <= b) / len(values), 5)
                                     if values else None) for b in (1, 5, 10)},
            "cdf_ms": [round(pct(values, q) or 0.0, 3) for q in range(101)] if values else []}


def sipp_stats(path: Path) -> dict[str, Any]:
    """The cumulative counters of SIPp's last statistics line."""
    if not path.exists():
        return {}
    lines = [x for x in path.read_text(errors="replace").splitlines() if x.strip()]
    if len(lines) < 2:
        return {}
    head, last = lines[0].split(";"), lines[-1].split(";")
    row = dict(zip(head, last, strict=False))
    out: dict[str, Any] = {}
    for key, value in row.items():
        if key.endswith("(C)") or key in ("TotalCallCreated", "CurrentCall"):
            try:
                out[key.removesuffix("(C)")] = int(value)
            except ValueError:
                continue
    return out


# --- the scenario --------------------------------------------------------------------------


def connect_spread(lg: LoadGen, devices: int, *, spread: float, concurrency: int,
                   timeout: float) -> dict[str, Any]:
    """Connect devices [0, devices) in 10 slices started `spread`/10 s apart (each at most
    `concurrency` handshakes in flight per worker), so that their heartbeats, which follow
    each device's welcome, are spread over the interval as phones' would be, instead of
    coming in one burst every heartbeat."""
    slices = 10 if spread > 0 and devices >= 10 else 1
    began = time.monotonic()
    out = {"devices": 0, "welcomed": 0, "not_welcomed": 0, "last_error": ""}
    for k in range(1, slices + 1):
        time.sleep(max(0.0, began + (k - 1) * spread / slices - time.monotonic()))
        r = lg.connect(devices * k // slices, first=devices * (k - 1) // slices,
                       concurrency=concurrency,
                       timeout=max(5.0, began + spread + timeout - time.monotonic()))
        for key in ("devices", "welcomed", "not_welcomed"):
            out[key] += r[key]
        out["last_error"] = out["last_error"] or r["last_error"]
    return out


def call(target: CallTarget, *, devices: int, callees: int, calls: int, rate: float,
         workers: int, baseline: float = 10.0, settle: float = 2.0, concurrency: int = 32,
         spread: float = 10.0, connect_timeout: float = 150,
         quiet_wait: float = 30) -> dict[str, Any]:
    began = time.monotonic()
    top, note = cap_devices(devices + callees)
    devices = max(0, top - callees) if devices + callees > top else devices
    users = [f"user{i}" for i in range(callees)]
    result: dict[str, Any] = {
        **result_head("call", target),
        "settings": {"idle_devices": devices, "callees": callees, "calls": calls,
                     "rate_per_s": rate, "workers": workers, "callee_workers": 1,
                     "baseline_s": baseline, "settle_s": settle, "connect_spread_s": spread,
                     "concurrency_per_worker": concurrency, "cpus": host.CPU_PLAN},
        "fd_limit_note": note, "complete": False}
    with running(target, result, quiet_wait):
        meter = target.meter
        with LoadGen(workers) as lg, LoadGen(1) as phones:
            t0, cpu0 = time.monotonic(), meter.cpu_seconds()
            if devices:
                lg.setup(target, devices)
                r = connect_spread(lg, devices, spread=spread, concurrency=concurrency,
                                   timeout=connect_timeout)
            else:
                r = {"devices": 0, "welcomed": 0, "not_welcomed": 0, "last_error": ""}
            phones.setup(target, callees, assertions=[target.assertion(u) for u in users])
            p = phones.connect(callees, concurrency=concurrency, timeout=60)
            bound = phones.stats()["counts"].get("welcomed_as_user", 0)
            result["connect"] = {
                "idle_welcomed": r["welcomed"], "idle_not_welcomed": r["not_welcomed"],
                "callees_welcomed": p["welcomed"], "callees_bound_to_user": bound,
                "seconds": round(time.monotonic() - t0, 2),
                "server_cpu_ms_per_connect": round(
                    1000 * (meter.cpu_seconds() - cpu0) / max(1, r["welcomed"] + p["welcomed"]),
                    3),
                "last_error": r["last_error"] or p["last_error"]}
            print(f"connected {r['welcomed']}/{devices} idle devices and {p['welcomed']}/"
                  f"{callees} callees ({bound} bound to their user) in "
                  f"{result['connect']['seconds']} s", flush=True)
            if bound < callees or p["not_welcomed"]:
                why = ", ".join(sorted(set(p["final"]))) or p["last_error"]
                result["stopped_early"] = (f"only {bound} of {callees} callees welcomed as "
                                           f"their user ({why})")
                print(result["stopped_early"], flush=True)
                return result
            if r["not_welcomed"]:
                result["note"] = (f"{r['not_welcomed']} of {devices} idle devices were not "
                                  f"welcomed ({r['last_error']}); the calls ran anyway")
            time.sleep(settle)
            target.alive()
            result["connected_at_start"] = target.connected()
            idle0, ph0 = lg.stats(), phones.stats()

            # the gateway at idle (heartbeats only), to tell the calls' CPU apart
            c0, w0 = meter.cpu_seconds(), time.monotonic()
            time.sleep(baseline)
            c1, w1 = meter.cpu_seconds(), time.monotonic()
            idle_rate = (c1 - c0) / max(1e-9, w1 - w0)

            before = target.metrics()
            background = Background(target.pids() + lg.pids + phones.pids)
            c2, w2 = meter.cpu_seconds(), time.monotonic()
            print(f"SIPp: {calls} calls at {rate:g}/s to {callees} users", flush=True)
            sipp = run_sipp(target, users, calls, rate, target.tmp / "sipp")
            c3, w3 = meter.cpu_seconds(), time.monotonic()
            others = round(max(0.0, background.cores() - sipp["cpu_s"] / max(1e-9, w3 - w2)), 2)
            time.sleep(0.5)  # the last call_ended pushes and their acks
            target.alive()
            after = target.metrics()
            result["connected_at_end"] = target.connected()
            idle1, ph1 = lg.stats(), phones.stats()
            result["rss_kib"] = meter.rss_kib()

            push = hist_delta(histogram(after, PUSH), histogram(before, PUSH))
            ring = hist_delta(histogram(after, RINGING), histogram(before, RINGING))
            stats = sipp["stats"]
            placed = stats.get("OutgoingCall", stats.get("TotalCallCreated"))
            result["calls"] = {
                "placed": placed,
                "answered_180": sum(1 for c in sipp["calls"].values() if "180" in c),
                "successful": stats.get("SuccessfulCall"),
                "failed": stats.get("FailedCall"),
                "retransmissions": stats.get("Retransmissions"),
                "failed_by_kind": {k: v for k, v in stats.items()
                                   if k.startswith("Failed") and k != "FailedCall" and v},
                "gateway_invites_pushed": push["count"],
                "gateway_180s_sent": ring["count"],
                "callee_pushes_received": ph1["pushes"] - ph0["pushes"],
                "sipp_exit_code": sipp["exit_code"], "sipp_exit": sipp["exit_meaning"],
                "sipp_seconds": sipp["wall_s"],
            }
            result["latency"] = {
                "invite_to_push": describe_hist(
                    push, f"gateway histogram {PUSH}: INVITE read -> incoming-call frames "
                          "written; percentiles interpolated within buckets"),
                "invite_to_ringing": describe_hist(
                    ring, f"gateway histogram {RINGING}: INVITE read -> 180 sent (a device "
                          "acked the call push); percentiles interpolated within buckets"),
                "sipp_invite_to_180": sample_summary(
                    deltas_ms(sipp["calls"], "INVITE", "180"),
                    "SIPp: INVITE sent -> 180 received, each message's time from its "
                    "message trace (-trace_shortmsg, gettimeofday, µs)"),
                "sipp_invite_to_100": sample_summary(
                    deltas_ms(sipp["calls"], "INVITE", "100"),
                    "SIPp: INVITE sent -> 100 Trying received (message trace)"),
                "sipp_cancel_to_487": sample_summary(
                    deltas_ms(sipp["calls"], "CANCEL", "487"),
                    "SIPp: CANCEL sent -> 487 received (message trace)"),
                "sipp_rtd_invite_to_180": rtd_summary(sipp["rtd_ms"]),
            }
            busy = (c3 - c2) / max(1e-9, w3 - w2)
            result["gateway_cpu"] = {
                "call_phase_s": round(c3 - c2, 3), "call_phase_wall_s": round(w3 - w2, 2),
                "busy_percent": round(100 * busy, 1),
                "idle_baseline_percent": round(100 * idle_rate, 1),
                "ms_per_call_above_idle": round(
                    1000 * max(0.0, (c3 - c2) - idle_rate * (w3 - w2)) / max(1, placed or 0), 3),
            }
            result["devices"] = {
                "idle_held_at_start": idle0["connected"], "idle_held_at_end": idle1["connected"],
                "callees_held_at_end": ph1["connected"],
                "drops_during_calls": (idle1["counts"].get("drops", 0)
                                       - idle0["counts"].get("drops", 0)
                                       + ph1["counts"].get("drops", 0)
                                       - ph0["counts"].get("drops", 0)),
            }
            result["other_load_cores"] = others
            result["loadgen_cpu_s"] = round(idle1["cpu_seconds"] + ph1["cpu_seconds"], 2)
            result["sipp"] = {k: sipp[k] for k in ("command", "cpu_s", "errors_head",
                                                   "log_tail")}
            result["sipp"]["stats"] = stats
            result["targets"] = verdicts(result)
            if sipp["exit_code"] != 0 or result["calls"]["answered_180"] != calls:
                result["calls_incomplete"] = (
                    f"SIPp: {sipp['exit_meaning']} (exit {sipp['exit_code']}); "
                    f"{result['calls']['answered_180']}/{calls} calls got 180")
            print(headline(result), flush=True)
            target.stop()  # before the devices go: QUIC teardown of N at once is slow
        result["complete"] = not (result.get("stopped_early") or result.get("calls_incomplete"))
    result["seconds"] = round(time.monotonic() - began, 1)
    return result


def verdicts(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with the exact fraction within it (the buckets sit on the thresholds)."""
    n = r.get("connected_at_start") or 0
    hists = {PUSH: r["latency"]["invite_to_push"], RINGING: r["latency"]["invite_to_ringing"]}
    all_rang = r["calls"]["answered_180"] == r["settings"]["calls"]
    out = []
    for name, q, bound, what in TARGETS:
        h = hists[name]
        frac = h["within_ms"].get(_ms(bound))
        ok = frac is not None and frac >= q / 100 and all_rang
        at = min(n, r["connected_at_end"] or 0)
        measured = (f"{100 * frac:.2f}% within {_ms(bound)} ms (p{q} ≈ "
                    f"{_f(h[f'p{q}_ms'], 2)} ms) at {at:,} connected"
                    if frac is not None else "no calls measured")
        if ok and at < TARGET_DEVICES:
            met = f"latency met, but at {at:,} < {TARGET_DEVICES:,} devices"
        else:
            met = "met" if ok else "not met"
        out.append({"target": f"{what} at {TARGET_DEVICES:,} connected", "measured": measured,
                    "fraction_within": frac, "met": met})
    return out


def headline(r: dict[str, Any]) -> str:
    lat, c = r["latency"], r["calls"]
    a, b, s = lat["invite_to_push"], lat["invite_to_ringing"], lat["sipp_invite_to_180"]
    return (f"call {r['transport']}: {r['connected_at_start']} connected; {c['placed']} calls "
            f"placed, {c['answered_180']} got 180, {c['failed']} failed (SIPp exit "
            f"{c['sipp_exit_code']}); INVITE->push p50/p90/p99 {a['p50_ms']}/{a['p90_ms']}/"
            f"{a['p99_ms']} ms ({_pct(a['within_ms'].get('1'))} ≤ 1 ms, "
            f"{_pct(a['within_ms'].get('5'))} ≤ 5 ms); INVITE->180 {b['p50_ms']}/{b['p90_ms']}/"
            f"{b['p99_ms']} ms ({_pct(b['within_ms'].get('10'))} ≤ 10 ms); SIPp INVITE->180 "
            f"{s['p50']}/{s['p90']}/{s['p99']} ms; gateway CPU "
            f"{r['gateway_cpu']['busy_percent']}% (idle {r['gateway_cpu']['idle_baseline_percent']}"
            f"%); other load {r['other_load_cores']} cores")


def _pct(frac: float | None) -> str:
    return "-" if frac is None else f"{100 * frac:.1f}%"


def _f(value: Any, digits: int = 1) -> str:
    return report._f(value, digits)


# --- files -----------------------------------------------------------------------------------


def markdown(r: dict[str, Any]) -> str:
    lines = [f"# call: lpgw {r['transport'].upper()}", "",
             f"Machine: {report.machine_line(r)}", ""]
    s = r["settings"]
    lines += [f"{_f(s['idle_devices'])} idle devices + {_f(s['callees'])} callees "
              f"({r['transport'].upper()}, heartbeat {r['target']['heartbeat']:g} s, store "
              f"synchronous {r['target']['config']['store']['synchronous']}); SIPp "
              f"{_f(s['calls'])} calls at {s['rate_per_s']:g}/s over UDP, each INVITE -> 180 "
              f"-> CANCEL -> 487 -> ACK; other load {r.get('other_load_cores', '-')} cores.", ""]
    for key in ("fd_limit_note", "note", "stopped_early", "calls_incomplete"):
        if r.get(key):
            lines += [f"{key.replace('_', ' ').capitalize()}: {r[key]}", ""]
    if "latency" not in r:
        return "\n".join(lines)
    lat = r["latency"]
    lines += ["| from -> to (measured by) | calls | p50 ms | p90 ms | p99 ms | mean ms | "
              "≤ 1 ms | ≤ 5 ms | ≤ 10 ms |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, h in (("INVITE read -> incoming-call frame written (gateway)",
                      lat["invite_to_push"]),
                     ("INVITE read -> 180 sent (gateway)", lat["invite_to_ringing"])):
        w = h["within_ms"]
        lines.append(f"| {label} | {_f(h['count'])} | {_f(h['p50_ms'], 2)} | "
                     f"{_f(h['p90_ms'], 2)} | {_f(h['p99_ms'], 2)} | {_f(h['mean_ms'], 2)} | "
                     f"{_pct(w.get('1'))} | {_pct(w.get('5'))} | {_pct(w.get('10'))} |")
    for label, x in (("INVITE sent -> 100 Trying received (SIPp)", lat["sipp_invite_to_100"]),
                     ("INVITE sent -> 180 received (SIPp)", lat["sipp_invite_to_180"]),
                     ("CANCEL sent -> 487 received (SIPp)", lat["sipp_cancel_to_487"])):
        w = x["within_ms"]
        lines.append(f"| {label} | {_f(x['count'])} | {_f(x['p50'], 2)} | {_f(x['p90'], 2)} | "
                     f"{_f(x['p99'], 2)} | {_f(x['mean_ms'], 2)} | {_pct(w.get('1'))} | "
                     f"{_pct(w.get('5'))} | {_pct(w.get('10'))} |")
    lines += ["", "The gateway's percentiles are interpolated within their histogram "
              "bucket (estimates); its fractions ≤ 1, 5 and 10 ms are exact (bucket bounds). "
              "SIPp's are exact over every call, from the time SIPp sent or read each message "
              "(its message trace, µs).", ""]
    lines += ["| target | measured | |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | **{t['met']}** |" for t in r["targets"]]
    c, g, d = r["calls"], r["gateway_cpu"], r["devices"]
    lines += ["", "| calls placed | got 180 | completed | failed | SIPp exit | retransmissions | "
              "call pushes at the callees | connected at start / end | idle devices dropped | "
              "gateway CPU % (idle before) | CPU ms per call above idle | gateway RSS MiB |",
              "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
              f"| {_f(c['placed'])} | {_f(c['answered_180'])} | {_f(c['successful'])} | "
              f"{_f(c['failed'])} | {c['sipp_exit_code']} ({c['sipp_exit']}) | "
              f"{_f(c['retransmissions'])} | {_f(c['callee_pushes_received'])} | "
              f"{_f(r['connected_at_start'])} / {_f(r['connected_at_end'])} | "
              f"{_f(d['drops_during_calls'])} | {_f(g['busy_percent'])} "
              f"({_f(g['idle_baseline_percent'])}) | {_f(g['ms_per_call_above_idle'], 3)} | "
              f"{_f(r['rss_kib'] / 1024)} |", ""]
    if c["failed_by_kind"]:
        lines += ["Failed calls by kind (SIPp): " + ", ".join(
            f"{k} {v}" for k, v in c["failed_by_kind"].items()), ""]
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> bool:
    plt = report.pyplot()
    if plt is None:
        return False
    lat = r["latency"]
    hists = [(lat[key], label) for key, label in (
        ("invite_to_push", "INVITE read -> call frame written (gateway)"),
        ("invite_to_ringing", "INVITE read -> 180 sent (gateway)")) if lat[key]["count"]]
    sipp = lat["sipp_invite_to_180"]["cdf_ms"]
    # show up to twice the bound where every series is complete (at least 20 ms)
    complete = [next(float(le) for le, n in h["buckets_ms"] if n >= h["count"])
                if h["buckets_ms"][-2][1] >= h["count"] else float(h["buckets_ms"][-2][0])
                for h, _ in hists] + ([sipp[-1]] if sipp else [])
    top = max([20.0, *complete])
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.5))
    for h, label in hists:
        pts = [(float(le), 100 * n / h["count"]) for le, n in h["buckets_ms"] if le != "+Inf"]
        a.plot(*zip(*pts, strict=True), "o-", label=label)
    if sipp:
        a.plot(sipp, range(len(sipp)), "-", label="INVITE sent -> 180 received (SIPp)")
    for ms in (1, 5, 10):
        a.axvline(ms, ls=":", c="grey")
    a.set_xscale("log")
    a.set_xlim(0.3, top * 2)
    a.set(title=f"call setup at {r['connected_at_start']:,} connected "
                f"({r['transport'].upper()}, {r['calls']['placed']} calls)",
          xlabel="ms (dotted: the 1, 5 and 10 ms targets)", ylabel="% of calls within")
    a.set_ylim(0, 101)
    a.grid(alpha=0.3)
    a.legend(fontsize=8, loc="lower right")
    # calls per bucket, both histograms on the union of their bounds up to `top`
    bounds = sorted({float(le) for h, _ in hists for le, _ in h["buckets_ms"]
                     if le != "+Inf" and float(le) <= top})
    width = 0.4
    for k, (h, label) in enumerate(hists):
        per = [0] * (len(bounds) + 1)
        below = 0
        for le, n in h["buckets_ms"]:
            x = float(le) if le != "+Inf" else math.inf
            per[next((i for i, bound in enumerate(bounds) if x <= bound), len(bounds))] += \
                n - below
            below = n
        b.bar([i + (k - 0.5) * width for i in range(len(per))], per, width,
              label=label.split(" (")[0])
    b.set_xticks(range(len(bounds) + 1), [f"≤{x:g}" for x in bounds] + [f">{bounds[-1]:g}"],
                 rotation=60, fontsize=7)
    b.set(title="gateway histograms: calls per bucket (upper bound, ms)", ylabel="calls")
    b.grid(alpha=0.3, axis="y")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def main() -> None:
    p = argparse.ArgumentParser(description="call setup latency: SIPp calls at a steady rate "
                                            "while N devices are connected")
    p.add_argument("--transport", choices=("tls", "quic"), default="tls",
                   help="the devices' transport (idle devices and callees)")
    p.add_argument("--devices", default="10k", help="idle devices connected (e.g. 2k, 10000)")
    p.add_argument("--callees", type=int, default=50,
                   help="devices bound to user0..userK-1, the ones SIPp calls")
    p.add_argument("--calls", type=int, default=1000, help="calls SIPp places")
    p.add_argument("--rate", type=float, default=50, help="calls per second")
    p.add_argument("--heartbeat", type=float, default=10.0, help="protocol.heartbeat, s")
    p.add_argument("--synchronous", choices=("FULL", "NORMAL"), default="FULL",
                   help="the gateway's store.synchronous")
    p.add_argument("--baseline", type=float, default=None,
                   help="seconds of the gateway's idle CPU read before the calls "
                        "(default: one heartbeat)")
    p.add_argument("--connect-spread", type=float, default=None,
                   help="connect the idle devices in 10 slices over this many seconds, so "
                        "their heartbeats are spread as phones' would be (default: one "
                        "heartbeat; 0: all at once)")
    p.add_argument("--settle", type=float, default=2.0, help="pause after connecting, s")
    p.add_argument("--workers", type=int, default=0, help="load generator processes (idle)")
    p.add_argument("--concurrency", type=int, default=32,
                   help="handshakes in flight per worker while connecting")
    p.add_argument("--connect-timeout", type=float, default=150,
                   help="seconds for connecting the idle devices, at most")
    common_arguments(p, "the load generator and SIPp", quiet_wait=30)
    args = p.parse_args()
    if shutil.which("sipp") is None:
        raise SystemExit("needs SIPp (Debian package sip-tester)")
    if args.callees < 1 or args.calls < 1 or args.rate <= 0:
        raise SystemExit("--callees, --calls and --rate must be positive")

    plan_cpus(not args.no_pin)
    devices = parse_steps(args.devices)[0]
    workers = args.workers or default_workers(devices)
    with tempfile.TemporaryDirectory(prefix="lpgw-bench-") as tmp:
        target = CallTarget(args.transport, Path(tmp), heartbeat=args.heartbeat,
                            synchronous=args.synchronous)
        result = call(target, devices=devices, callees=args.callees, calls=args.calls,
                      rate=args.rate, workers=workers,
                      baseline=args.heartbeat if args.baseline is None else args.baseline,
                      spread=args.heartbeat if args.connect_spread is None
                      else args.connect_spread,
                      settle=args.settle, concurrency=args.concurrency,
                      connect_timeout=args.connect_timeout, quiet_wait=args.quiet_wait)
    if not args.no_report:
        report.save(result, args.out, plots=False, tag=args.tag, markdown_of=markdown,
                    plot=lambda r, path: "latency" in r and plot(r, path))
    print(json.dumps({k: result.get(k) for k in ("scenario", "transport", "connected_at_start",
                                                 "connected_at_end", "calls", "targets",
                                                 "complete", "stopped_early",
                                                 "calls_incomplete")}), flush=True)
    if not result["complete"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
