"""The API's OpenAPI 3.1 description (gateway/openapi.yaml, docs/openapi.yaml, served at
/openapi.json) against the running gateway (issue 18, point 4): schemathesis generates
requests from it, valid and invalid, and checks every answer against it."""

from __future__ import annotations

import json
import re
import shutil
import signal
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from gateway.api.errors import STATUS
from gateway.service import free_port
from tests.conftest import ROOT, GatewayProcess
from tests.test_api import Keys

SPEC = ROOT / "gateway" / "openapi.yaml"
ADMIN = "admin-token-of-this-test-0123456789"


def test_the_description_names_every_reason_the_api_gives():
    spec = yaml.safe_load(SPEC.read_text())
    reasons = set(spec["components"]["schemas"]["Error"]["properties"]["reason"]["enum"])
    assert reasons == set(STATUS) | {"RequestTimeout"}
    statuses = {int(code) for path in spec["paths"].values() for op in path.values()
                for code in op["responses"]}
    assert {STATUS[r] for r in ("BadDeviceToken", "Unregistered", "TooManyRequests",
                                "HTTP2Required")} <= statuses
    assert (ROOT / "docs" / "openapi.yaml").resolve() == SPEC.resolve()


@pytest.fixture
def gateway(tmp_path):
    keys = Keys(tmp_path)
    admin = tmp_path / "admin.token"
    admin.write_text(ADMIN + "\n")
    admin.chmod(0o600)
    proc = GatewayProcess(tmp_path / "state", free_port("127.0.0.1"), {
        "api": {"host": "127.0.0.1", "port": 0, "providers": keys.providers(),
                "admin_token_file": str(admin)}})
    proc.start()
    proc.keys = keys
    try:
        yield proc
    finally:
        proc.kill(signal.SIGTERM)


def test_the_gateway_serves_its_description(gateway, tmp_path):
    tls = ssl.create_default_context(cafile=str(tmp_path / "state" / "gateway.crt"))
    url = f"https://localhost:{gateway.runtime['api_port']}/openapi.json"
    with urllib.request.urlopen(url, context=tls, timeout=5) as answer:
        assert answer.headers["content-type"].startswith("application/json")
        served = json.loads(answer.read())
    assert served == yaml.safe_load(SPEC.read_text())
    assert served["openapi"] == "3.1.0"


def test_schemathesis_finds_the_gateway_true_to_its_description(gateway, tmp_path):
    """Every check but two, which ask for what the API deliberately does otherwise, as
    APNs does: a request without a token is 403 MissingProviderToken (not 401), and a
    well-formed token that names no device is 400 BadDeviceToken (not 404). The push
    (HTTP/2 only; schemathesis speaks HTTP/1.1) is checked by the next test."""
    schemathesis = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    if schemathesis is None:
        pytest.skip("schemathesis not installed (a test dependency)")
    port = gateway.runtime["api_port"]
    done = subprocess.run(
        [schemathesis, "run", f"https://localhost:{port}/openapi.json",
         "--tls-verify", str(tmp_path / "state" / "gateway.crt"),
         "-H", f"Authorization: Bearer {ADMIN}", "--checks", "all",
         "--exclude-checks", "missing_required_header,positive_data_acceptance",
         "--exclude-operation-id", "push",
         "--max-examples", "25", "--seed", "1", "--request-timeout", "5",
         "--generation-deterministic", "--no-color"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]


async def test_pushes_answer_as_described(gateway, tmp_path):
    """/3/device over HTTP/2 (an independent client, httpx): a push accepted, and each
    kind of refusal, answered with a status the description lists for it and a body its
    Error schema allows; over HTTP/1.1, the 505 it describes."""
    import httpx

    from tests.conftest import Device
    from tests.test_api import TOPIC, push

    spec = yaml.safe_load(SPEC.read_text())
    operation = spec["paths"]["/3/device/{token}"]["post"]
    declared = {int(code) for code in operation["responses"]}
    reasons = set(spec["components"]["schemas"]["Error"]["properties"]["reason"]["enum"])
    keys, port = gateway.keys, gateway.runtime["api_port"]
    ctx = ssl.create_default_context(cafile=str(tmp_path / "state" / "gateway.crt"))
    phone = Device(gateway.handle(), "tls", topic=TOPIC)
    try:
        token = await phone.welcome()
        async with httpx.AsyncClient(http2=True, verify=ctx,
                                     base_url=f"https://localhost:{port}") as client:
            kept = await push(client, keys, token, {"aps": {"alert": "x"}})
            refused = [
                await push(client, keys, "0" * 64, {"aps": {}}),  # no such device
                await push(client, keys, "zz", {"aps": {}}),  # not a token
                await client.post(f"/3/device/{token}", content=b"{}"),  # no JWT
                await push(client, keys, token, {"aps": {}}, apns_priority="7"),
                await client.get(f"/3/device/{token}")]
        async with httpx.AsyncClient(verify=ctx, base_url=f"https://localhost:{port}") as h1:
            refused.append(await h1.post(f"/3/device/{token}", content=b"{}"))
    finally:
        await phone.stop()
    assert kept.status_code == 200 and re.fullmatch(r"[0-9a-f-]{36}", kept.headers["apns-id"])
    assert "apns-id" in operation["responses"]["200"]["headers"]
    assert [a.status_code for a in refused] == [400, 400, 403, 400, 405, 505], refused
    for answer in refused:
        assert answer.status_code in declared
        assert answer.json()["reason"] in reasons
    assert refused[4].headers["allow"] == "POST"
