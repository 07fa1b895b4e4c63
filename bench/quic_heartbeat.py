"""What one QUIC heartbeat costs the gateway inside aioquic alone: the floor under idle CPU.

N gateway-side aioquic connections, each paired in memory with a client (no sockets, no
event loop, no lpgw session: the clock is passed in), handshaken with the gateway's own
QUIC configuration and handshake-state release. Then R rounds: for every pair, the gateway
sends its heartbeat (a PING frame, as lpgw does), the client acknowledges it, the gateway
takes the acknowledgement. Only the gateway side's calls are timed (send_ping,
datagrams_to_send, get_timer; receive_datagram, next_event, datagrams_to_send, get_timer:
what QuicConnectionProtocol does per packet). The real gateway adds its event loop,
the two system calls and the heartbeat timer on top (docs/performance.md compares).

    .venv/bin/python bench/quic_heartbeat.py --devices 500 --rounds 20
"""

from __future__ import annotations

import argparse
import json
import ssl
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from lib.host import RESULTS, git_state, machine, now_iso

from gateway import internals
from gateway.protocol import ALPN
from gateway.transport import quic

GATEWAY, PHONE = ("127.0.0.1", 4433), ("127.0.0.1", 50000)


def gateway_configuration(tmp: Path) -> QuicConfiguration:
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(tmp / "k.pem"),
                    "-out", str(tmp / "c.pem"), "-days", "1", "-subj", "/CN=lpgw-bench"],
                   check=True, capture_output=True)
    return quic.server_configuration(str(tmp / "c.pem"), str(tmp / "k.pem"), 45.0, 16384)


def connected_pair(server_config: QuicConfiguration, clock: list[float]
                   ) -> tuple[QuicConnection, QuicConnection]:
    """A handshaken client/gateway pair with the device's stream open, as after hello."""
    phone = QuicConnection(configuration=QuicConfiguration(
        is_client=True, alpn_protocols=[ALPN], verify_mode=ssl.CERT_NONE))
    phone.connect(GATEWAY, now=clock[0])
    gw = QuicConnection(configuration=server_config,
                        original_destination_connection_id=phone.original_destination_connection_id)
    stream = None
    for _ in range(10):
        if stream is None and phone._handshake_complete:
            stream = phone.get_next_available_stream_id()
            phone.send_stream_data(stream, b"hello")
        for data, _ in phone.datagrams_to_send(clock[0]):
            gw.receive_datagram(data, PHONE, clock[0])
        for data, _ in gw.datagrams_to_send(clock[0]):
            phone.receive_datagram(data, GATEWAY, clock[0])
        while gw.next_event() or phone.next_event():
            pass
        clock[0] += 0.001
    if stream is None or not internals.release_handshake_state(gw):
        raise RuntimeError("the in-memory handshake did not complete")
    return phone, gw


def heartbeat_round(pairs: list[tuple[QuicConnection, QuicConnection]], clock: list[float],
                    nonce: int) -> list[float]:
    """One heartbeat per pair; the gateway side's seconds for each."""
    spent = []
    for phone, gw in pairs:
        now = clock[0]
        t0 = time.perf_counter()
        gw.send_ping(nonce)
        out = gw.datagrams_to_send(now)
        gw.get_timer()
        t1 = time.perf_counter()
        for data, _ in out:
            phone.receive_datagram(data, GATEWAY, now)
        phone.handle_timer(now + 0.03)  # the phone's delayed ACK (max_ack_delay 25 ms)
        back = phone.datagrams_to_send(now + 0.03)
        while phone.next_event():
            pass
        t2 = time.perf_counter()
        for data, _ in back:
            gw.receive_datagram(data, PHONE, now + 0.03)
        while gw.next_event():
            pass
        gw.datagrams_to_send(now + 0.03)  # the protocol transmits after every packet
        gw.get_timer()
        t3 = time.perf_counter()
        spent.append((t1 - t0) + (t3 - t2))
    return spent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=500)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--heartbeat", type=float, default=10.0,
                   help="seconds between heartbeats, for the CPU figure at 10,000 devices")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    internals.offer_one_key_share()
    clock = [1000.0]
    with tempfile.TemporaryDirectory() as tmp:
        config = gateway_configuration(Path(tmp))
        pairs = [connected_pair(config, clock) for _ in range(args.devices)]
    samples: list[float] = []
    for r in range(args.rounds):
        clock[0] += args.heartbeat
        samples += heartbeat_round(pairs, clock, r)
    us = sorted(s * 1e6 for s in samples)
    median = statistics.median(us)
    at_10k = median * 1e-6 * 10000 / args.heartbeat * 100
    result = {"scenario": "quic_heartbeat", "when": now_iso(), "machine": machine(),
              "git": git_state(),
              "settings": {"devices": args.devices, "rounds": args.rounds,
                           "heartbeat_s": args.heartbeat},
              "gateway_us_per_heartbeat": {"p50": round(median, 1),
                                           "p90": round(us[int(len(us) * 0.9)], 1),
                                           "mean": round(statistics.fmean(us), 1)},
              "cpu_percent_at_10k": round(at_10k, 2)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quic-heartbeat.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"aioquic alone, gateway side: {median:.1f} us per heartbeat (p50 of {len(us)}), "
          f"p90 {result['gateway_us_per_heartbeat']['p90']} us; at 10,000 devices every "
          f"{args.heartbeat:g} s that is {at_10k:.1f}% of a core before any socket or loop")
    print(f"wrote {args.out / 'quic-heartbeat.json'}")


if __name__ == "__main__":
    main()
