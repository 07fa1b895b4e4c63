"""Durable accepts for a site of gateways: the R3 push stream beside one box's SQLite.

What a push costs before its 200 can go out, measured at the storage layer the gateway
uses (no HTTP in front, so the figures compare the storages, not the API):

- **R3 stream** (`gateway.cluster.pushes.SitePushes.accept`): a 3-node nats-server 2.15
  cluster on loopback (`lib/natscluster.py`), with `sync_interval: always` (every write
  fsynced before JetStream acknowledges it: what a whole-site power cut needs) and, for
  comparison, with the server's default 2-minute sync;
- **one box** (`gateway.store.Store`, `synchronous: FULL`): group commit as the API does
  it, every push of one event-loop turn in one transaction and one fsync.

Pushes of `--size` bytes go to `--devices` devices round-robin at `--rate` per second for
`--seconds`, at most `--in-flight` at once; each accept is timed from its start to its
acknowledgement. Printed: achieved rate, p50/p90/p99, failures.

    .venv/bin/python bench/site_accept.py --rate 1000 --seconds 10

Bounded: each run stops after `--seconds` plus 30 s at most; the nats-servers it starts
are stopped by their pids, and their stores deleted, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from lib.host import RESULTS, git_state, machine, now_iso
from lib.natscluster import NatsCluster
from loadgen import pct

from gateway import config
from gateway.cluster.pushes import SitePushes
from gateway.cluster.site import join
from gateway.records import StoredPush
from gateway.store import Store

TOPIC = "com.example.bench"


async def offer(accept: Callable[[int], Awaitable[None]], rate: int, seconds: float,
                in_flight: int) -> dict:
    """`accept(n)` at `rate`/s for `seconds`, at most `in_flight` at once."""
    gate = asyncio.Semaphore(in_flight)
    latencies: list[float] = []
    failures = 0
    tasks: set[asyncio.Task] = set()

    async def one(n: int) -> None:
        nonlocal failures
        started = time.perf_counter()
        try:
            await asyncio.wait_for(accept(n), 10)
        except Exception:
            failures += 1
        else:
            latencies.append((time.perf_counter() - started) * 1000)
        finally:
            gate.release()

    begun = time.perf_counter()
    total = int(rate * seconds)
    for n in range(total):
        due = begun + n / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await gate.acquire()
        task = asyncio.create_task(one(n))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=30)
    span = time.perf_counter() - begun
    return {"offered_per_s": rate, "accepted": len(latencies), "failed": failures,
            "achieved_per_s": round(len(latencies) / span, 1),
            "p50_ms": _r(pct(latencies, 50)), "p90_ms": _r(pct(latencies, 90)),
            "p99_ms": _r(pct(latencies, 99))}


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 2)


async def stream_run(tmp: Path, sync: str | None, args: argparse.Namespace) -> dict:
    cluster = NatsCluster(tmp / f"nats-{sync or 'default'}")
    try:
        cluster.start(sync=sync)
        cfg = config.from_dict({"sip": {"enabled": False},  # no SIP port for a benchmark
                                "cluster": {"enabled": True, "site": "bench",
                                            "servers": cluster.urls}}).cluster
        site = await join(cfg, b"k" * 32, "sha256/bench")
        pushes = SitePushes(site.nc, site.js, "bench", replicas=3, queue_limit=256)
        await pushes.open(20)
        tokens = [uuid.uuid4().hex * 2 for _ in range(args.devices)]
        payload = json.dumps({"aps": {"alert": "x" * max(0, args.size - 20)}})

        async def accept(n: int) -> None:
            now = time.time()
            await pushes.accept(StoredPush(tokens[n % len(tokens)], 0, str(uuid.uuid4()),
                                           "alert", 10, int(now) + 3600, payload, None, now),
                                now)

        result = await offer(accept, args.rate, args.seconds, args.in_flight)
        await site.close()
        return result
    finally:
        cluster.stop()


async def sqlite_run(tmp: Path, args: argparse.Namespace) -> dict:
    store = Store(tmp / "box" / "lpgw.sqlite3", "FULL")
    tokens = [uuid.uuid4().hex * 2 for _ in range(args.devices)]
    for token in tokens:
        store.record_device(token, TOPIC, ("alert",), None, time.time())
    payload = json.dumps({"aps": {"alert": "x" * max(0, args.size - 20)}})
    waiting: list[asyncio.Future] = []
    loop = asyncio.get_running_loop()

    def commit() -> None:  # one fsync for what this turn of the loop accepted (as the API)
        group, waiting[:] = list(waiting), []
        try:
            store.commit()
        except Exception as exc:
            for f in group:
                f.set_exception(exc)
            return
        for f in group:
            f.set_result(None)

    async def accept(n: int) -> None:
        store.begin()
        store.accept_push(tokens[n % len(tokens)], str(uuid.uuid4()), "alert", 10,
                          int(time.time()) + 3600, None, payload, time.time(), 256)
        done = loop.create_future()
        if not waiting:
            loop.call_soon(commit)
        waiting.append(done)
        await done

    try:
        return await offer(accept, args.rate, args.seconds, args.in_flight)
    finally:
        store.close()


async def main(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="lpgw-site-accept-"))
    runs = {}
    try:
        runs["r3_sync_always"] = await stream_run(tmp, "always", args)
        if not args.skip_default_sync:
            runs["r3_sync_default"] = await stream_run(tmp, None, args)
        runs["one_box_sqlite_full"] = await sqlite_run(tmp, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {"scenario": "site_accept", "when": now_iso(), "machine": machine(),
              "git": git_state(), "size_bytes": args.size, "devices": args.devices,
              "in_flight": args.in_flight, "seconds": args.seconds, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "site-accept.json").write_text(json.dumps(result, indent=1) + "\n")
    for name, r in runs.items():
        print(f"{name:22} offered {r['offered_per_s']}/s achieved {r['achieved_per_s']}/s, "
              f"accept p50/p90/p99 {r['p50_ms']}/{r['p90_ms']}/{r['p99_ms']} ms, "
              f"{r['failed']} failed")
    print(f"wrote {args.out / 'site-accept.json'}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rate", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--in-flight", type=int, default=256)
    p.add_argument("--skip-default-sync", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS)
    asyncio.run(main(p.parse_args()))
