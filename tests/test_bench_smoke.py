"""The benchmarks still run: every scenario at a handful of devices (not a measurement).

bench/ measures; this only keeps its code working: the load generator's workers, lpgw over
TLS and QUIC (idle and storm with a queued push each), calls from SIPp to callee devices
among idle ones, the Mosquitto peer, and the report.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

BENCH = ROOT / "bench"
MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
SIPP = shutil.which("sipp")
QUICK = ["--quiet-wait", "0", "--no-pin"]


def run(script: str, *args: str, out: Path, timeout: float = 40) -> None:
    proc = subprocess.run([sys.executable, str(BENCH / script), *args, *QUICK, "--out", str(out)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def result(out: Path, name: str) -> dict:
    return json.loads((out / f"{name}.json").read_text())


def test_idle_both_transports(tmp_path):
    run("loadgen.py", "--transport", "both", "--devices", "4,8", "--window", "0.5",
        "--settle", "0.2", "--workers", "2", out=tmp_path)
    for transport in ("tls", "quic"):
        r = result(tmp_path, f"idle-lpgw-{transport}")
        assert r["complete"], r.get("stopped_early")
        assert [p["connected"] for p in r["points"]] == [4, 8]
        assert all(p["rss_kib"] > 0 for p in r["points"])
        assert r["machine"]["cores"] and r["git"]["head"]
    assert "lpgw TLS" in (tmp_path / "summary.md").read_text()


def test_storm_delivers_queued_pushes(tmp_path):
    run("storm.py", "--transport", "both", "--devices", "6", "--pushes", "1", "--timeout", "20",
        "--workers", "2", out=tmp_path)
    for transport in ("tls", "quic"):
        r = result(tmp_path, f"storm-lpgw-{transport}")
        assert r["complete"], r.get("stopped_early")
        plain, pushed = r["rounds"]
        assert plain["welcomed"] == 6 and plain["refused_for_good"] == 0
        assert pushed["pushes_queued"] == 6 and pushed["pushes_delivered"] == 6
        assert pushed["all_delivered_s"] is not None
        assert plain["cpu_ms_per_handshake"] > 0


@pytest.mark.skipif(SIPP is None, reason="needs Debian package sip-tester (SIPp)")
def test_call_rings(tmp_path):
    run("call.py", "--devices", "20", "--callees", "3", "--calls", "10", "--rate", "10",
        "--baseline", "0.5", "--connect-spread", "0", "--settle", "0.2", "--workers", "1",
        out=tmp_path)
    r = result(tmp_path, "call-lpgw-tls")
    assert r["complete"], r.get("stopped_early") or r.get("calls_incomplete")
    calls = r["calls"]
    assert calls["placed"] == calls["answered_180"] == calls["successful"] == 10
    assert calls["failed"] == 0 and calls["sipp_exit_code"] == 0
    assert calls["gateway_invites_pushed"] == calls["gateway_180s_sent"] == 10
    assert calls["callee_pushes_received"] == 20  # each call and its end, both acked
    assert r["connected_at_start"] == r["connected_at_end"] == 23
    assert r["latency"]["sipp_invite_to_180"]["count"] == 10
    assert r["gateway_cpu"]["call_phase_s"] > 0
    assert (tmp_path / "call-lpgw-tls.md").exists()
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "call-lpgw-tls.png").stat().st_size > 0


@pytest.mark.skipif(MOSQUITTO is None, reason="needs Debian package mosquitto")
def test_mosquitto_peer_and_report(tmp_path):
    run("peer_mosquitto.py", "--scenario", "both", "--devices", "6", "--pushes", "1",
        "--window", "0.5", "--settle", "0.2", "--timeout", "20", "--workers", "1",
        "--beside-lpgw", out=tmp_path, timeout=120)
    idle = result(tmp_path, "idle-mosquitto-tls")
    assert idle["points"][0]["connected"] == 6
    storm = result(tmp_path, "storm-mosquitto-tls")
    assert storm["rounds"][-1]["pushes_delivered"] == 6
    ours = result(tmp_path, "storm-lpgw-tls")
    assert ours["rounds"][-1]["pushes_delivered"] == 6
    assert ours["run"] == storm["run"] == idle["run"] == result(tmp_path, "idle-lpgw-tls")["run"]
    proc = subprocess.run([sys.executable, str(BENCH / "report.py"), "--results", str(tmp_path),
                           "--no-docs"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "summary.md").read_text()
    assert "Mosquitto" in text
    ratio = next(line for line in text.splitlines() if "measured on the same run" in line)
    assert f"(run {storm['run']})" in ratio and "not judged" not in ratio

    # a pair from two runs is shown but not judged
    ours["run"] = "another"
    (tmp_path / "storm-lpgw-tls.json").write_text(json.dumps(ours))
    subprocess.run([sys.executable, str(BENCH / "report.py"), "--results", str(tmp_path),
                    "--no-docs"], capture_output=True, text=True, timeout=60, cwd=ROOT, check=True)
    ratio = next(line for line in (tmp_path / "summary.md").read_text().splitlines()
                 if "measured on the same run" in line)
    assert "separate runs" in ratio and "not judged" in ratio


@pytest.mark.skipif(MOSQUITTO is None, reason="needs Debian package mosquitto")
def test_push_latency_beside_mosquitto(tmp_path):
    run("latency.py", "--devices", "12", "--pushes", "30", "--rate", "60", "--settle", "0.2",
        "--workers", "1", out=tmp_path, timeout=120)
    runs = set()
    for system, transport in (("lpgw", "tls"), ("lpgw", "quic"), ("mosquitto", "tls")):
        r = result(tmp_path, f"latency-{system}-{transport}")
        assert r["complete"], r.get("stopped_early")
        assert r["connected"] == 12
        assert r["accepted"] == r["delivered"] == 30 and r["lost"] == 0
        assert r["outcomes"] == {"ok": 30}
        d = r["delivery_ms"]
        assert 0 < d["p50"] <= d["p99"] <= d["max"] < 5000 and d["count"] == 30
        assert r["accept_ms"]["count"] == 30
        if system == "lpgw":  # read from its /metrics: every generation, counted
            for passes in (r["server_gc_while_publishing"], r["connect"]["server_gc"]):
                assert set(passes) == {"0", "1", "2"}, passes
                assert all(x["passes"] >= 0 and x["seconds"] >= 0 for x in passes.values())
        else:
            assert r["server_gc_while_publishing"] is None
        assert r["loadgen_gc_full_passes_while_publishing"] == 0
        assert r["loadgen_cpu_percent_while_publishing"] > 0
        runs.add(r["run"])
        if importlib.util.find_spec("matplotlib"):
            assert (tmp_path / f"latency-{system}-{transport}.png").stat().st_size > 0
    assert len(runs) == 1
    assert "write → device read" in (tmp_path / "summary.md").read_text()


@pytest.mark.skipif(shutil.which("h2load") is None, reason="needs h2load (nghttp2-client)")
def test_api_pushes_delivered(tmp_path):
    run("api_throughput.py", "--devices", "5", "--rates", "50,100", "--step-seconds", "1",
        "--warmup", "0.2", "--pause", "0.1", out=tmp_path)
    r = result(tmp_path, "api-lpgw-tls")
    assert r["complete"], r.get("stopped_early")
    assert [s["offered_per_s"] for s in r["steps"]] == [50, 100]
    assert all(s["accepted_200"] == s["pushes"] and not s["other_status"] for s in r["steps"])
    d = r["delivery"]
    assert d["all_delivered"] and d["received_by_devices"] == d["accepted_200"] >= 150
    assert d["acked_per_gateway"] == d["accepted_200"]
    assert r["steps"][0]["accept_ms"]["p99"] is not None and r["machine"]["cores"]
    assert r["target"]["config"]["store"]["synchronous"] == "FULL"
    assert (tmp_path / "api-lpgw-tls.md").exists()
    assert "API pushes" in (tmp_path / "summary.md").read_text()
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "api-lpgw-tls.png").stat().st_size > 0


def test_latency_refuses_an_unknown_system_by_name():
    proc = subprocess.run([sys.executable, str(BENCH / "latency.py"), "--systems",
                           "lpgw-tls,nats", *QUICK], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode != 0
    assert "--systems: unknown ['nats']" in proc.stderr


def test_bench_uses_the_products_code_and_no_path_tricks():
    """bench/ imports the gateway as installed and its own bench/lib (the script's folder
    is on the path when it runs): no sys.path or PYTHONPATH edits, and the helpers that
    existed twice (free_port, the open-file limit, the final bye reasons) are the
    product's, defined once."""
    import ast

    sources = sorted([*BENCH.glob("*.py"), *(BENCH / "lib").glob("*.py")])
    assert (BENCH / "lib" / "devices.py") in sources
    tricks, defined = [], []
    for path in sources:
        text = path.read_text()
        if "sys.path" in text or "PYTHONPATH" in text:
            tricks.append(path.name)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.Assign):
                names = ([node.name] if isinstance(node, ast.FunctionDef)
                         else [t.id for t in node.targets if isinstance(t, ast.Name)])
                defined += [f"{path.name}:{n}" for n in names
                            if n in ("free_port", "raise_open_files", "FINAL",
                                     "FINAL_REASONS")]
    assert tricks == [] and defined == []


def test_site_accept_runs(tmp_path):
    """The site benchmark: the R3 push stream on 3 nats-servers beside one SQLite box."""
    proc = subprocess.run([sys.executable, str(BENCH / "site_accept.py"), "--rate", "100",
                           "--seconds", "1", "--devices", "10", "--skip-default-sync",
                           "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = json.loads((tmp_path / "site-accept.json").read_text())["runs"]
    assert set(runs) == {"r3_sync_always", "one_box_sqlite_full"}
    for run in runs.values():
        assert run["accepted"] == 100 and run["failed"] == 0 and run["p99_ms"] > 0
