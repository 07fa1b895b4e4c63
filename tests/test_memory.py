"""An idle TLS device must cost the gateway at most 64 KB (asyncio's SSL transport: ~280 KB)."""

from __future__ import annotations

import asyncio
import gc
import json
import subprocess
import sys
import weakref

from aioquic.quic.connection import QuicConnection

from gateway.transport.link import GatewayLink
from gateway.transport.quic import QuicDeviceProtocol
from tests.conftest import ROOT, eventually


def test_idle_tls_device_costs_at_most_64_kb():
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "idle_memory.py"), "--transport", "tls",
         "--devices", "300", "--json"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == 300
    assert 0 < result["bytes_per_device"] <= 64 * 1000, result


async def test_a_closed_tls_connection_is_freed_without_the_cycle_collector(gateway, devices):
    """Link and stream hold each other's methods; they let go at the end, so a phone that
    leaves is freed at once: full GC passes are rare (service.tune_garbage_collector), and
    with the link/stream cycle a TLS storm after a mass disconnect peaked at 1.1 GiB
    instead of 0.56."""

    device = devices(gateway, "tls")
    token = await device.welcome()
    link = gateway.delivery._live[token].link
    stream = link._write.__self__
    gone = [weakref.ref(link), weakref.ref(stream), weakref.ref(link.session)]
    del link, stream
    gc.collect()
    gc.disable()
    try:
        await device.stop()
        await eventually(lambda: token not in gateway.delivery._live)
        await asyncio.sleep(0.1)
        assert [ref() is None for ref in gone] == [True, True, True]
    finally:
        gc.enable()


async def test_a_quic_phone_that_leaves_is_freed_without_the_cycle_collector(gateway, devices):
    """aioquic's connection is a knot of reference cycles: freed only by a full GC pass,
    which stops the gateway ~0.5-1 s at 10,000 QUIC phones. The gateway unties it when the
    connection ends (quic.release_closed_connection), so reference counting frees the
    phone's protocol, connection, link and session as soon as aioquic lets go."""

    phones = [devices(gateway, "quic") for _ in range(3)]
    tokens = [await p.welcome() for p in phones]
    links = [gateway.delivery._live[t].link for t in tokens]
    protocols = [link._write.__self__ for link in links]
    refs = [[weakref.ref(x) for x in (p, p._quic, link, link.session)]
            for p, link in zip(protocols, links, strict=True)]
    del links, protocols
    gc.collect()
    gc.disable()
    try:
        for p in phones[:2]:
            await p.stop()
        await eventually(lambda: sum(t in gateway.delivery._live for t in tokens) == 1)
        # aioquic keeps a connection through its closing period (3 probe timeouts)
        await eventually(lambda: all(r() is None for rs in refs[:2] for r in rs), timeout=10)
        assert all(r() is not None for r in refs[2])  # the one still connected
        # and nothing of the gateway's side is waiting for the collector (the test's own
        # phones, clients in this process, may be)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage
                if isinstance(o, QuicDeviceProtocol | GatewayLink)
                or (isinstance(o, QuicConnection)
                    and not getattr(getattr(o, "_configuration", None), "is_client", True))]
        assert left == []
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def test_every_gc_pass_is_timed_into_the_metrics_until_undone():
    from gateway.core.metrics import Metrics
    from gateway.service import watch_garbage_collector

    metrics = Metrics()
    count = "lpgw_gc_pause_seconds_count"
    unwatch = watch_garbage_collector(metrics)
    try:
        for generation in "012":  # all three on /metrics from the start
            assert metrics.registry.get_sample_value(count, {"generation": generation}) \
                is not None
        gc.collect()
        gc.collect(0)
        assert metrics.value(count, generation="2") == 1
        assert metrics.value(count, generation="0") >= 1
        assert metrics.value("lpgw_gc_pause_seconds_sum", generation="2") > 0
        exposed = metrics.registry.get_sample_value(
            "lpgw_gc_pause_seconds_bucket", {"generation": "2", "le": "+Inf"})
        assert exposed == 1
    finally:
        unwatch()
    gc.collect()
    assert metrics.value(count, generation="2") == 1  # undone: no longer counted
    unwatch()  # twice is harmless
