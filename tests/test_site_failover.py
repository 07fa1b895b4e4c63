"""A site survives the loss of a gateway (issue 17, point 5): three gateway processes on a
real 3-node NATS cluster (loopback), phones spread over them; one gateway is SIGKILLed
while pushes flow. Its phones move to the others with the same tokens, and every push
answered 200 anywhere reaches its phone.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time

import pytest

from gateway.endpoints import SiteLocator
from gateway.service import free_port
from tests.conftest import GatewayProcess, eventually, send
from tests.test_cluster import site_config, site_key

HEARTBEAT = 1.0  # protocol.heartbeat here: a QUIC phone hears silence after 3 of them


@pytest.fixture
def site_processes(nats_cluster, tmp_path):
    """Gateways of one new site as processes of their own (stopped by pid)."""
    made: list[GatewayProcess] = []
    name = "f" + str(random.randrange(1 << 30))
    key = site_key(tmp_path / "site-key")

    def start(count: int) -> list[GatewayProcess]:
        for i in range(count):
            gw = GatewayProcess(tmp_path / f"gw{i}", free_port("127.0.0.1"), {
                "name": f"gw{i}", "tls": key, "log": {"level": "warning"},
                "protocol": {"heartbeat": HEARTBEAT},
                "cluster": site_config(nats_cluster, name)})
            gw.start(timeout=40)
            made.append(gw)
        return made

    yield start
    for gw in made:
        gw.kill()


async def test_sigkill_of_a_gateway_loses_no_accepted_push(site_processes, devices):
    gateways = site_processes(3)
    handles = [gw.handle() for gw in gateways]
    endpoints = [("127.0.0.1", gw.runtime["port"]) for gw in gateways]
    phones = []
    for i in range(12):  # four a gateway, QUIC and TLS
        first = i % 3
        order = endpoints[first:] + endpoints[:first]
        phone = devices(handles[first], "quic" if i % 2 else "tls",
                        locate=SiteLocator(order, gateways[0].pin))
        phones.append(phone)
    tokens = [await p.welcome() for p in phones]
    assert len(set(tokens)) == 12
    victim, victims = gateways[0], [p for i, p in enumerate(phones) if i % 3 == 0]

    def moved() -> bool:
        return all(sum(1 for e in p.log if e["event"] == "welcome") >= 2 for p in victims)

    async def all_back() -> float:
        await eventually(moved, timeout=60, step=0.05)
        return time.monotonic()
    watching = asyncio.create_task(all_back())

    answered: dict[str, tuple[int, int]] = {}  # push id -> (phone index, gateway index)
    refused = 0
    killed_at = 0.0
    started = time.monotonic()
    for n in itertools.count():  # ~6 s of pushes, bounded
        if n >= 240 or time.monotonic() - started > 8:
            break
        if n == 80:
            victim.kill()
            killed_at = time.monotonic()
        phone = n % 12
        gw = n % 3 if not killed_at else 1 + n % 2
        try:
            reply = await asyncio.wait_for(send(handles[gw], tokens[phone], {"n": n}), 5)
        except (OSError, TimeoutError):
            refused += 1
            continue
        if reply["ok"]:
            answered[reply["push_id"]] = (phone, gw)
        else:
            assert reply["reason"] == "ServiceUnavailable", reply
            refused += 1
        await asyncio.sleep(0.02)
    assert killed_at and len(answered) > 150

    # every phone of the killed gateway is welcomed again, by another, with its token
    back = await asyncio.wait_for(watching, 45)
    print(f"\nfailover: the killed gateway's phones back after {back - killed_at:.1f} s; "
          f"{len(answered)} pushes answered 200, {refused} refused or unreachable")
    assert back - killed_at < 3 * HEARTBEAT + 5
    for p, token in zip(victims, tokens[::3], strict=True):
        welcomes = [e for e in p.log if e["event"] == "welcome"]
        assert {e["token"] for e in welcomes} == {token}

    # every push answered 200 reaches its phone (at least once)
    def delivered() -> set[str]:
        return {e["id"] for p in phones for e in p.log if e["event"] == "push"}
    await eventually(lambda: set(answered) <= delivered(), timeout=20, step=0.2)
    for push_id, (phone, _) in answered.items():
        assert push_id in {e["id"] for e in phones[phone].log if e["event"] == "push"}
