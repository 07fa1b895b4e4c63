"""The README's push walkthrough, run as written (issue 18, point 4): each step is the
fenced block after a `<!-- walkthrough: NAME -->` marker, run by bash in a fresh
directory where `.venv/bin/lpgw` is this checkout's; the gateway and the device keep
running as they would in their terminals; only the token, which the reader copies from
the device's welcome line, is put in.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.netns import Lines

STEP = re.compile(r"<!-- walkthrough: (\w+) -->\n```(\w+)\n(.*?)```", re.S)


def steps() -> dict[str, str]:
    return {name: body for name, _, body in STEP.findall((ROOT / "README.md").read_text())}


def test_the_readme_push_walkthrough_works_as_written(tmp_path):
    for tool in ("openssl", "curl", "bash"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (scripts/test installs it)")
    walk = steps()
    assert list(walk) == ["key", "config", "gateway", "device", "push"]
    venv = tmp_path / ".venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "lpgw").symlink_to(Path(sys.executable).parent / "lpgw")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def bash(script: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=60)

    made = bash(walk["key"])
    assert made.returncode == 0, made.stderr
    (tmp_path / "trial.yaml").write_text(walk["config"])
    running: list[subprocess.Popen] = []
    try:
        gateway = subprocess.Popen(["bash", "-c", walk["gateway"]], cwd=tmp_path, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, start_new_session=True)
        running.append(gateway)
        Lines(gateway).wait_for(lambda line: "pin sha256/" in line, 30)
        device = subprocess.Popen(["bash", "-c", walk["device"]], cwd=tmp_path, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, start_new_session=True)
        running.append(device)
        said = Lines(device)
        _, line = said.wait_for(lambda text: '"welcome"' in text, 30)
        token = json.loads(line)["token"]

        push = walk["push"].replace("TOKEN=the-token-from-the-welcome-line",
                                    f"TOKEN={token}")
        assert push != walk["push"]
        answer = bash(push)
        assert answer.returncode == 0, answer.stderr
        assert answer.stdout.startswith("HTTP/2 200"), answer.stdout
        assert re.search(r"(?im)^apns-id: [0-9a-f-]{36}\r?$", answer.stdout), answer.stdout
        _, line = said.wait_for(lambda text: '"push"' in text, 10)
        assert json.loads(line)["payload"] == {"aps": {"alert": "Bed 12 calls"}}
    finally:
        for proc in reversed(running):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)
