"""The reference peer: Mosquitto (a persistent-connection push broker written in C).

The same idle and storm scenarios, the same harness, the same CPU placement and /proc
readings, against Mosquitto (Debian `mosquitto`) with one TLS 1.3 listener on a loopback
port, a self-signed P-256 certificate (the same kind of key lpgw makes), and MQTT 3.1.1
clients driven by the load generator over the same TlsStream as lpgw's TLS devices:

- a device is CONNECT (persistent session: clean session 0, keepalive 1.5 x heartbeat) +
  SUBSCRIBE to its own topic `bench/<client id>` at QoS 1; it is "welcomed" at SUBACK, and
  on a reconnect at CONNACK (the session, and so the subscription, is still there);
- the heartbeat is the client's PINGREQ every `--heartbeat` s (MQTT pings from the client;
  lpgw's gateway pings the device: the same traffic, the other way round);
- a queued push is a QoS 1 PUBLISH to an offline device's topic, from one publisher
  connection; the broker keeps it in the session and sends it on the reconnect; the
  device PUBACKs it.

Mosquitto runs with persistence off (lpgw fsyncs every push and every device record to
SQLite; Mosquitto keeps them in memory), so the broker does less work than the gateway.

With `--beside-lpgw`, each scenario first runs against lpgw over TLS with the same
settings, in the same run (the results share a run id): the way to take figures that are
compared, such as CPU per TLS handshake (bench/report.py judges that target only on a pair
from one run).

    .venv/bin/python bench/peer_mosquitto.py --scenario both --devices 1k,2k,5k,10k
    .venv/bin/python bench/peer_mosquitto.py --scenario storm --devices 1k,2k,5k,10k --beside-lpgw
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from lib.host import pin_server, plan_cpus
from lib.mqtt import (
    MqttDecoder,
    client_context,
    mqtt_connect,
    mqtt_publish,
)
from lib.payloads import STAMPED
from loadgen import (
    LpgwTarget,
    Target,
    common_arguments,
    default_workers,
    idle,
    parse_steps,
)
from storm import storm

from gateway import certs
from gateway.service import free_port


def mosquitto_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "?"
    first = (out.stdout or out.stderr).splitlines()
    return first[0].strip() if first else "?"


class MosquittoTarget(Target):
    system = "mosquitto"
    kind = "mqtt"

    def __init__(self, tmp: Path, heartbeat: float = 10.0, binary: str | None = None) -> None:
        super().__init__("tls", tmp, heartbeat)
        self.binary = binary or shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.conf = ""

    def start(self) -> None:
        self.port = free_port("127.0.0.1")
        cert, key = self.tmp / "broker.crt", self.tmp / "broker.key"
        certs.ensure_self_signed(cert, key, "mosquitto-bench")
        self.pin = "sha256/" + certs.spki_pin(certs.load_cert(cert))
        self.conf = "\n".join([
            "per_listener_settings false",
            "allow_anonymous true",
            "persistence false",
            "user root" if os.geteuid() == 0 else "",  # else it drops to 'mosquitto'

            "max_queued_messages 1000",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            f"listener {self.port} 127.0.0.1",
            f"certfile {cert}",
            f"keyfile {key}",
            "tls_version tlsv1.3",
            "",
        ])
        path = self.tmp / "mosquitto.conf"
        path.write_text(self.conf)
        out = self.log.open("w")
        self.proc = subprocess.Popen([self.binary, "-c", str(path)], stdout=out,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        out.close()
        pin_server(self.proc.pid)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            self.alive()
            try:
                with socket.create_connection((self.host, self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start listening within 20 s")

    def queue_pushes(self, addresses: list[str], per_device: int) -> dict[str, Any]:
        """K QoS 1 PUBLISHes to each device's topic from one connection, PUBACK each."""
        started = time.monotonic()
        n = asyncio.run(publish(self.host, self.port, addresses, per_device))
        took = time.monotonic() - started
        return {"queued": n, "seconds": round(took, 3),
                "per_second": round(n / took, 1) if took else None, "sent_at_once": 0}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "version": mosquitto_version(self.binary),
                "config": self.conf, "command": f"{self.binary} -c CONF"}


