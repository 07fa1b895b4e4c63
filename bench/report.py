"""Results: one JSON and one Markdown table per run, a side-by-side summary, and plots.

Every scenario calls save(); this file's command line rebuilds the summary
(bench/results/summary.md), the plots (bench/results/*.png, with matplotlib) and the table
in docs/performance.md (between its `results:begin` and `results:end` markers) from the
JSON files present.

    .venv/bin/python bench/report.py                 # from bench/results/
    .venv/bin/python bench/report.py --results DIR --no-docs

Sizes are in KB of 1000 bytes (the targets' unit); RSS is VmRSS of the server process.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOCS = ROOT / "docs" / "performance.md"

# the targets for a 2-core x86 machine
TARGETS = {
    "idle_devices": 10_000,
    "rss_kb": {"tls": 32.0, "quic": 64.0},
    "idle_cpu_percent": 5.0,
    "storm_seconds": {"tls": 20.0, "quic": 40.0},
    "handshake_vs_mosquitto": 1.5,
    "api_per_s": 2000,  # durably accepted pushes per second, sustained ...
    "api_p99_ms": 50.0,  # ... with accept p99 at most this
}

LABELS = {("lpgw", "tls"): "lpgw TLS", ("lpgw", "quic"): "lpgw QUIC",
          ("mosquitto", "tls"): "Mosquitto TLS (MQTT)"}


def name_of(result: dict[str, Any]) -> str:
    tag = f"-{result['tag']}" if result.get("tag") else ""
    return f"{result['scenario']}-{result['system']}-{result['transport']}{tag}"


def save(result: dict[str, Any], out: Path = RESULTS, plots: bool = True, tag: str = "",
         markdown_of: Callable[[dict[str, Any]], str] | None = None,
         plot: Callable[[dict[str, Any], Path], bool] | None = None) -> Path:
    """Write <scenario>-<system>-<transport>[-tag].json and .md to `out` (and .png where the
    scenario draws its own), then the summary.

    Tagged results (experiments) are kept beside the main ones but stay out of the summary.
    """
    out.mkdir(parents=True, exist_ok=True)
    if tag:
        result["tag"] = tag
    name = name_of(result)
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{name}.md").write_text((markdown_of or markdown)(result))
    made = plot is not None and plot(result, out / f"{name}.png")
    build(out, plots=plots)
    print(f"wrote {path}, {name}.md{f' and {name}.png' if made else ''}", flush=True)
    return path


def load(out: Path) -> dict[str, dict[str, Any]]:
    found = {}
    for path in sorted(out.glob("*.json")):
        try:
            r = json.loads(path.read_text())
        except ValueError:
            continue
        if isinstance(r, dict) and not r.get("tag") \
                and r.get("scenario") in ("idle", "storm", "api", "call", "latency"):
            found[name_of(r)] = r
    return found


def _f(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def machine_line(r: dict[str, Any]) -> str:
    m, g = r["machine"], r.get("git", {})
    changes = g.get("gateway_changes") or []
    dirty = f", {len(changes)} uncommitted change(s) under gateway/" if changes else ""
    return (f"{m['cores']} cores, {m['cpu_model']}, {m['memory_mib']} MiB, Python "
            f"{m['python']}, {m['openssl']}, Linux {m['kernel']}, open files "
            f"{m['nofile']['soft']}; commit {g.get('head', '?')[:12]}{dirty}; {r['when']}")


def markdown(r: dict[str, Any]) -> str:
    title = f"{r['scenario']}: {LABELS.get((r['system'], r['transport']), r['system'])}"
    lines = [f"# {title}", "", f"Machine: {machine_line(r)}", ""]
    if r.get("fd_limit_note"):
        lines += [f"Note: {r['fd_limit_note']}", ""]
    if r.get("stopped_early"):
        lines += [f"Stopped early: {r['stopped_early']}", ""]
    if r["scenario"] == "idle":
        lines += ["| devices | held | server RSS MiB | RSS per device KB | idle CPU % | "
                  "heartbeats answered | ramp s | ramp CPU ms/connect | drops |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for p in r["points"]:
            lines.append(
                f"| {_f(p['devices'])} | {_f(p['connected'])} | {_f(p['rss_kib'] / 1024)} | "
                f"{_f(p['rss_per_device_bytes'] / 1000)} | {_f(p['idle_cpu_percent'], 2)} | "
                f"{_f(p.get('heartbeats_in_window'))} in {_f(p['idle_window_s'])} s | "
                f"{_f(p['ramp_seconds'], 2)} | {_f(p['ramp_cpu_ms_per_connect'], 3)} | "
                f"{_f(p['drops'])} |")
    else:
        reg = r.get("register", {})
        if reg:
            lines += [f"Registered {_f(reg.get('devices'))} devices in "
                      f"{_f(reg.get('seconds'), 1)} s (ramped).", ""]
        lines += ["| devices | queued pushes | welcomed | all welcomed s | welcome p50/p99 s | "
                  "all delivered s | server CPU s | CPU ms per handshake | server CPU busy % | "
                  "retried | refused for good | peak RSS MiB |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for x in r["rounds"]:
            q = x["welcome_at"]
            lines.append(
                f"| {_f(x['devices'])} | {_f(x['pushes_queued'])} | {_f(x['welcomed'])} | "
                f"{_f(x['all_welcomed_s'], 2)} | {_f(q['p50'], 2)} / {_f(q['p99'], 2)} | "
                f"{_f(x['all_delivered_s'], 2) if x['pushes_queued'] else '-'} | "
                f"{_f(x['server_cpu_s'], 2)} | {_f(x['cpu_ms_per_handshake'], 3)} | "
                f"{_f(x['server_cpu_busy_percent'], 0)} | {_f(x['retried'])} | "
                f"{_f(x['refused_for_good'])} | {_f(x['peak_rss_kib'] / 1024)} |")
        if any(x["pushes_queued"] for x in r["rounds"]):
            lines += ["", "Queued pushes: " + "; ".join(
                f"{_f(x['pushes_delivered'])}/{_f(x['pushes_queued'])} delivered "
                f"(queued in {_f(x['queue']['seconds'], 1)} s)"
                for x in r["rounds"] if x["pushes_queued"])]
    lines.append("")
    return "\n".join(lines)


# --- the side-by-side summary ----------------------------------------------------------------


def _top_idle(r: dict[str, Any] | None) -> dict[str, Any] | None:
    return max(r["points"], key=lambda p: p["devices"]) if r and r["points"] else None


def _handshake_round(r: dict[str, Any] | None) -> dict[str, Any] | None:
    """The largest storm without queued pushes: the CPU-per-handshake figure."""
    if not r:
        return None
    plain = [x for x in r["rounds"] if not x["pushes_queued"]]
    return max(plain, key=lambda x: x["devices"]) if plain else None


def _push_round(r: dict[str, Any] | None) -> dict[str, Any] | None:
    if not r:
        return None
    rounds = [x for x in r["rounds"] if x["pushes_queued"]]
    return max(rounds, key=lambda x: x["devices"]) if rounds else None


def verdicts(res: dict[str, dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(target, measured, met?) for each target of the issue."""
    out = []
    mq = _handshake_round(res.get("storm-mosquitto-tls"))
    for t in ("tls", "quic"):
        idle = _top_idle(res.get(f"idle-lpgw-{t}"))
        if idle:
            kb = idle["rss_per_device_bytes"] / 1000
            held = idle["connected"]
            out.append((f"{TARGETS['idle_devices']:,} idle {t.upper()} devices held",
                        f"{held:,} held", _yes(held >= TARGETS["idle_devices"])))
            out.append((f"≤ {TARGETS['rss_kb'][t]:.0f} KB gateway RSS per {t.upper()} device",
                        f"{kb:.1f} KB at {held:,}", _yes(kb <= TARGETS["rss_kb"][t]
                                                        and held >= TARGETS["idle_devices"])))
            out.append((f"idle CPU < {TARGETS['idle_cpu_percent']:.0f}% ({t.upper()}, "
                        f"heartbeats on)", f"{idle['idle_cpu_percent']:.1f}% at {held:,}",
                        _yes(idle["idle_cpu_percent"] < TARGETS["idle_cpu_percent"]
                             and held >= TARGETS["idle_devices"])))
        storm = res.get(f"storm-lpgw-{t}")
        hs, pr = _handshake_round(storm), _push_round(storm)
        for x in [y for y in (hs, pr) if y]:
            ok = (x["refused_for_good"] == 0 and x["all_welcomed_s"] is not None
                  and x["all_welcomed_s"] < TARGETS["storm_seconds"][t]
                  and x["devices"] >= TARGETS["idle_devices"])
            what = "with queued pushes" if x["pushes_queued"] else "no queued pushes"
            out.append((f"storm of {TARGETS['idle_devices']:,} {t.upper()} welcomed in < "
                        f"{TARGETS['storm_seconds'][t]:.0f} s, none refused ({what})",
                        f"{_f(x['all_welcomed_s'], 1)} s for {x['welcomed']:,}/"
                        f"{x['devices']:,}, {x['refused_for_good']} refused", _yes(ok)))
        if pr:
            ok = pr["pushes_delivered"] >= pr["pushes_queued"]
            out.append((f"every queued push delivered ({t.upper()} storm)",
                        f"{pr['pushes_delivered']:,}/{pr['pushes_queued']:,} in "
                        f"{_f(pr['all_delivered_s'], 1)} s", _yes(ok)))
        if t == "tls" and hs and mq:
            ratio = hs["cpu_ms_per_handshake"] / mq["cpu_ms_per_handshake"]
            ours, theirs = storm, res["storm-mosquitto-tls"]
            same = ours.get("run") is not None and ours.get("run") == theirs.get("run")
            out.append((f"CPU per TLS handshake ≤ {TARGETS['handshake_vs_mosquitto']}x "
                        f"Mosquitto's, measured on the same run",
                        f"{hs['cpu_ms_per_handshake']:.2f} ms vs "
                        f"{mq['cpu_ms_per_handshake']:.2f} ms = {ratio:.2f}x"
                        + (f" (run {ours['run']})" if same else
                           f" (separate runs: {ours['when']} and {theirs['when']})"),
                        _yes(ratio <= TARGETS["handshake_vs_mosquitto"]) if same
                        else "**not judged**: rerun with `bench/peer_mosquitto.py "
                             "--scenario storm --beside-lpgw`"))
    for r in _results_of(res, "api") + _results_of(res, "call"):
        out += [(t["target"], t["measured"], f"**{t['met']}**") for t in r.get("targets", [])]
    return out


