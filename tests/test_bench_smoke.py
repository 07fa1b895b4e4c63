"""The benchmarks still run: every scenario at a handful of devices (not a measurement).

bench/ measures; this only keeps its code working: the load generator's workers, lpgw over
TLS and QUIC (idle and storm with a queued push each), the Mosquitto peer, and the report.
"""

from __future__ import annotations

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


@pytest.mark.skipif(MOSQUITTO is None, reason="needs Debian package mosquitto")
def test_mosquitto_peer_and_report(tmp_path):
    run("peer_mosquitto.py", "--scenario", "both", "--devices", "6", "--pushes", "1",
        "--window", "0.5", "--settle", "0.2", "--timeout", "20", "--workers", "1",
        out=tmp_path)
    idle = result(tmp_path, "idle-mosquitto-tls")
    assert idle["points"][0]["connected"] == 6
    storm = result(tmp_path, "storm-mosquitto-tls")
    assert storm["rounds"][-1]["pushes_delivered"] == 6
    proc = subprocess.run([sys.executable, str(BENCH / "report.py"), "--results", str(tmp_path),
                           "--no-docs"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "Mosquitto" in (tmp_path / "summary.md").read_text()
