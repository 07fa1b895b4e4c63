"""Configuration: defaults, the example file, and errors that name the key."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway import config
from tests.conftest import ROOT

EXAMPLE = ROOT / "gateway" / "lpgw.example.yaml"


def test_the_example_documents_every_key_with_its_default():
    assert config.load(EXAMPLE) == config.Config()
    text = EXAMPLE.read_text()
    data = yaml.safe_load(text)
    for key in config.schema_keys():
        node = data
        for part in key.split("."):
            assert part in node, f"{key} is not in the example config"
            node = node[part]
    assert text.count("#") > len(config.schema_keys())  # commented, not just listed


def test_no_file_means_embedded_defaults():
    assert config.load(None).listen.port == 4433


@pytest.mark.parametrize(("data", "message"), [
    ({"listen": {"port": 70000}}, "listen.port: must be at most 65535"),
    ({"listen": {"port": "4433"}}, "listen.port: must be a whole number"),
    ({"protocol": {"heartbeat": 0}}, "protocol.heartbeat: must be at least"),
    ({"protocol": {"hearbeat": 5}}, "did you mean 'protocol.heartbeat'"),
    ({"log": {"level": "loud"}}, "log.level: must be one of debug, info, warning, error"),
    ({"listen": {"quic": "yes"}}, "listen.quic: must be true or false"),
    ({"listen": {"quic_receive_buffer": -1}}, "listen.quic_receive_buffer: must be at least 0"),
    ({"listen": {"quic": False, "tls": False}}, "listen: at least one"),
    ({"tls": {"cert": "/nonexistent.pem"}}, "tls: set both cert and key"),
    ({"tls": {"cert": "/no/c.pem", "key": "/no/k.pem"}}, "tls.cert: cannot read /no/c.pem"),
    ({"assertions": {"required": True}}, "assertions.required"),
    ({"assertions": {"hs256_secret": "short"}}, "assertions.hs256_secret: must be at least 32"),
    ({"store": []}, "store: must be a mapping"),
    ([1, 2], "(top level): must be a mapping"),
])
def test_bad_values_name_the_key_and_the_problem(data, message):
    with pytest.raises(config.ConfigError) as caught:
        config.from_dict(data)
    assert message in str(caught.value)


def test_secrets_are_not_echoed_in_errors():
    with pytest.raises(config.ConfigError) as caught:
        config.from_dict({"assertions": {"hs256_secret": 12345678}})
    assert "12345678" not in str(caught.value) and "hidden" in str(caught.value)


def test_all_problems_are_reported_at_once():
    with pytest.raises(config.ConfigError) as caught:
        config.from_dict({"listen": {"port": -1}, "delivery": {"queue_limit": 0}})
    assert len(caught.value.problems) == 2


def test_yaml_syntax_errors_give_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen:\n  port: 1\n bad indent: [\n")
    with pytest.raises(config.ConfigError) as caught:
        config.load(bad)
    assert "line" in str(caught.value) and str(bad) in str(caught.value)


def lpgw(*args: str, env: dict | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})


def test_run_with_a_bad_config_exits_2_before_touching_anything(tmp_path):
    state = tmp_path / "state"
    cfg = tmp_path / "lpgw.yaml"
    cfg.write_text(f"state_dir: {state}\nprotocol:\n  heartbeat_misses: 0\n")
    result = lpgw("run", "-c", str(cfg))
    assert result.returncode == 2
    assert "protocol.heartbeat_misses: must be at least 1 (got 0)" in result.stderr
    assert not state.exists()  # nothing half-started


def test_check_config(tmp_path):
    assert lpgw("check-config", "-c", str(EXAMPLE)).returncode == 0
    missing = lpgw("check-config", "-c", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr


def test_a_secret_file_is_read_and_never_logged(tmp_path):
    secret = tmp_path / "jwt.secret"
    secret.write_text("s3cr3t-" + "x" * 40 + "\n")
    cfg = config.from_dict({"assertions": {"hs256_secret_file": str(secret)}})
    assert config.hs256_secret(cfg) == secret.read_text().strip().encode()
    assert "s3cr3t" not in repr(cfg.listen)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"),
                    reason="needs root and iproute2: runs in a network namespace of its own")
def test_run_on_embedded_defaults_prints_where_it_listens_and_the_pin(tmp_path):
    """No config file at all: state dir, certificate and database are made on first start.

    Defaults bind every address and advertise over mDNS, so this runs in a network
    namespace with only a loopback: nothing reaches this machine's real interfaces.
    """
    state = tmp_path / "state"
    ns = f"lpgw-defaults-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "gateway.cli",
                                 "run"], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "STATE_DIRECTORY": str(state)})
        try:
            lines = []
            while len(lines) < 8 and (line := proc.stdout.readline()):
                lines.append(line)
                if line.startswith("lpgw: state in"):
                    break
        finally:
            proc.terminate()
            proc.wait(20)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    text = "".join(lines)
    assert "listening tls on tcp [::]:4433" in text, text + proc.stderr.read()
    assert "listening quic on udp [::]:4433" in text
    assert "provider API (APNs-compatible, HTTP/2) on tcp [::]:2197" in text
    pin = text.split("pin sha256/")[1].split()[0]
    assert len(pin) == 44
    for made in ("gateway.crt", "gateway.key", "lpgw.sqlite3"):
        assert (state / made).exists()
    assert (state / "gateway.key").stat().st_mode & 0o077 == 0
    assert proc.returncode == 0  # SIGTERM is a clean stop
    pinned = lpgw("pin", env={"STATE_DIRECTORY": str(state)})
    assert pinned.stdout.strip() == f"sha256/{pin}"
    assert Path(state / "control.sock").exists() is False  # removed on stop


@pytest.mark.parametrize(("data", "message"), [
    ({"sip": {"trusted": ["10.0.0.0/33"]}}, "sip.trusted[0]: not an address or network"),
    ({"sip": {"trusted": ["pbx.example"]}}, "sip.trusted[0]: not an address or network"),
    ({"delivery": {"new_device_exempt": ["x"]}}, "delivery.new_device_exempt[0]: not an"),
    ({"sip": {"inbound_auth": {"enabled": True}}}, "sip.inbound_auth.credentials_file: needed"),
    ({"sip": {"untrusted_reply": "404"}}, "sip.untrusted_reply: must be one of 403, none"),
    ({"api": {"max_concurrent_streams": 0}}, "api.max_concurrent_streams: must be at least 1"),
    ({"listen": {"quic_half_open_limit": 0}}, "listen.quic_half_open_limit: must be at least"),
])
def test_trust_boundary_keys_are_checked(data, message):
    with pytest.raises(config.ConfigError, match=re.escape(message)):
        config.from_dict(data)