def _results_of(res: dict[str, dict[str, Any]], scenario: str) -> list[dict[str, Any]]:
    """The scenarios that judge their own targets (api, call), in name order."""
    return [r for k, r in sorted(res.items()) if r["scenario"] == scenario]


def api_table(res: dict[str, dict[str, Any]]) -> str:
    """The api scenario's steps: offered and achieved rate, accept latency, gateway CPU."""
    parts = []
    for r in _results_of(res, "api"):
        s = r["settings"]
        sync = r.get("target", {}).get("config", {}).get("store", {}).get("synchronous", "?")
        rows = [f"API pushes (HTTP/2, {s['devices']} {r['transport'].upper()} devices, store "
                f"synchronous {sync}): sustained **{_f(r.get('sustained_per_s'), 0)}/s**, max "
                f"achieved {_f(r.get('max_achieved_per_s'), 0)}/s", "",
                "| offered /s | achieved /s | accept p50 / p99 ms | non-200 | gateway CPU % |",
                "|---:|---:|---:|---:|---:|"]
        for x in r["steps"]:
            rows.append(f"| {_f(x['offered_per_s'], 0)} | {_f(x['achieved_per_s'], 0)} | "
                        f"{_f(x['accept_ms']['p50'], 1)} / {_f(x['accept_ms']['p99'], 1)} | "
                        f"{_f(sum(x['other_status'].values()) + x['no_answer'])} | "
                        f"{_f(x['gateway_cpu_percent'])} |")
        parts.append("\n".join(rows) + "\n")
    return "\n".join(parts)


