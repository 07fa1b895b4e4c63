"""Careless and hostile config files through the real CLI: exit 2, the key and the problem.

A technician's typo (`.nan`), a file saved as Latin-1, a paste gone wrong (thousands of
brackets) and a YAML alias bomb must each stop `lpgw check-config` and `lpgw run` with a
short message, quickly: never a traceback, never a gateway started on garbage, never a
message as large as the structure that caused it. Each CLI runs with a memory cap so that
the code before these checks (which expanded the bomb) fails the test instead of the machine.
"""

from __future__ import annotations

import dataclasses
import resource
import subprocess
import sys
import time
import typing

import pytest

from gateway import config
from tests.conftest import ROOT

MEMORY_CAP = 1 << 30


def _cap_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def lpgw(*args: str, timeout: float = 20) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True,
                            text=True, timeout=timeout, cwd=ROOT, preexec_fn=_cap_memory)
    return result, time.monotonic() - started


def laughs(levels: int = 9) -> str:
    """The billion laughs: 9 ** levels strings from a file of a few hundred bytes."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "laughs:\n" + "".join(f"  {line}\n" for line in lines)


def laughs_in_a_list(levels: int = 6) -> str:
    """The same, made inside a list of strings the gateway reads."""
    lines = ['- &b0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"- &b{i} [{', '.join([f'*b{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "discovery:\n  interfaces:\n" + "".join(f"    {line}\n" for line in lines)


CASES = [
    # (file, what stderr must say)
    ("protocol:\n  heartbeat: .nan\n",
     "protocol.heartbeat: must be a finite number (got nan)"),
    ("protocol:\n  frame_rate: .inf\n", "protocol.frame_rate: must be a finite number (got inf)"),
    ("api:\n  rate_limit: -.inf\n", "api.rate_limit: must be a finite number (got -inf)"),
    ("delivery:\n  default_ttl: 1" + "0" * 30 + "\n", "delivery.default_ttl: must be at most"),
    ("api:\n  port: " + "9" * 5000 + "\n",
     "line 2, column 9: not valid YAML: not a valid value (Exceeds the limit"),
    (b"name: lpgw\nprotocol:\n  heartbeat: 10\ndiscovery:\n  instance: Station caf\xe9\n",
     "line 5: not UTF-8 text (byte 0xe9)"),
    ("name: " + "[" * 50000 + "]" * 50000 + "\n",
     "line 1, column 38: not valid YAML: nested deeper than 32 levels"),
    ("sip:\n  routes:\n    - match: " + "[" * 40 + "]" * 40 + "\n",
     "not valid YAML: nested deeper than 32 levels"),
    (laughs() + "name: *a8\n",
     "laughs.a5: more than 100000 values (each YAML alias counted as a copy"),
    (laughs_in_a_list(), "discovery.interfaces[5]: more than 100000 values"),
    ("discovery:\n  interfaces: &loop [*loop]\n",
     "line 2, column 15: a YAML alias refers to a value that contains it"),
    ("".join(f"key{i}: 1\n" for i in range(5000)),
     "key19: unknown key\n"),
    ("name: [" + ", ".join(["1"] * 20000) + "]\n",
     "name: must be a string (got [1, 1, 1, 1, 1, 1, ...])"),
]


@pytest.mark.parametrize(("text", "said"), CASES, ids=[
    "nan", "inf", "minus-inf", "huge-int", "5000-digits", "latin-1", "deep", "deep-in-list",
    "billion-laughs", "alias-bomb-in-a-list-key", "alias-loop", "5000-unknown-keys",
    "huge-value"])
def test_check_config_refuses_with_the_key_and_the_problem(tmp_path, text, said):
    path = tmp_path / "lpgw.yaml"
    if isinstance(text, str):
        path.write_text(text)
    else:
        path.write_bytes(text)
    result, took = lpgw("check-config", "-c", str(path))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert said in result.stderr, result.stderr[:2000]
    assert len(result.stderr) < 4000  # at most MAX_SHOWN short lines, whatever the file
    assert took < 10


def test_many_problems_are_counted_not_all_printed(tmp_path):
    path = tmp_path / "lpgw.yaml"
    path.write_text("".join(f"key{i}: 1\n" for i in range(5000)))
    result, _ = lpgw("check-config", "-c", str(path))
    assert result.stderr.count("unknown key") == config.MAX_SHOWN
    assert f"... and {5000 - config.MAX_SHOWN} more problems" in result.stderr


def test_run_starts_nothing_on_nan_or_a_bomb(tmp_path):
    """`lpgw run` checks the same way, before it binds or writes anything."""
    for name, text in (("nan", "protocol:\n  heartbeat: .nan\n"),
                       ("bomb", laughs() + "name: *a8\n")):
        state = tmp_path / f"state-{name}"
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"state_dir: {state}\nlisten: {{host: 127.0.0.1, port: 0}}\n"
                        "api: {host: 127.0.0.1, port: 0}\nsip: {enabled: false}\n"
                        f"discovery: {{enabled: false}}\n{text}")
        result, took = lpgw("run", "-c", str(path))
        assert result.returncode == 2, (name, result.stderr[-2000:])
        assert "Traceback" not in result.stderr and len(result.stderr) < 4000
        assert not state.exists() and took < 10


def test_files_the_gateway_reads_as_text_must_be_text(tmp_path):
    """The admin token and the assertion key are read as text at start: a binary file or a
    directory there was a traceback from `lpgw run` after check-config said ok."""
    binary = tmp_path / "admin.token"
    binary.write_bytes(b"\xff\xfe" + b"x" * 30)
    key = tmp_path / "backend.pem"
    key.write_bytes(b"-----BEGIN PUBLIC KEY-----\n\xc3\x28\n")
    path = tmp_path / "lpgw.yaml"
    path.write_text(f"api:\n  admin_token_file: {binary}\n"
                    f"assertions:\n  es256_public_key_file: {key}\n")
    result, _ = lpgw("check-config", "-c", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"api.admin_token_file: {binary} is not UTF-8 text" in result.stderr
    assert f"assertions.es256_public_key_file: {key} is not UTF-8 text" in result.stderr
    path.write_text(f"api:\n  admin_token_file: {tmp_path}\n")
    result, _ = lpgw("check-config", "-c", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"api.admin_token_file: cannot read {tmp_path}: Is a directory" in result.stderr


def test_every_number_has_a_range():
    """Each int and float key is bounded on both sides: an unbounded one let .inf or a
    30-digit value through to timers, rates and the database."""
    def numbers(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field]]:
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            kind = hints[f.name]
            if typing.get_origin(kind) is tuple:
                kind = typing.get_args(kind)[0]
            if dataclasses.is_dataclass(kind):
                out += numbers(kind, f"{prefix}{f.name}.")
            elif kind in (int, float):
                out.append((f"{prefix}{f.name}", f))
        return out

    found = numbers(config.Config)
    assert len(found) > 20
    unbounded = [key for key, f in found if f.metadata["lo"] is None or f.metadata["hi"] is None]
    assert unbounded == []

