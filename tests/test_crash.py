"""SIGKILL while pushes flow: every push the gateway accepted is delivered, exactly as accepted."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from gateway.client import DeviceClient, DeviceOptions
from gateway.service import free_port
from gateway.transport import control
from tests.conftest import GatewayProcess

TOTAL = 150
KILL_AFTER = 60


@pytest.mark.parametrize("transport", ["tls", "quic"])
async def test_sigkill_loses_no_accepted_push(tmp_path, transport):
    gp = GatewayProcess(tmp_path / "state", free_port("127.0.0.1"),
                        {"protocol": {"heartbeat": 0.5, "heartbeat_misses": 2}})
    gp.start()
    received: dict[str, dict] = {}
    welcomed = asyncio.Event()
    token_box: list[str] = []
    log: list[dict] = []

    def emit(event: dict) -> None:
        if event["event"] != "push":
            log.append(event)
        if event["event"] == "welcome":
            token_box.append(event["token"])
            welcomed.set()
        elif event["event"] == "push":
            received.setdefault(event["id"], event["payload"])

    client = DeviceClient(DeviceOptions(host="127.0.0.1", port=gp.port, pin=gp.pin,
                                        transport=transport, backoff_min=0.05,
                                        backoff_max=0.3, state_file=tmp_path / "device.json"),
                          emit)
    device = asyncio.create_task(client.run())
    try:
        await asyncio.wait_for(welcomed.wait(), 10)
        token = token_box[0]
        socket_path = gp.state / "control.sock"
        accepted: dict[str, dict] = {}
        refused_while_down = 0
        killed = asyncio.Event()

        async def pusher() -> None:
            nonlocal refused_while_down
            i = 0
            while i < TOTAL:
                payload = {"i": i, "blob": os.urandom(16).hex(), "aps": {"alert": f"n{i}"}}
                try:
                    reply = await control.request(socket_path, {"op": "send", "token": token,
                                                                "payload": payload}, timeout=2)
                except (OSError, asyncio.IncompleteReadError, TimeoutError):
                    refused_while_down += 1
                    await asyncio.sleep(0.02)
                    continue  # not accepted: the gateway never said so
                assert reply["ok"], reply
                accepted[reply["push_id"]] = payload
                i += 1
                if i == KILL_AFTER:
                    killed.set()
                await asyncio.sleep(0.002)

        async def killer() -> None:
            await killed.wait()
            gp.kill(signal.SIGKILL)  # no chance to flush, close or say bye
            await asyncio.sleep(0.3)
            await asyncio.to_thread(gp.start)

        await asyncio.wait_for(asyncio.gather(pusher(), killer()), 60)
        assert refused_while_down > 0, "the kill happened while pushes were flowing"

        try:
            async with asyncio.timeout(30):
                while not set(accepted) <= set(received):
                    await asyncio.sleep(0.05)
        except TimeoutError:
            missing = len(set(accepted) - set(received))
            raise AssertionError(f"{missing} of {len(accepted)} accepted pushes never arrived;"
                                 f" device events: {log[-10:]}") from None
        for push_id, payload in accepted.items():
            assert received[push_id] == payload
        assert len(accepted) == TOTAL
    finally:
        client.stop()
        await asyncio.wait_for(device, 5)
        gp.kill(signal.SIGTERM)
