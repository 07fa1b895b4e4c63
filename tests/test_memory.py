"""An idle TLS device must cost the gateway at most 64 KB (asyncio's SSL transport: ~280 KB)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT


def test_idle_tls_device_costs_at_most_64_kb():
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "idle_memory.py"), "--transport", "tls",
         "--devices", "300", "--json"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == 300
    assert 0 < result["bytes_per_device"] <= 64 * 1000, result
