#!/usr/bin/env python3
# ruff: noqa: E501 (one PromQL query per line reads best)
"""Writes contrib/grafana/lpgw.json, the Grafana dashboard for lpgw (import it in Grafana:
Dashboards -> New -> Import, and pick a Prometheus data source). Edit the panels here,
not in the JSON: tests/test_monitoring.py checks that the JSON is this script's output and
runs every query against a real Prometheus scraping a real gateway."""

import json
from pathlib import Path

panels = []
y = 0
def row(title):
    global y
    panels.append({"type": "row", "title": title, "collapsed": False,
                   "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "id": len(panels) + 1, "panels": []})
    y += 1
def ts(title, targets, unit="short", x=0, w=12, h=8, desc=""):
    global y
    panels.append({
        "type": "timeseries", "title": title, "id": len(panels) + 1, "description": desc,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": h, "w": w, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"},
                    "tooltip": {"mode": "multi"}},
        "targets": [{"refId": chr(65 + i), "expr": e, "legendFormat": legend,
                     "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                    for i, (e, legend) in enumerate(targets)]})
def stat(title, expr, unit="short", x=0, w=4, desc=""):
    panels.append({
        "type": "stat", "title": title, "id": len(panels) + 1, "description": desc,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 4, "w": w, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "value"},
        "targets": [{"refId": "A", "expr": expr,
                     "datasource": {"type": "prometheus", "uid": "${datasource}"}}]})
SEL = '{instance=~"$instance"}'
row("Health")
stat("Up", 'up{job="lpgw", instance=~"$instance"}', x=0)
stat("Devices connected", f"sum(lpgw_devices_connected{SEL})", x=4)
stat("Self-test", f"lpgw_selftest_ok{SEL}", x=8, desc="1: the last lpgw selftest passed")
stat("Certificate expires in", f"lpgw_certificate_expiry_timestamp_seconds{SEL} - time()", unit="s", x=12)
stat("State disk free", f"lpgw_state_disk_free_bytes{SEL} / lpgw_state_disk_size_bytes{SEL}", unit="percentunit", x=16)
stat("Clock synchronised", f"lpgw_clock_synchronised{SEL}", x=20)
y += 4
row("Devices")
ts("Devices connected", [(f"sum by (transport) (lpgw_devices_connected{SEL})", "{{transport}}")], x=0)
ts("Handshakes", [(f"sum by (result) (rate(lpgw_handshakes_total{SEL}[$__rate_interval]))", "{{result}}")], unit="ops", x=12)
y += 8
ts("Disconnects", [(f"sum by (reason) (rate(lpgw_disconnects_total{SEL}[$__rate_interval]))", "{{reason}}")], unit="ops", x=0)
ts("Heartbeat timeouts and slow readers", [
    (f"rate(lpgw_heartbeat_timeouts_total{SEL}[$__rate_interval])", "heartbeat timeouts"),
    (f"sum by (transport) (rate(lpgw_slow_readers_total{SEL}[$__rate_interval]))", "slow readers {{transport}}")], unit="ops", x=12)
y += 8
row("Pushes")
ts("Push rates", [
    (f"sum(rate(lpgw_pushes_accepted_total{SEL}[$__rate_interval]))", "accepted"),
    (f"rate(lpgw_pushes_delivered_total{SEL}[$__rate_interval])", "delivered"),
    (f"rate(lpgw_pushes_expired_total{SEL}[$__rate_interval])", "expired"),
    (f"sum by (reason) (rate(lpgw_pushes_dropped_total{SEL}[$__rate_interval]))", "dropped {{reason}}"),
    (f"sum by (reason) (rate(lpgw_pushes_rejected_total{SEL}[$__rate_interval]))", "rejected {{reason}}")], unit="ops", x=0)
ts("Delivery latency (accepted to acknowledged)", [
    (f"histogram_quantile(0.5, sum by (le) (rate(lpgw_delivery_latency_seconds_bucket{SEL}[$__rate_interval])))", "p50"),
    (f"histogram_quantile(0.99, sum by (le) (rate(lpgw_delivery_latency_seconds_bucket{SEL}[$__rate_interval])))", "p99")], unit="s", x=12)
y += 8
row("Calls")
ts("SIP requests", [(f"sum by (method) (rate(lpgw_sip_requests_total{SEL}[$__rate_interval]))", "{{method}}")], unit="ops", x=0)
ts("Call outcomes (answers to the PBX)", [(f"sum by (status) (rate(lpgw_sip_call_answers_total{SEL}[$__rate_interval]))", "{{status}}")], unit="ops", x=12,
   desc="180 a phone rings; 603 declined; 486 busy; 480 no phone reached; 487 cancelled; 503 the site could not keep the call")
y += 8
ts("INVITE to 180 Ringing", [
    (f"histogram_quantile(0.5, sum by (le) (rate(lpgw_sip_invite_to_ringing_seconds_bucket{SEL}[$__rate_interval])))", "p50"),
    (f"histogram_quantile(0.99, sum by (le) (rate(lpgw_sip_invite_to_ringing_seconds_bucket{SEL}[$__rate_interval])))", "p99")], unit="s", x=0)
ts("PBX registrations", [(f"lpgw_sip_registration_up{SEL}", "{{user}}"), (f"lpgw_sip_pbx_reachable{SEL}", "PBX reachable")], x=12)
y += 8
row("Errors")
ts("Errors", [
    (f"sum by (where) (rate(lpgw_internal_errors_total{SEL}[$__rate_interval]))", "internal {{where}}"),
    (f"sum by (reason) (rate(lpgw_api_errors_total{SEL}[$__rate_interval]))", "api {{reason}}"),
    (f"sum by (code) (rate(lpgw_protocol_errors_total{SEL}[$__rate_interval]))", "device {{code}}"),
    (f"sum by (kind) (rate(lpgw_sip_errors_total{SEL}[$__rate_interval]))", "sip {{kind}}"),
    (f"sum by (what) (rate(lpgw_storage_failures_total{SEL}[$__rate_interval]))", "storage {{what}}")], unit="ops", x=0)
ts("Site (several gateways)", [
    (f"lpgw_cluster_keeps_waiting{SEL}", "pushes waiting for the quorum"),
    (f"sum by (why) (rate(lpgw_cluster_not_kept_total{SEL}[$__rate_interval]))", "not kept: {{why}}"),
    (f"lpgw_cluster_stream_replicas_current{SEL}", "stream replicas current")], x=12)
y += 8
row("Process")
ts("GC pauses", [
    (f"sum by (generation) (rate(lpgw_gc_pause_seconds_sum{SEL}[$__rate_interval]))", "gen {{generation}} (s/s)"),
    (f"histogram_quantile(0.99, sum by (le) (rate(lpgw_gc_pause_seconds_bucket{SEL}[$__rate_interval])))", "p99 pause")], unit="s", x=0)
ts("CPU and memory", [
    (f"rate(process_cpu_seconds_total{SEL}[$__rate_interval])", "CPU (cores)"),
    (f"process_resident_memory_bytes{SEL} / 2^30", "RSS (GiB)")], x=12)
y += 8
dash = {
    "__inputs": [{"name": "DS_PROMETHEUS", "label": "Prometheus", "type": "datasource",
                  "pluginId": "prometheus", "pluginName": "Prometheus"}],
    "title": "lpgw", "uid": "lpgw", "tags": ["lpgw"], "timezone": "browser",
    "schemaVersion": 39, "version": 1, "refresh": "30s", "editable": True,
    "time": {"from": "now-6h", "to": "now"},
    "description": "lpgw gateways: devices, pushes, calls, errors (contrib/grafana/README.md)",
    "templating": {"list": [
        {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source"},
        {"name": "instance", "type": "query", "label": "Gateway", "multi": True, "includeAll": True,
         "datasource": {"type": "prometheus", "uid": "${datasource}"},
         "query": {"query": 'label_values(lpgw_build_info, instance)', "refId": "instance"},
         "definition": 'label_values(lpgw_build_info, instance)', "refresh": 2, "allValue": ".*"}]},
    "panels": panels}
OUT = Path(__file__).resolve().parent / "lpgw.json"


def text() -> str:
    return json.dumps(dash, indent=1) + "\n"


if __name__ == "__main__":
    OUT.write_text(text())
    print(f"{OUT}: {len(panels)} panels")
