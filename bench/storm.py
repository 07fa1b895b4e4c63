"""The reconnect storm: N devices that all come back at once, as after a Wi-Fi outage.

1. Start the gateway (`python -m gateway.cli run -c CFG`; discovery, SIP and the API off)
   and register N devices (a ramped connect: each gets its token), then disconnect them all.
2. For each storm size n (e.g. 1k, 2k, 5k, 10k): the first n devices all start connecting
   within `--spread` seconds (1 s); measure the time until every one is welcomed, the welcome
   latencies, and the gateway's CPU seconds (utime + stime from /proc/PID/stat) per handshake.
   Devices whose connection fails retry with backoff (counted); a device refused for good
   (a final `bye`, or no welcome by the deadline) is counted as such. Then disconnect all.
3. With `--pushes K`: queue K pushes for every device through the control socket (the
   `lpgw send` path) while they are away, storm again with all N, and wait until every
   queued push has reached its device (each device acks; duplicates are counted apart).

    .venv/bin/python bench/storm.py --transport tls --devices 1k,2k,5k,10k --pushes 1
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from lib import host
from lib.host import (
    Background,
    cap_devices,
    counters_delta,
    kernel_counters,
    plan_cpus,
)
from loadgen import (
    LoadGen,
    LpgwTarget,
    Target,
    common_arguments,
    default_workers,
    parse_steps,
    pct,
    result_head,
    running,
    summary,
)


class Sampler(threading.Thread):
    """The server's CPU seconds and RSS, every `every` s, while a storm runs."""

    def __init__(self, target: Target, every: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.meter = target.meter
        self.every = every
        self.samples: list[tuple[float, float, int]] = []
        self.halt = threading.Event()

    def sample(self) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            self.samples.append((time.monotonic(), self.meter.cpu_seconds(),
                                 self.meter.rss_kib()))

    def run(self) -> None:
        while not self.halt.wait(self.every):
            self.sample()

    def stop(self) -> None:
        self.halt.set()
        self.join(5)
        self.sample()

    def cpu_at(self, t: float) -> float:
        """Cumulative CPU seconds at monotonic time t (linear between samples)."""
        s = self.samples
        if t <= s[0][0]:
            return s[0][1]
        for (t0, c0, _), (t1, c1, _) in itertools.pairwise(s):
            if t0 <= t <= t1:
                return c0 + (c1 - c0) * (t - t0) / max(1e-9, t1 - t0)
        return s[-1][1]


def wait_disconnected(target: Target, timeout: float = 60) -> int | None:
    """Until the server says nobody is connected (or a short pause if it cannot say)."""
    deadline = time.monotonic() + timeout
    n = target.connected()
    if n is None:
        time.sleep(1.5)
        return None
    while n and time.monotonic() < deadline:
        time.sleep(0.25)
        n = target.connected()
    return n


def cdf(values: list[float], points: int = 101) -> list[float]:
    if not values:
        return []
    return [round(pct(values, 100 * i / (points - 1)) or values[0], 3) for i in range(points)]


def storm_round(lg: LoadGen, target: Target, n: int, *, pushes: int, tokens: list[str],
                spread: float, timeout: float) -> dict[str, Any]:
    queue = None
    if pushes:
        queue = target.queue_pushes([t for t in tokens if t], pushes)
        print(f"  queued {queue['queued']} pushes in {queue['seconds']} s", flush=True)
    sampler = Sampler(target)
    prepare = target.transport == "quic"  # first flights built before the start
    start_in = lg.prepare_time(n) if prepare else 0.5
    sampler.sample()
    sampler.start()
    t_call = time.monotonic()
    kc = kernel_counters()
    background = Background(target.pids() + lg.pids)
    r = lg.connect(n, start_in=start_in, spread=spread, concurrency=0, timeout=timeout,
                   expect_pushes=pushes, subscribe=target.kind == "mqtt", clean=False,
                   prepare=prepare)
    t_start = t_call + start_in  # the storm's common start (welcome times count from it)
    kernel = counters_delta(kc, kernel_counters())
    others = background.cores()
    time.sleep(0.5)
    sampler.stop()
    target.alive()
    all_welcomed = max(r["welcome_at"]) if r["welcome_at"] and not r["not_welcomed"] else None
    end = t_start + (all_welcomed if all_welcomed is not None else timeout)
    if pushes and r["delivered_at"]:
        end = max(end, t_start + max(r["delivered_at"]))
    cpu = sampler.cpu_at(end) - sampler.cpu_at(t_start - 0.05)
    welcomed_by_end = sampler.cpu_at(t_start + (all_welcomed or timeout)) \
        - sampler.cpu_at(t_start - 0.05)
    peak = max(rss for _, _, rss in sampler.samples)
    queued = queue["queued"] if queue else 0
    x = {
        "devices": r["devices"],
        "pushes_per_device": pushes,
        "pushes_queued": queued,
        "queue": queue,
        "welcomed": r["welcomed"],
        "all_welcomed_s": round(all_welcomed, 3) if all_welcomed is not None else None,
        "welcome_at": summary(r["welcome_at"]),
        "welcome_latency": summary(r["welcome_latency"]),
        "welcome_cdf": cdf(r["welcome_at"]),
        "all_delivered_s": (round(max(r["delivered_at"]), 3)
                            if pushes and len(r["delivered_at"]) == r["devices"] else None),
        "pushes_delivered": r["pushes"],
        "devices_with_all_pushes": len(r["delivered_at"]),
        "duplicates": r["counts"].get("duplicates", 0),
        "server_cpu_s": round(cpu, 3),
        "cpu_ms_per_handshake": round(1000 * welcomed_by_end / max(1, r["welcomed"]), 3),
        "cpu_ms_per_device_incl_pushes": round(1000 * cpu / max(1, r["welcomed"]), 3),
        "server_cpu_busy_percent": round(100 * cpu / max(1e-9, end - t_start), 1),
        "attempts": r["attempts"],
        "retried": r["retried"],
        "refused_for_good": len(r["final"]) + max(0, r["not_welcomed"] - len(r["final"])),
        "final_reasons": sorted(set(r["final"]))[:5],
        "not_welcomed": r["not_welcomed"],
        "counts": r["counts"],
        "last_error": r["last_error"],
        "peak_rss_kib": peak,
        "kernel_drops": kernel,
        "other_load_cores": others,
        "loadgen_cpu_s": round(r["cpu_seconds"], 2),
        "timeline": [(round(t - t_start, 2), round(c - sampler.samples[0][1], 2), rss)
                     for t, c, rss in sampler.samples[::5]],
    }
    print(f"storm {target.system}/{target.transport}: {x['devices']} devices"
          f"{f' with {pushes} queued push(es) each' if pushes else ''}: "
          f"{x['welcomed']} welcomed, all in {x['all_welcomed_s']} s "
          f"(p50 {x['welcome_at']['p50']} s, p99 {x['welcome_at']['p99']} s); "
          f"{x['cpu_ms_per_handshake']} ms server CPU per handshake, "
          f"{x['server_cpu_busy_percent']}% busy; retried {x['retried']}, refused "
          f"{x['refused_for_good']}; kernel {kernel}; other load {others} cores"
          + (f"; pushes {x['pushes_delivered']}/{queued} delivered, all by "
             f"{x['all_delivered_s']} s" if pushes else ""), flush=True)
    return x


def storm(target: Target, sizes: list[int], *, pushes: int, workers: int, spread: float = 1.0,
          timeout: float = 90, register_concurrency: int = 32, budget: float = 260,
          connect_timeout: float = 30.0, quiet_wait: float = 30,
          between: str = "close") -> dict[str, Any]:
    """`between` rounds: "close" (every device says bye and closes) or "restart" (the server
    is killed and started again on the same state, then the devices drop their side)."""
    began = time.monotonic()
    top, note = cap_devices(max(sizes))
    sizes = sorted({min(s, top) for s in sizes})
    result: dict[str, Any] = {
        **result_head("storm", target),
        "settings": {"sizes": sizes, "pushes_per_device": pushes, "spread_s": spread,
                     "timeout_s": timeout, "workers": workers,
                     "connect_timeout_s": connect_timeout,
                     "register_concurrency_per_worker": register_concurrency,
                     "between_rounds": between,
                     "cpus": host.CPU_PLAN},
        "fd_limit_note": note, "rounds": [], "complete": False}
    with running(target, result, quiet_wait):
        with LoadGen(workers) as lg:
            lg.setup(target, top, connect_timeout=connect_timeout)
            t0 = time.monotonic()
            cpu0 = target.meter.cpu_seconds()
            reg = lg.connect(top, concurrency=register_concurrency, timeout=min(150, budget / 2),
                             subscribe=target.kind == "mqtt", clean=False)
            result["register"] = {
                "devices": reg["devices"], "welcomed": reg["welcomed"],
                "seconds": round(time.monotonic() - t0, 2),
                "cpu_ms_per_connect": round(1000 * (target.meter.cpu_seconds() - cpu0)
                                            / max(1, reg["welcomed"]), 3)}
            print(f"registered {reg['welcomed']}/{reg['devices']} devices in "
                  f"{result['register']['seconds']} s", flush=True)
            tokens = reg["tokens"]
            plan = [(n, 0) for n in sizes] + ([(top, pushes)] if pushes else [])
            if reg["not_welcomed"]:
                result["stopped_early"] = (f"registration: {reg['not_welcomed']} of {top} "
                                           f"devices not welcomed in time ({reg['last_error']})")
                print(result["stopped_early"], flush=True)
                plan = []
            for n, k in plan:
                if between == "restart":
                    target.restart()
                    lg.close_all()
                else:
                    lg.close_all()
                    left = wait_disconnected(target)
                    if left:
                        raise RuntimeError(f"{left} devices still connected after closing all")
                elapsed = time.monotonic() - began
                prev = result["rounds"][-1] if result["rounds"] else None
                est = 20 + ((prev["all_welcomed_s"] or timeout) * n / max(1, prev["devices"])
                            if prev else 30)
                if elapsed + min(timeout, est) > budget:
                    result["stopped_early"] = f"time budget of {budget} s before n={n}"
                    print(result["stopped_early"], flush=True)
                    break
                result["rounds"].append(storm_round(
                    lg, target, n, pushes=k, tokens=tokens, spread=spread,
                    timeout=min(timeout, budget - elapsed - 10)))
            lg.close_all()
        result["complete"] = "stopped_early" not in result
    result["seconds"] = round(time.monotonic() - began, 1)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description="reconnect storm: time to welcome all, CPU per "
                                            "handshake, queued pushes delivered")
    p.add_argument("--transport", choices=("tls", "quic", "both"), default="both")
    p.add_argument("--devices", default="1000,2000,5000,10000",
                   help="storm sizes, comma-separated (the largest is also registered)")
    p.add_argument("--pushes", type=int, default=1,
                   help="pushes queued per device for the final storm (0: none)")
    p.add_argument("--spread", type=float, default=1.0, help="all devices start within this")
    p.add_argument("--timeout", type=float, default=90, help="seconds one storm may take")
    p.add_argument("--heartbeat", type=float, default=10.0)
    p.add_argument("--synchronous", choices=("FULL", "NORMAL"), default="FULL",
                   help="the gateway's store.synchronous")
    p.add_argument("--udp-rcvbuf", type=int, default=None, metavar="BYTES",
                   help="experiment: the gateway's listen.quic_receive_buffer (0: the "
                        "kernel's default; unset: the gateway's default)")
    p.add_argument("--quic-budget", default=None, metavar="RETRY_ABOVE,HALF_OPEN",
                   help="experiment: listen.quic_retry_above and quic_half_open_limit "
                        "(unset: the gateway's defaults, 64,256; 100000,100000: no Retry)")
    p.add_argument("--backlog", type=int, default=0,
                   help="experiment: run the gateway with this TCP listen backlog")
    p.add_argument("--between", choices=("auto", "close", "restart"), default="auto",
                   help="how devices go away before each storm: all close (TLS), or the "
                        "gateway is killed and restarted (QUIC, by default: aioquic's server "
                        "needs O(connections) work per closed connection, so 10k closing at "
                        "once keep it busy for minutes)")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--budget", type=float, default=260, help="seconds per transport, at most")
    common_arguments(p, "the load generator", quiet_wait=30)
    args = p.parse_args()
    import report

    plan_cpus(not args.no_pin)
    sizes = parse_steps(args.devices)
    workers = args.workers or default_workers(max(sizes))
    for transport in ("tls", "quic") if args.transport == "both" else (args.transport,):
        with tempfile.TemporaryDirectory(prefix="lpgw-bench-") as tmp:
            target = LpgwTarget(transport, Path(tmp), heartbeat=args.heartbeat,
                                synchronous=args.synchronous, udp_rcvbuf=args.udp_rcvbuf,
                                backlog=args.backlog, quic_budget=tuple(
                                    int(v) for v in args.quic_budget.split(","))
                                if args.quic_budget else None)
            result = storm(target, sizes, pushes=args.pushes, workers=workers,
                           spread=args.spread, timeout=args.timeout, budget=args.budget,
                           quiet_wait=args.quiet_wait,
                           between=args.between if args.between != "auto"
                           else ("restart" if transport == "quic" else "close"))
        if not args.no_report:
            report.save(result, args.out, tag=args.tag)
        print(json.dumps({"scenario": "storm", "transport": transport, "rounds": [
            {k: x[k] for k in ("devices", "pushes_queued", "welcomed", "all_welcomed_s",
                               "cpu_ms_per_handshake", "refused_for_good", "pushes_delivered")}
            for x in result["rounds"]]}), flush=True)


if __name__ == "__main__":
    main()
