"""A site of three gateways on three nats-servers, all on this machine (loopback).

Three parts, each printed beside what it is compared with:

- **latency**: the *latency* scenario (bench/latency.py) with the phones on gateway A and
  the app server on gateway B's HTTP/2 API, so every push crosses gateways: accepted by B
  only once the site's R3 stream has it (`sync_interval: always`), handed to A by its
  ordered consumer, written to the phone. Beside it, in the same run, Mosquitto (one
  broker, QoS 1, persistence off) and one lpgw box alone (SQLite FULL).
- **failover**: `--phones` reference devices (gateway.client, half QUIC, half TLS, each
  with the site's three gateways: endpoints.SiteLocator) spread over A, B and C with the
  default heartbeat; pushes are queued for A's phones, then A is SIGKILLed: how long
  until every one of its phones is welcomed by B or C, and until every push answered 200
  has reached its phone.
- **memory**: `--devices` devices registered through A (the load generator) and one push
  queued for each through B: RSS of each nats-server and each gateway.

    .venv/bin/python bench/site.py --parts latency,failover,memory

Bounded: every part has its own time budget; every process it starts (nats-servers,
gateways, Mosquitto, load generator workers) is stopped by its pid, also on failure.
Loopback only. Results: bench/results/site-*.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import latency as latency_bench
from api_throughput import ApiTarget
from lib.host import RESULTS, Proc, cap_devices, git_state, machine, now_iso, stop_process
from lib.natscluster import NatsCluster
from loadgen import LoadGen, default_workers
from peer_mosquitto import MosquittoTarget

from gateway import certs
from gateway.client import DeviceClient, DeviceOptions
from gateway.endpoints import SiteLocator
from gateway.service import free_port
from gateway.transport import control

ROOT = Path(__file__).resolve().parent.parent
SITE = "bench"


class SiteTarget(ApiTarget):
    """Gateway A (what the phones connect to) is this target's own process; B and C are
    started beside it, and the app server talks to B's API. One key pair for the site."""

    system = "lpgw-site"

    def __init__(self, transport: str, tmp: Path, heartbeat: float = 10.0) -> None:
        super().__init__(transport, tmp, heartbeat=heartbeat, synchronous="FULL")
        self.nats = NatsCluster(tmp / "nats")
        self.others: list[subprocess.Popen] = []
        self.runtimes: list[dict[str, Any]] = []
        self.site_key = {"cert": str(tmp / "site-cert.pem"), "key": str(tmp / "site-key.pem")}
        certs.ensure_self_signed(Path(self.site_key["cert"]), Path(self.site_key["key"]), "site")

    def make_config(self, state: Path) -> dict[str, Any]:
        config = super().make_config(state)
        config["tls"] = self.site_key
        config["listen"].update(tls=True, quic=True)  # the failover's phones use both
        config["cluster"] = {"enabled": True, "site": SITE, "servers": self.nats.urls,
                             "replicas": 3}
        return config

    def start(self) -> None:
        self.nats.start()
        super().start()  # A
        self.runtimes = [self.runtime]
        for name in ("b", "c"):
            self.runtimes.append(self._start_other(name))
        self.api_port = self.runtimes[1]["api_port"]  # the app server talks to B

    def _start_other(self, name: str) -> dict[str, Any]:
        state = self.tmp / f"state-{name}"
        config = self.make_config(state)
        config["listen"]["port"] = free_port("127.0.0.1")
        config["api"]["port"] = free_port("127.0.0.1")
        path = self.tmp / f"lpgw-{name}.yaml"
        path.write_text(json.dumps(config))
        log = (self.tmp / f"lpgw-{name}.log").open("w")
        proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "-c", str(path)],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        log.close()
        self.others.append(proc)
        runtime = state / "runtime.json"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"gateway {name} stopped: see {self.tmp}")
            if runtime.exists():
                with contextlib.suppress(ValueError):
                    return json.loads(runtime.read_text())
            time.sleep(0.05)
        raise RuntimeError(f"gateway {name} did not start within 60 s")

    def gateway_pids(self) -> list[int]:
        return [self.pid, *(p.pid for p in self.others)]

    def nats_pids(self) -> list[int]:
        return [n.proc.pid for n in self.nats.nodes if n.proc is not None]

    def pids(self) -> list[int]:
        return self.gateway_pids() + self.nats_pids()

    def stop(self) -> None:
        for proc in self.others:
            stop_process(proc)
        self.others = []
        super().stop()
        self.nats.stop()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "gateways": 3, "nats_servers": 3,
                "sync_interval": "always", "devices_on": "A", "api_of": "B"}


