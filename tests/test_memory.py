"""An idle TLS device must cost the gateway at most 64 KB (asyncio's SSL transport: ~280 KB)."""

from __future__ import annotations

import asyncio
import gc
import json
import subprocess
import sys
import weakref

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


async def test_after_many_quic_phones_leave_one_full_pass_frees_them(gateway, devices):
    """A closed QUIC connection is a reference cycle inside aioquic: freed only by a full
    GC pass. The gateway runs one when enough connections have ended since the last."""

    phones = [devices(gateway, "quic") for _ in range(3)]
    tokens = [await p.welcome() for p in phones]
    protocols = [weakref.ref(gateway.delivery._live[t].link._write.__self__) for t in tokens]
    gc.collect()
    gc.disable()
    try:
        assert not gateway.collect_if_many_left(at_least=1)  # nobody has left yet
        for p in phones[:2]:
            await p.stop()
        await eventually(lambda: sum(t in gateway.delivery._live for t in tokens) == 1)

        def forgotten() -> bool:  # aioquic lets go of a connection after its closing period
            held = set(map(id, gateway._quic._protocols.values()))
            return not any(id(ref()) in held for ref in protocols[:2])

        await eventually(forgotten)
        assert [ref() is None for ref in protocols] == [False, False, False]  # cycles
        assert not gateway.collect_if_many_left(at_least=3)  # 2 left: not enough
        assert gateway.collect_if_many_left(at_least=2)
        assert [ref() is None for ref in protocols] == [True, True, False]
        assert not gateway.collect_if_many_left(at_least=2)  # counted from the last pass
    finally:
        gc.enable()