def _yes(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def side_by_side(res: dict[str, dict[str, Any]]) -> str:
    cols = [("lpgw", "tls"), ("lpgw", "quic"), ("mosquitto", "tls")]
    present = [c for c in cols if any(f"{k}-{c[0]}-{c[1]}" in res
                                      for k in ("idle", "storm", "latency"))]
    if not present:
        return "" if _results_of(res, "api") else "No results yet.\n"
    head = "| measure | " + " | ".join(LABELS[c] for c in present) + " |"
    rows = [head, "|---|" + "---:|" * len(present)]

    def row(label: str, fn, scenarios: tuple[str, ...] = ("idle", "storm")) -> None:
        """fn takes each column's results of `scenarios` (None where there is none)."""
        cells = []
        for s, t in present:
            try:
                cells.append(fn(*(res.get(f"{k}-{s}-{t}") for k in scenarios)))
            except (KeyError, TypeError, ValueError, ZeroDivisionError):  # none, or cut short
                cells.append("-")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")

    row("idle devices held", lambda i, s: _f(_top_idle(i)["connected"]))
    row("server RSS at that N, MiB", lambda i, s: _f(_top_idle(i)["rss_kib"] / 1024))
    row("RSS per idle device, KB", lambda i, s: _f(_top_idle(i)["rss_per_device_bytes"] / 1000))
    row("idle CPU % (10 s heartbeats)", lambda i, s: _f(_top_idle(i)["idle_cpu_percent"], 2))
    row("CPU ms per connect, ramped", lambda i, s: _f(_top_idle(i)["ramp_cpu_ms_per_connect"], 2))
    row("storm devices (no queued pushes)", lambda i, s: _f(_handshake_round(s)["devices"]))
    row("storm: all welcomed, s", lambda i, s: _f(_handshake_round(s)["all_welcomed_s"], 2))
    row("storm: welcome p50 / p99, s", lambda i, s: (
        f"{_f(_handshake_round(s)['welcome_at']['p50'], 2)} / "
        f"{_f(_handshake_round(s)['welcome_at']['p99'], 2)}"))
    row("storm: CPU ms per handshake",
        lambda i, s: _f(_handshake_round(s)["cpu_ms_per_handshake"], 3))
    row("storm: refused for good", lambda i, s: _f(_handshake_round(s)["refused_for_good"]))
    row("storm with pushes: devices x pushes", lambda i, s: (
        f"{_f(_push_round(s)['devices'])} x {_push_round(s)['pushes_per_device']}"))
    row("storm with pushes: all welcomed, s",
        lambda i, s: _f(_push_round(s)["all_welcomed_s"], 2))
    row("storm with pushes: all delivered, s",
        lambda i, s: _f(_push_round(s)["all_delivered_s"], 2))
    row("storm with pushes: delivered / queued", lambda i, s: (
        f"{_f(_push_round(s)['pushes_delivered'])} / {_f(_push_round(s)['pushes_queued'])}"))
    row("storm peak RSS, MiB", lambda i, s: _f(max(x["peak_rss_kib"] for x in s["rounds"]) / 1024))
    if any(r["scenario"] == "latency" for r in res.values()):
        latency = ("latency",)
        row("push to 1 of N connected: N", lambda r: _f(r["connected"]), latency)
        row("push: write → device read p50 / p99, ms", lambda r: (
            f"{_f(r['delivery_ms']['p50'], 2)} / {_f(r['delivery_ms']['p99'], 2)}"), latency)
        row("push: write → accepted p50 / p99, ms", lambda r: (
            f"{_f(r['accept_ms']['p50'], 2)} / {_f(r['accept_ms']['p99'], 2)}"), latency)
        row("push: delivered / accepted",
            lambda r: f"{_f(r['delivered'])} / {_f(r['accepted'])}", latency)
    return "\n".join(rows) + "\n"


def summary_markdown(res: dict[str, dict[str, Any]]) -> str:
    if not res:
        return "No results yet.\n"
    lines = ["| target (2-core x86) | measured | |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in verdicts(res)]
    machines = sorted({machine_line(r) for r in res.values()})
    runs = "\n".join(f"- `{k}`: {machine_line(r)}" for k, r in sorted(res.items()))
    tables = "\n".join(t for t in (side_by_side(res), api_table(res)) if t)
    return (tables + "\n" + "\n".join(lines) + "\n\n"
            + ("Runs:\n" + runs if len(machines) > 1 else f"Machine: {machines[0]}") + "\n")


# --- plots ---------------------------------------------------------------------------------


def pyplot() -> Any:
    """matplotlib.pyplot drawing to files, or None (and a word) when it is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install -e .[bench])", flush=True)
        return None
    return plt


def save_figure(fig: Any, axes: tuple, path: Path, from_zero: tuple = ()) -> Path:
    """Grid and legend on every panel, y from 0 on `from_zero` (default: all), written as a
    PNG and closed."""
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in from_zero or axes:
        ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    pyplot().close(fig)
    return path


def make_plots(res: dict[str, dict[str, Any]], out: Path) -> list[Path]:
    plt = pyplot()
    if plt is None:
        return []
    made = []
    series = [(s, t) for s, t in LABELS if f"idle-{s}-{t}" in res]
    if series:
        fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.2))
        for s, t in series:
            pts = sorted(res[f"idle-{s}-{t}"]["points"], key=lambda p: p["devices"])
            n = [p["connected"] for p in pts]
            a.plot(n, [p["rss_per_device_bytes"] / 1000 for p in pts], "o-", label=LABELS[(s, t)])
            b.plot(n, [p["rss_kib"] / 1024 for p in pts], "o-", label=LABELS[(s, t)])
            c.plot(n, [p["idle_cpu_percent"] for p in pts], "o-", label=LABELS[(s, t)])
        for t in ("tls", "quic"):
            a.axhline(TARGETS["rss_kb"][t], ls=":", c="grey")
            a.annotate(f"target {t.upper()}", (0, TARGETS["rss_kb"][t]), fontsize=8,
                       xycoords=("axes fraction", "data"), va="bottom")
        c.axhline(TARGETS["idle_cpu_percent"], ls=":", c="grey")
        a.set(title="server RSS per idle device", xlabel="devices", ylabel="KB")
        b.set(title="server RSS", xlabel="devices", ylabel="MiB")
        c.set(title="server CPU at idle (heartbeats on)", xlabel="devices", ylabel="% of one core")
        made.append(save_figure(fig, (a, b, c), out / "rss_vs_devices.png"))
    storms = [(s, t) for s, t in LABELS if f"storm-{s}-{t}" in res]
    if storms:
        fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.2))
        for s, t in storms:
            r = res[f"storm-{s}-{t}"]
            rounds = sorted((x for x in r["rounds"] if not x["pushes_queued"]),
                            key=lambda x: x["devices"])
            n = [x["devices"] for x in rounds]
            a.plot(n, [x["cpu_ms_per_handshake"] for x in rounds], "o-", label=LABELS[(s, t)])
            b.plot(n, [x["all_welcomed_s"] for x in rounds], "o-", label=LABELS[(s, t)])
            big = _push_round(r) or _handshake_round(r)
            if big and big.get("welcome_cdf"):
                q = big["welcome_cdf"]
                c.plot(q, [i / (len(q) - 1) * 100 for i in range(len(q))],
                       label=f"{LABELS[(s, t)]}, {big['devices']:,}")
        for t in ("tls", "quic"):
            b.axhline(TARGETS["storm_seconds"][t], ls=":", c="grey")
        a.set(title="server CPU per handshake (storm)", xlabel="devices", ylabel="ms")
        b.set(title="storm: time until all welcomed", xlabel="devices", ylabel="s")
        c.set(title="storm: devices welcomed over time", xlabel="s from storm start",
              ylabel="% welcomed")
        made.append(save_figure(fig, (a, b, c), out / "storm.png"))
    return made


def build(out: Path = RESULTS, plots: bool = True, docs: Path | None = None) -> str:
    res = load(out)
    text = summary_markdown(res)
    (out / "summary.md").write_text("# Latest results\n\n" + text)
    if plots:
        make_plots(res, out)
    if docs is not None and docs.exists():
        body = docs.read_text()
        new = re.sub(r"(<!-- results:begin -->\n).*?(<!-- results:end -->)",
                     lambda m: m.group(1) + text + m.group(2), body, flags=re.S)
        if new != body:
            docs.write_text(new)
            print(f"updated the table in {docs}", flush=True)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description="rebuild summary, plots and docs table")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--no-docs", action="store_true")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args()
    text = build(args.results, plots=not args.no_plots,
                 docs=None if args.no_docs else DOCS)
    print(text)


if __name__ == "__main__":
    main()
