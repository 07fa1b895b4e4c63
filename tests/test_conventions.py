"""The conventions an IT team expects of a service (issue 18, point 4): the system config
file by default, `--state-dir`, every configuration error at once, words in any case,
provider topics named as the app's bundle id, and logs as readable text with the time's
zone or as JSON lines."""

from __future__ import annotations

import json
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway import cli, config
from gateway.service import free_port
from tests.conftest import ROOT
from tests.netns import Lines

PY = sys.executable


def test_the_system_config_is_read_when_no_file_is_named(tmp_path, monkeypatch, capsys):
    system = tmp_path / "etc" / "lpgw.yaml"
    monkeypatch.setattr(cli, "SYSTEM_CONFIG", system)
    assert cli.main(["check-config"]) == 0  # none there: the embedded defaults
    assert "(embedded defaults): ok" in capsys.readouterr().out
    system.parent.mkdir()
    system.write_text("listen: {port: 70000}\n")
    with pytest.raises(SystemExit) as exc:
        cli.main(["check-config"])
    assert exc.value.code == cli.EXIT_CONFIG
    assert f"{system}: listen.port: must be at most 65535" in capsys.readouterr().err
    system.write_text("name: Ward 3\n")
    assert cli.main(["check-config"]) == 0
    assert f"{system}: ok" in capsys.readouterr().out
    other = tmp_path / "other.yaml"
    other.write_text("name: Ward 4\n")
    assert cli.main(["check-config", "-c", str(other)]) == 0  # -c wins
    assert f"{other}: ok" in capsys.readouterr().out


def test_every_error_of_a_file_is_reported_at_once_and_words_in_any_case(tmp_path):
    assert config.from_dict({"store": {"synchronous": "full"}}).store.synchronous == "FULL"
    assert config.from_dict({"log": {"level": "WARNING"}}).log.level == "warning"
    path = tmp_path / "lpgw.yaml"
    path.write_text("store: {synchronous: fast}\nlog: {level: loud, format: xml}\n"
                    "listen: {port: -1}\n")
    with pytest.raises(config.ConfigError) as exc:
        config.load(path)
    said = str(exc.value)
    for problem in ("store.synchronous: must be one of FULL, NORMAL (got 'fast')",
                    "log.level: must be one of debug, info, warning, error (got 'loud')",
                    "log.format: must be one of text, json (got 'xml')",
                    "listen.port: must be at least 0 (got -1)"):
        assert problem in said


def test_a_provider_topic_with_a_push_type_suffix_is_refused_with_the_reason(tmp_path):
    from tests.test_api import Keys

    provider = Keys(tmp_path).providers()[0]
    with pytest.raises(config.ConfigError) as exc:
        config.from_dict({"api": {"providers": [{**provider,
                                                 "topics": ["com.example.nurse.voip"]}]}})
    assert ("api.providers[0].topics: 'com.example.nurse.voip' ends in '.voip', a push "
            "type's suffix; list the app's bundle id ('com.example.nurse')") in str(exc.value)


def _run(tmp_path: Path, *args: str, **extra) -> tuple[subprocess.Popen, Lines]:
    conf = tmp_path / "lpgw.yaml"
    conf.write_text(yaml.safe_dump({
        "state_dir": str(tmp_path / "from-file"),
        "listen": {"host": "127.0.0.1", "port": free_port("127.0.0.1")},
        "api": {"enabled": False}, "sip": {"enabled": False},
        "discovery": {"enabled": False}, **extra}))
    proc = subprocess.Popen([PY, "-m", "gateway.cli", "run", "-c", str(conf), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            start_new_session=True)
    return proc, Lines(proc)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)


def test_run_takes_the_state_dir_from_the_command_line_and_keeps_it_on_reload(tmp_path):
    state = tmp_path / "from-command-line"
    proc, lines = _run(tmp_path, "--state-dir", str(state))
    try:
        lines.wait_for(lambda line: "pin sha256/" in line, 30)
        assert (state / "runtime.json").exists()
        assert not (tmp_path / "from-file").exists()
        os.kill(proc.pid, signal.SIGHUP)
        lines.wait_for(lambda line: "configuration reloaded" in line, 15)
        assert not any("state_dir changed" in line for _, line in lines.seen)
    finally:
        _stop(proc)


def test_logs_as_text_with_the_time_zone_or_as_json_lines(tmp_path):
    proc, lines = _run(tmp_path)
    try:
        _, line = lines.wait_for(lambda text: " INFO lpgw" in text, 30)
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d INFO lpgw", line)
    finally:
        _stop(proc)
    (tmp_path / "json").mkdir()
    proc, lines = _run(tmp_path / "json", log={"format": "json"})
    try:
        _, line = lines.wait_for(lambda text: text.startswith("{"), 30)
        record = json.loads(line)
        assert set(record) >= {"time", "level", "logger", "message"}
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"])
        assert record["level"] == "INFO" and record["logger"].startswith("lpgw")
        lines.wait_for(lambda text: "pin sha256/" in text, 30)
        logged = [json.loads(text) for _, text in lines.seen if text.startswith("{")]
        assert all(r["logger"].startswith(("lpgw", "asyncio")) for r in logged)
    finally:
        _stop(proc)


def _completion(shell: str) -> str:
    done = subprocess.run([PY, "-m", "gateway.cli", "completion", shell], capture_output=True,
                          text=True, timeout=30, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize(("words", "expected"), [
    ("lpgw se", {"selftest", "send"}),
    ("lpgw run --st", {"--state-dir"}),
    ("lpgw completion ", {"bash", "zsh"}),
])
def test_bash_completes_commands_and_options(tmp_path, words, expected):
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    script = tmp_path / "lpgw.bash"
    script.write_text(_completion("bash"))
    parts = words.split(" ")
    probe = (f"source {script}\nCOMP_WORDS=({' '.join(repr(w) for w in parts)})\n"
             f"COMP_CWORD={len(parts) - 1}\nCOMP_LINE={words!r}\nCOMP_POINT={len(words)}\n"
             "_shtab_lpgw lpgw\nprintf '%s\\n' \"${COMPREPLY[@]}\"\n")
    done = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert {w.strip() for w in done.stdout.split()} == expected, done.stdout


def test_zsh_loads_the_completion(tmp_path):
    if shutil.which("zsh") is None:
        pytest.skip("zsh not installed (scripts/test installs it)")
    (tmp_path / "_lpgw").write_text(_completion("zsh"))
    probe = (f"fpath=({tmp_path} $fpath); autoload -U compinit; compinit -u -d "
             f"{tmp_path}/zcompdump; print -r -- $_comps[lpgw]")
    done = subprocess.run(["zsh", "-f", "-c", probe], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "_lpgw"


def test_the_man_page_is_written_from_the_cli_and_renders():
    script = runpy.run_path(str(ROOT / "scripts" / "make-manpage"), run_name="tested")
    page = ROOT / "docs" / "lpgw.1"
    assert page.read_text() == script["text"](), \
        "docs/lpgw.1 is behind the CLI: run .venv/bin/python scripts/make-manpage"
    if shutil.which("man") is None:
        return
    shown = subprocess.run(["man", "-l", str(page)], capture_output=True, text=True,
                           timeout=30, env={**os.environ, "MANWIDTH": "80", "PAGER": "cat"})
    assert shown.returncode == 0, shown.stderr
    for command in ("lpgw run", "lpgw selftest", "lpgw completion", "--state-dir"):
        assert command in shown.stdout