class MqttPublisher:
    """A publisher on Mosquitto: QoS 1 PUBLISH to the device's topic, PUBACK back (one
    connection; packet ids wrap at 65,535, so keep fewer than that unanswered)."""

    def __init__(self, host: str, port: int, client_id: str = "bench-publisher") -> None:
        self.host, self.port, self.client_id = host, port, client_id
        self.pending: dict[int, asyncio.Future] = {}
        self.next_id = 0

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.wait_for(asyncio.open_connection(
            self.host, self.port, ssl=client_context(None)), 10)
        self.decoder = MqttDecoder()
        connack = asyncio.get_running_loop().create_future()
        self.pending[0] = connack
        self.writer.write(mqtt_connect(self.client_id, 60, True))
        self.reading = asyncio.get_running_loop().create_task(self.read())
        await asyncio.wait_for(connack, 10)

    async def read(self) -> None:
        try:
            while data := await self.reader.read(65536):
                now = time.monotonic_ns()
                for first, body in self.decoder.feed(data):
                    kind = first >> 4
                    key = 0 if kind == 2 else int.from_bytes(body[:2], "big") if kind == 4 \
                        else None
                    fut = self.pending.pop(key, None) if key is not None else None
                    if fut is not None and not fut.done():
                        fut.set_result(now)
        finally:
            for fut in self.pending.values():
                if not fut.done():
                    fut.set_result(None)

    async def send(self, address: str, payload: bytes | None = None
                   ) -> tuple[int, int | None, str]:
        """One PUBLISH; returns (written at, PUBACK at: monotonic ns, outcome). Without a
        `payload` it is STAMPED, timed at the device."""
        self.next_id = self.next_id % 65535 + 1
        fut = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = fut
        stamp = time.monotonic_ns()
        self.writer.write(mqtt_publish(address, payload or (STAMPED % stamp).encode(),
                                       self.next_id))
        at = await fut
        return stamp, at, "ok" if at is not None else "connection closed"

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.write(b"\xe0\x00")  # DISCONNECT
            self.writer.close()
        self.reading.cancel()


async def publish(host: str, port: int, topics: list[str], per_topic: int,
                  window: int = 100, timeout: float = 120) -> int:
    """`per_topic` QoS 1 PUBLISHes to each topic, at most `window` unanswered; how many
    were PUBACKed."""
    publisher = MqttPublisher(host, port)
    await publisher.open()
    gate = asyncio.Semaphore(window)
    payload = json.dumps({"aps": {"alert": "bench"}}).encode()

    async def one(topic: str) -> bool:
        async with gate:
            return (await publisher.send(topic, payload))[2] == "ok"

    try:
        acked = await asyncio.wait_for(asyncio.gather(
            *(one(topic) for _ in range(per_topic) for topic in topics)), timeout)
    finally:
        await publisher.close()
    return sum(acked)


def main() -> None:
    p = argparse.ArgumentParser(description="idle and storm against Mosquitto over TLS")
    p.add_argument("--scenario", choices=("idle", "storm", "both"), default="both")
    p.add_argument("--devices", default="1000,2000,5000,10000",
                   help="idle steps and storm sizes, comma-separated")
    p.add_argument("--pushes", type=int, default=1, help="queued per device, final storm")
    p.add_argument("--window", type=float, default=20.0, help="idle seconds per step")
    p.add_argument("--heartbeat", type=float, default=10.0, help="PINGREQ interval, s")
    p.add_argument("--spread", type=float, default=1.0)
    p.add_argument("--timeout", type=float, default=90)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--budget", type=float, default=260, help="seconds per scenario, at most")
    p.add_argument("--settle", type=float, default=3.0, help="idle: pause after connecting")
    p.add_argument("--binary", default=None, help="mosquitto executable")
    p.add_argument("--beside-lpgw", action="store_true",
                   help="first run lpgw over TLS through the same scenario with the same "
                        "settings, in this run (its results replace lpgw's TLS ones): the "
                        "figures to compare, e.g. CPU per handshake")
    common_arguments(p, "the load generator", quiet_wait=30, tag=False)
    args = p.parse_args()
    import report

    binary = args.binary or shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).exists():
        raise SystemExit("mosquitto is not installed (Debian: apt-get install mosquitto)")
    plan_cpus(not args.no_pin)
    sizes = parse_steps(args.devices)
    workers = args.workers or default_workers(max(sizes))
    scenarios = ("idle", "storm") if args.scenario == "both" else (args.scenario,)
    systems = ("lpgw", "mosquitto") if args.beside_lpgw else ("mosquitto",)
    for scenario, system in itertools.product(scenarios, systems):
        with tempfile.TemporaryDirectory(prefix=f"lpgw-bench-{system}-") as tmp:
            target: Target = (MosquittoTarget(Path(tmp), heartbeat=args.heartbeat, binary=binary)
                              if system == "mosquitto"
                              else LpgwTarget("tls", Path(tmp), heartbeat=args.heartbeat))
            if scenario == "idle":
                result = idle(target, sizes, window=args.window, workers=workers,
                              budget=args.budget, settle=args.settle,
                              quiet_wait=args.quiet_wait)
            else:
                result = storm(target, sizes, pushes=args.pushes, workers=workers,
                               spread=args.spread, timeout=args.timeout, budget=args.budget,
                               quiet_wait=args.quiet_wait)
        if not args.no_report:
            report.save(result, args.out)


if __name__ == "__main__":
    main()
