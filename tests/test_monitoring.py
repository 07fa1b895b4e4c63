"""What an IT team loads into its monitoring (issue 18, point 3): the alert rules
(contrib/prometheus, checked and unit-tested by promtool), the Grafana dashboard
(contrib/grafana, every query run by a real Prometheus scraping a real gateway), and the
series they rest on: counters at zero from the start, lpgw_build_info, process metrics,
and the state read at scrape time (certificate, disk, clock, self-test).
"""

from __future__ import annotations

import asyncio
import json
import runpy
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway import selftest
from gateway.service import free_port
from tests.conftest import ROOT, GatewayProcess, eventually, send

CONTRIB = ROOT / "contrib"
ALERTS = CONTRIB / "prometheus" / "lpgw-alerts.yml"
DASHBOARD = CONTRIB / "grafana" / "lpgw.json"


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} not installed (scripts/test installs Debian's prometheus)")
    return path


def test_the_alert_rules_pass_promtool_check_and_their_unit_tests():
    promtool = _need("promtool")
    checked = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 8 rules found" in checked.stdout
    tested = subprocess.run([promtool, "test", "rules", "lpgw-alerts.test.yml"],
                            capture_output=True, text=True, timeout=60,
                            cwd=ALERTS.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    names = {r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"]
             for r in g["rules"]}
    tests = yaml.safe_load((ALERTS.parent / "lpgw-alerts.test.yml").read_text())["tests"]
    covered = {t["alertname"] for case in tests for t in case["alert_rule_test"]
               if t["exp_alerts"]}
    assert covered == names  # every alert is seen firing in a unit test


def test_the_dashboard_json_is_its_script_s_output():
    built = runpy.run_path(str(CONTRIB / "grafana" / "build-dashboard.py"), run_name="tested")
    assert DASHBOARD.read_text() == built["text"]()


def _families(gw) -> dict[str, list]:
    from prometheus_client import generate_latest

    text = generate_latest(gw.metrics.exposed).decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


async def test_counters_exist_at_zero_and_the_gateway_says_what_it_is(gateway_factory,
                                                                    tmp_path):
    gw = await gateway_factory(tmp_path / "gw", sip={"enabled": True, "host": "127.0.0.1",
                                                     "port": 0})
    families = _families(gw)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for samples in families.values() for s in samples}
    for name, labels in [
            ("lpgw_pushes_accepted_total", {"push_type": "alert"}),
            ("lpgw_pushes_dropped_total", {"reason": "queue_full"}),
            ("lpgw_handshakes_total", {"transport": "quic", "result": "welcome"}),
            ("lpgw_call_actions_total", {"action": "decline"}),
            ("lpgw_sip_requests_total", {"method": "INVITE"}),
            ("lpgw_sip_call_answers_total", {"status": "480"}),
            ("lpgw_sip_auth_total", {"verdict": "bad"}),
            ("lpgw_cluster_not_kept_total", {"why": "timeout"})]:
        assert samples[(name, tuple(sorted(labels.items())))] == 0, (name, labels)
    from gateway import __version__
    assert samples[("lpgw_build_info", (("version", __version__),))] == 1
    assert samples[("process_resident_memory_bytes", ())] > 10 * 2**20
    expiry = samples[("lpgw_certificate_expiry_timestamp_seconds", ())]
    assert expiry > time.time() + 300 * 86400  # the self-signed one: years
    assert 0 < samples[("lpgw_state_disk_free_bytes", ())] <= \
        samples[("lpgw_state_disk_size_bytes", ())]
    # without systemd-timesyncd (this machine) the series is absent: unknown, not 0
    assert samples.get(("lpgw_clock_synchronised", ())) in (None, 0, 1)
    from gateway.gauges import clock_synchronised
    timesync = tmp_path / "timesync"
    assert clock_synchronised(timesync) is None
    timesync.mkdir()
    assert clock_synchronised(timesync) is False
    (timesync / "synchronized").touch()
    assert clock_synchronised(timesync) is True
    assert ("lpgw_selftest_ok", ()) not in samples  # no self-test has reported yet


def test_a_selftest_reports_to_the_gateway_it_checked(tmp_path):
    """`lpgw selftest` tells the gateway how it went: /metrics shows it (the alert on a
    failing self-test rests on it); a report that says it failed, and a malformed one."""
    import ssl

    gw = GatewayProcess(tmp_path / "state", free_port("127.0.0.1"))
    gw.start()
    try:
        tls = ssl.create_default_context(cafile=str(tmp_path / "state" / "gateway.crt"))
        control_path = Path(gw.runtime["control"])

        def metric(name: str) -> float | None:
            url = f"https://localhost:{gw.runtime['api_port']}/metrics"
            with urllib.request.urlopen(url, context=tls, timeout=5) as answer:
                text = answer.read().decode()
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name == name:
                        return sample.value
            return None

        assert metric("lpgw_selftest_ok") is None
        before = time.time()
        lines: list[str] = []
        code = selftest.run(str(gw.config_path), offline=False, as_json=True,
                            print_=lines.append)
        assert code == 0, lines
        assert metric("lpgw_selftest_ok") == 1
        assert metric("lpgw_selftest_last_run_timestamp_seconds") >= before
        reply = asyncio.run(_report(control_path, {"op": "selftest_report", "ok": False,
                                                   "failed": ["disk"]}))
        assert reply["ok"]
        assert metric("lpgw_selftest_ok") == 0
        bad = asyncio.run(_report(control_path, {"op": "selftest_report", "ok": "yes"}))
        assert not bad["ok"] and bad["reason"] == "BadRequest"
    finally:
        gw.kill(signal.SIGTERM)


async def _report(path: Path, message: dict) -> dict:
    from gateway.transport import control

    return await control.request(path, message)


async def test_prometheus_scrapes_a_gateway_and_every_dashboard_query_and_alert_works(
        gateway_factory, devices, tmp_path):
    """A real Prometheus (Debian's) scrapes a real gateway over HTTPS, trusting its
    certificate; every query of the dashboard runs without error, the main ones return
    series, and every alert rule evaluates without error."""
    prometheus = _need("prometheus")
    gw = await gateway_factory(tmp_path / "gw", api={"host": "127.0.0.1", "port": 0},
                               sip={"enabled": True, "host": "127.0.0.1", "port": 0})
    phone = devices(gw, "tls")
    token = await phone.welcome()
    assert (await send(gw, token, {"n": 1}))["ok"]
    await phone.next("push")

    port = free_port("127.0.0.1")
    conf = tmp_path / "prometheus.yml"
    conf.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{
            "job_name": "lpgw", "scheme": "https",
            "tls_config": {"ca_file": str(gw.config.cert_path), "server_name": "localhost"},
            "static_configs": [{"targets": [f"127.0.0.1:{gw.api_port}"]}]}]}))
    proc = subprocess.Popen([prometheus, f"--config.file={conf}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"

    def get(path: str, **params: str) -> dict:
        url = f"{base}{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=5) as answer:
            return json.loads(answer.read())

    def query(expr: str) -> list:
        answer = get("/api/v1/query", query=expr)
        assert answer["status"] == "success", (expr, answer)
        return answer["data"]["result"]

    def scraped() -> bool:
        try:
            up = query('up{job="lpgw"}')
        except OSError:
            return False
        return bool(up) and up[0]["value"][1] == "1"

    try:
        await eventually(scraped, timeout=30, step=0.5)
        for n in range(2, 5):  # something to take a rate of
            assert (await send(gw, token, {"n": n}))["ok"]
            await phone.next("push")
        await asyncio.sleep(3)  # a few scrapes more

        dashboard = json.loads(DASHBOARD.read_text())
        exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
        assert len(exprs) > 30
        results = {}
        for expr in exprs:
            real = expr.replace("$instance", ".*").replace("$__rate_interval", "1m")
            results[expr] = await asyncio.to_thread(query, real)

        def some(fragment: str) -> bool:
            return any(results[e] for e in exprs if fragment in e)
        for fragment in ("lpgw_devices_connected", "lpgw_pushes_accepted_total",
                         "lpgw_pushes_delivered_total", "lpgw_delivery_latency_seconds",
                         "lpgw_handshakes_total", "lpgw_sip_call_answers_total",
                         "process_cpu_seconds_total", "lpgw_certificate_expiry",
                         "lpgw_state_disk_free_bytes", "lpgw_gc_pause_seconds_sum"):
            assert some(fragment), fragment
        delivered = await asyncio.to_thread(
            query, 'rate(lpgw_pushes_delivered_total{job="lpgw"}[1m])')
        assert float(delivered[0]["value"][1]) > 0
        instances = await asyncio.to_thread(get, "/api/v1/label/instance/values",
                                            **{"match[]": "lpgw_build_info"})
        assert instances["data"] == [f"127.0.0.1:{gw.api_port}"]

        async def evaluated() -> list:
            rules = (await asyncio.to_thread(get, "/api/v1/rules"))["data"]["groups"]
            return [r for g in rules for r in g["rules"] if r.get("lastEvaluation",
                    "0001").startswith("20")]
        await eventually(lambda: _all_evaluated(evaluated), timeout=10, step=0.5)
        rules = await evaluated()
        assert len(rules) == 8
        assert {r["health"] for r in rules} == {"ok"}, [r.get("lastError") for r in rules]
        assert not any(r["state"] == "firing" for r in rules)  # a healthy gateway
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


async def _all_evaluated(evaluated) -> bool:
    return len(await evaluated()) == 8