def rss_mib(pid: int) -> float:
    return round(Proc(pid).rss_kib() / 1024, 1)


# --- latency: a push to a phone on another gateway -------------------------------------


def part_latency(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    systems = [("lpgw-site", lambda d: SiteTarget("tls", d)),
               ("lpgw-box", lambda d: ApiTarget("tls", d)),
               ("mosquitto", lambda d: MosquittoTarget(d))]
    for name, make in systems:
        work = tmp / name
        work.mkdir()
        r = latency_bench.latency(make(work), args.devices, pushes=args.pushes,
                                  rate=args.rate, workers=default_workers(args.devices),
                                  quiet_wait=args.quiet_wait)
        out[name] = {k: r.get(k) for k in ("accepted", "delivered", "lost", "outcomes",
                                            "delivery_ms", "accept_ms", "achieved_per_s",
                                            "server_cpu_percent", "rss_kib", "complete")}
        d, a = r.get("delivery_ms", {}), r.get("accept_ms", {})
        print(f"{name:>10}: delivery p50 {d.get('p50')} p99 {d.get('p99')} ms, accept p50 "
              f"{a.get('p50')} p99 {a.get('p99')} ms, {r.get('delivered')}/{args.pushes} "
              f"delivered", flush=True)
    return out


# --- failover: SIGKILL of a gateway holding a third of the phones --------------------------


async def failover(target: SiteTarget, phones: int, queued_per_phone: int,
                   budget: float) -> dict[str, Any]:
    endpoints = [("127.0.0.1", rt["port"]) for rt in target.runtimes]
    controls = [Path(rt["control"]) for rt in target.runtimes]
    events: list[list[dict]] = [[] for _ in range(phones)]
    clients = []
    for i in range(phones):
        first = i % 3
        order = endpoints[first:] + endpoints[:first]
        opts = DeviceOptions(host=order[0][0], port=order[0][1], pin=target.pin,
                             transport="quic" if i % 2 else "tls", backoff_min=0.5,
                             backoff_max=5.0, locate=SiteLocator(order, target.pin))
        clients.append(DeviceClient(opts, events[i].append))
    tasks = [asyncio.create_task(c.run()) for c in clients]
    try:
        start = time.monotonic()
        while sum(1 for e in events if any(x["event"] == "welcome" for x in e)) < phones:
            if time.monotonic() - start > 120:
                raise RuntimeError("the phones did not all connect within 120 s")
            await asyncio.sleep(0.2)
        connect_s = time.monotonic() - start
        tokens = [next(x["token"] for x in e if x["event"] == "welcome") for e in events]
        victims = [i for i in range(phones) if i % 3 == 0]
        assert target.proc is not None
        target.proc.kill()  # SIGKILL of gateway A
        killed = time.monotonic()
        answered: dict[str, int] = {}
        refused: dict[str, int] = {}
        for n in range(queued_per_phone):  # pushes for A's phones, through B, while away
            for i in victims:
                reply = await control.request(controls[1 + n % 2], {
                    "op": "send", "token": tokens[i], "payload": {"n": n}})
                if reply.get("ok"):
                    answered[reply["push_id"]] = i
                else:
                    why = f"{reply.get('reason', '?')} from {'BC'[n % 2]}"
                    refused[why] = refused.get(why, 0) + 1
        queued_s = time.monotonic() - killed
        back_at: float | None = None
        delivered_at: float | None = None
        while time.monotonic() - killed < budget:
            if back_at is None and all(
                    sum(1 for x in events[i] if x["event"] == "welcome") >= 2 for i in victims):
                back_at = time.monotonic()
            got = {x["id"] for e in events for x in e if x["event"] == "push"}
            if back_at is not None and set(answered) <= got:
                delivered_at = time.monotonic()
                break
            await asyncio.sleep(0.1)
        welcomes = [i for i in victims if _second_welcome(events[i]) is not None]
        return {"phones": phones, "victims": len(victims), "connect_s": round(connect_s, 1),
                "pushes_answered_200": len(answered), "refused": refused,
                "queued_in_s": round(queued_s, 1),
                "all_back_s": None if back_at is None else round(back_at - killed, 1),
                "all_delivered_s": None if delivered_at is None
                else round(delivered_at - killed, 1),
                "moved_to": _moved_to(events, victims, endpoints),
                "lost": len(set(answered) - {x["id"] for e in events for x in e
                                              if x["event"] == "push"}),
                "welcomes_seen": len(welcomes)}
    finally:
        for c in clients:
            c.stop()
        await asyncio.gather(*tasks, return_exceptions=True)


def _second_welcome(events: list[dict]) -> dict | None:
    welcomes = [x for x in events if x["event"] == "welcome"]
    return welcomes[1] if len(welcomes) > 1 else None


def _moved_to(events: list[list[dict]], victims: list[int],
              endpoints: list[tuple[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for i in victims:
        located = [x for x in events[i] if x["event"] == "located"]
        if located:
            port = located[-1]["port"]
            name = "BC"[[p for _, p in endpoints].index(port) - 1] if port != endpoints[0][1] \
                else "A"
            out[name] = out.get(name, 0) + 1
    return out


def part_failover(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    (tmp / "failover").mkdir()
    target = SiteTarget("tls", tmp / "failover")
    target.start()
    try:
        r = asyncio.run(failover(target, args.phones, args.queued, budget=90))
    finally:
        target.stop()
    print(f"  failover: {r['victims']} of {r['phones']} phones on the killed gateway back "
          f"after {r['all_back_s']} s, all {r['pushes_answered_200']} pushes answered 200 "
          f"delivered after {r['all_delivered_s']} s, {r['lost']} lost; moved to "
          f"{r['moved_to']}", flush=True)
    return r


# --- memory at 10,000 devices and 10,000 queued pushes -----------------------------------


def part_memory(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    work = tmp / "memory"
    work.mkdir()
    target = SiteTarget("tls", work)
    devices, note = cap_devices(args.devices)
    target.start()
    try:
        with LoadGen(default_workers(devices)) as lg:
            lg.setup(target, devices)
            r = lg.connect(devices, concurrency=32, subscribe=False, clean=False,
                           timeout=300)
            tokens = [t for t in r["tokens"] if t]
            lg.close_all()
        time.sleep(2)
        target.control = Path(target.runtimes[1]["control"])  # queue through B
        queued = target.queue_pushes(tokens, 1)
        time.sleep(6)  # a look at the stream's health, the gateways' alive writes
        result = {"devices": len(tokens), "queued": queued, "fd_limit_note": note,
                  "nats_rss_mib": [rss_mib(p) for p in target.nats_pids()],
                  "gateway_rss_mib": [rss_mib(p) for p in target.gateway_pids()]}
    finally:
        target.stop()
    print(f"    memory: {result['devices']} devices, {result['queued']} queued: nats-server "
          f"RSS {result['nats_rss_mib']} MiB, gateways {result['gateway_rss_mib']} MiB",
          flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="latency,failover,memory")
    p.add_argument("--devices", type=int, default=1000, help="latency: connected phones")
    p.add_argument("--pushes", type=int, default=2000)
    p.add_argument("--rate", type=float, default=100)
    p.add_argument("--phones", type=int, default=1000, help="failover: reference devices")
    p.add_argument("--queued", type=int, default=2, help="failover: pushes per killed "
                   "gateway's phone, sent while it is away")
    p.add_argument("--memory-devices", dest="mem_devices", type=int, default=10000)
    p.add_argument("--quiet-wait", type=float, default=20)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    random.seed(7)
    result: dict[str, Any] = {"scenario": "site", "when": now_iso(), "machine": machine(),
                              "git": git_state(), "settings": vars(args) | {"out": None}}
    tmp = Path(tempfile.mkdtemp(prefix="lpgw-site-"))
    try:
        for part in args.parts.split(","):
            if part == "latency":
                result["latency"] = part_latency(tmp, args)
            elif part == "failover":
                result["failover"] = part_failover(tmp, args)
            elif part == "memory":
                args.devices = args.mem_devices
                result["memory"] = part_memory(tmp, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "site.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine", "git")},
                     default=str)[:3000])


if __name__ == "__main__":
    main()
