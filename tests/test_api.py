"""The APNs-compatible API with real, independent HTTP/2 clients.

httpx (h2 over ALPN, like Go and Node servers) and Node's nghttp2 over TLS without ALPN
(prior knowledge, like aioapns and pushy) talk to a real gateway; a reference device receives.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import ssl
import time
import uuid

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.client import DeviceClient, DeviceOptions
from gateway.service import free_port
from tests.conftest import ROOT, GatewayProcess, send

TEAM, OTHER_TEAM = "ABCDE12345", "ZYXWV98765"
TOPIC = "com.example.lpgw"
NODE_CLIENT = ROOT / "tests" / "clients" / "h2_prior_knowledge.js"


class Keys:
    """Provider signing keys, as app servers hold them (.p8), and their public halves."""

    def __init__(self, tmp_path) -> None:
        self.private: dict[str, ec.EllipticCurvePrivateKey] = {}
        self.files: dict[str, str] = {}
        for kid in ("KEYAAAAAAA", "KEYBBBBBBB", "KEYCCCCCCC"):
            key = ec.generate_private_key(ec.SECP256R1())
            path = tmp_path / f"{kid}.pub"
            path.write_bytes(key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
            self.private[kid], self.files[kid] = key, str(path)

    def providers(self) -> list[dict]:
        return [
            {"team_id": TEAM, "key_id": "KEYAAAAAAA", "key_file": self.files["KEYAAAAAAA"],
             "topics": [TOPIC]},
            {"team_id": TEAM, "key_id": "KEYBBBBBBB", "key_file": self.files["KEYBBBBBBB"],
             "topics": [TOPIC, "com.example.other"]},
            {"team_id": OTHER_TEAM, "key_id": "KEYCCCCCCC",
             "key_file": self.files["KEYCCCCCCC"], "topics": ["com.example.other"]},
        ]

    def token(self, kid: str = "KEYAAAAAAA", iss: str | None = None, iat: float | None = None,
              signer: str | None = None) -> str:
        """A provider JWT; iss defaults to the team the key belongs to."""
        iss = iss or (OTHER_TEAM if kid == "KEYCCCCCCC" else TEAM)
        claims = {"iss": iss, "iat": int(time.time() if iat is None else iat)}
        return jwt.encode(claims, self.private[signer or kid], algorithm="ES256",
                          headers={"kid": kid})


@pytest.fixture
def keys(tmp_path):
    return Keys(tmp_path)


@pytest.fixture
async def api(gateway_factory, keys, tmp_path):
    admin = tmp_path / "admin.token"
    admin.write_text("admin-" + uuid.uuid4().hex)
    gw = await gateway_factory(api={"host": "127.0.0.1", "port": 0,
                                    "providers": keys.providers(),
                                    "admin_token_file": str(admin)})
    gw.admin_token = admin.read_text()
    return gw


def tls_context(gw) -> ssl.SSLContext:
    """App servers trust the gateway's self-signed certificate as their CA."""
    return ssl.create_default_context(cafile=str(gw.config.cert_path))


@pytest.fixture
async def h2(api):
    async with httpx.AsyncClient(http2=True, verify=tls_context(api),
                                 base_url=f"https://localhost:{api.api_port}") as client:
        yield client


async def push(client, keys, token: str, body: bytes | dict = b'{"aps":{"alert":"hi"}}',
               kid: str = "KEYAAAAAAA", **headers: str) -> httpx.Response:
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    hdrs = {"authorization": f"bearer {keys.token(kid)}"}
    hdrs.update({k.replace("_", "-"): v for k, v in headers.items()})
    return await client.post(f"/3/device/{token}", headers=hdrs, content=body)


async def node_h2(gw, requests: list[dict]) -> list[dict]:
    proc = await asyncio.create_subprocess_exec(
        shutil.which("node") or "node", str(NODE_CLIENT), str(gw.api_port),
        str(gw.config.cert_path), json.dumps(requests),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    return sorted((json.loads(line) for line in out.decode().splitlines()), key=lambda r: r["i"])


def pending(gw, token: str) -> int:
    return gw.store.count_pending(token)


# --- delivery ------------------------------------------------------------------------


async def test_a_push_over_h2_alpn_reaches_the_device(api, h2, keys, devices):
    device = devices(api, "quic", topic=TOPIC)
    token = await device.welcome()
    payload = {"aps": {"alert": {"title": "Ward 3", "body": "Bed 12"}, "sound": "default"}}
    response = await push(h2, keys, token, payload, apns_push_type="alert",
                          apns_priority="10", apns_collapse_id="bed-12")
    assert response.http_version == "HTTP/2"
    assert response.status_code == 200 and response.content == b""
    apns_id = response.headers["apns-id"]
    uuid.UUID(apns_id)
    got = await device.next("push")
    assert got["id"] == apns_id and got["payload"] == payload
    assert got["collapse_id"] == "bed-12" and got["priority"] == 10


async def test_apns_id_is_echoed(api, h2, keys, devices):
    device = devices(api, "tls", topic=TOPIC)
    token = await device.welcome()
    mine = str(uuid.uuid4()).upper()
    response = await push(h2, keys, token, apns_id=mine)
    assert response.status_code == 200 and response.headers["apns-id"].lower() == mine.lower()
    assert (await device.next("push"))["id"] == mine.lower()


async def test_voip_push_by_prior_knowledge_without_alpn(api, keys, devices):
    device = devices(api, "tls", topic=TOPIC)
    token = await device.welcome()
    body = json.dumps({"call": {"id": "c-1", "from": "sip:2001@pbx"}, "pad": "x" * 4500})
    (result,) = await node_h2(api, [{"path": f"/3/device/{token}", "body": body, "headers": {
        "authorization": f"bearer {keys.token()}", "apns-push-type": "voip",
        "apns-topic": f"{TOPIC}.voip", "apns-expiration": "0"}}])
    assert result["alpn"] is None  # no ALPN: HTTP/2 by prior knowledge
    assert result["status"] == 200, result
    got = await device.next("push")
    assert got["id"] == result["headers"]["apns-id"] and got["push_type"] == "voip"
    assert got["expiration"] == 0 and json.loads(body) == got["payload"]


async def test_http1_on_the_push_path_gets_a_clear_error(api, keys):
    async with httpx.AsyncClient(http2=False, verify=tls_context(api)) as h1:
        response = await h1.post(f"https://localhost:{api.api_port}/3/device/{'a' * 64}",
                                 headers={"authorization": f"bearer {keys.token()}"},
                                 content=b'{"aps":{}}')
        assert response.http_version == "HTTP/1.1"
        assert response.status_code == 505 and response.json()["reason"] == "HTTP2Required"
        health = await h1.get(f"https://localhost:{api.api_port}/v1/health")
        assert health.json() == {"status": "ok"}  # the rest of the API speaks HTTP/1.1 too


# --- every reason --------------------------------------------------------------------

CASES = [
    # (path suffix or None for the device's token, headers, body, status, reason)
    ("zz", {}, None, 400, "BadDeviceToken"),
    ("0" * 64, {}, None, 400, "BadDeviceToken"),
    ("", {}, None, 400, "MissingDeviceToken"),
    (None, {"apns-push-type": "complication", "apns-topic": f"{TOPIC}.complication"}, None,
     400, "DeviceTokenNotForTopic"),
    (None, {"apns-push-type": "voip", "apns-topic": TOPIC}, None, 400, "BadTopic"),
    (None, {"apns-push-type": "alert", "apns-topic": f"{TOPIC}.voip"}, None, 400, "BadTopic"),
    (None, {"apns-topic": "com.example.nope"}, None, 400, "TopicDisallowed"),
    (None, {"apns-collapse-id": "c" * 65}, None, 400, "BadCollapseId"),
    (None, {"apns-expiration": "soon"}, None, 400, "BadExpirationDate"),
    (None, {"apns-expiration": "-5"}, None, 400, "BadExpirationDate"),
    (None, {"apns-priority": "7"}, None, 400, "BadPriority"),
    (None, {"apns-push-type": "background", "apns-priority": "10"}, b'{"aps":{}}', 400,
     "BadPriority"),
    (None, {"apns-id": "not-a-uuid"}, None, 400, "BadMessageId"),
    (None, {"apns-push-type": "fax"}, None, 400, "InvalidPushType"),
    (None, {}, b"", 400, "PayloadEmpty"),
    (None, {}, b"{}", 400, "PayloadEmpty"),
    (None, {}, b'{"aps": {"alert": "unterminated', 400, "BadPayload"),
    (None, {}, b'["aps"]', 400, "BadPayload"),
    (None, {}, b'{"x": "' + b"y" * 4100 + b'"}', 413, "PayloadTooLarge"),
    (None, {"apns-push-type": "voip", "apns-topic": f"{TOPIC}.voip"},
     b'{"x": "' + b"y" * 5200 + b'"}', 413, "PayloadTooLarge"),
    (None, {}, b'{"x": "' + b"y" * 6000 + b'"}', 413, "PayloadTooLarge"),
]


@pytest.mark.parametrize(("suffix", "headers", "body", "status", "reason"), CASES)
async def test_reasons(api, h2, keys, devices, suffix, headers, body, status, reason):
    device = devices(api, "quic", topic=TOPIC, push_types=("alert", "voip", "background"))
    token = await device.welcome()
    path = f"/3/device/{token if suffix is None else suffix}"
    response = await h2.post(path, content=b'{"aps":{"alert":"x"}}' if body is None else body,
                             headers={"authorization": f"bearer {keys.token()}", **headers})
    assert response.status_code == status, response.text
    assert response.json()["reason"] == reason
    assert pending(api, token) == 0  # refused means never stored
    assert api.metrics.value("lpgw_api_errors_total", reason=reason) >= 1


async def test_method_path_and_duplicate_headers(api, h2, keys, devices):
    device = devices(api, "quic", topic=TOPIC)
    token = await device.welcome()
    auth = {"authorization": f"bearer {keys.token()}"}
    wrong_method = await h2.get(f"/3/device/{token}", headers=auth)
    assert (wrong_method.status_code, wrong_method.json()["reason"]) == (405, "MethodNotAllowed")
    nowhere = await h2.post("/4/device/x", headers=auth, content=b"{}")
    assert (nowhere.status_code, nowhere.json()["reason"]) == (404, "BadPath")
    twice = await h2.post(f"/3/device/{token}", content=b'{"a":1}', headers=[
        ("authorization", f"bearer {keys.token()}"), ("apns-priority", "10"),
        ("apns-priority", "5")])
    assert (twice.status_code, twice.json()["reason"]) == (400, "DuplicateHeaders")
    assert pending(api, token) == 0


async def test_a_key_with_several_topics_must_name_one(api, h2, keys, devices):
    device = devices(api, "quic", topic=TOPIC)
    token = await device.welcome()
    missing = await push(h2, keys, token, kid="KEYBBBBBBB")
    assert (missing.status_code, missing.json()["reason"]) == (400, "MissingTopic")
    named = await push(h2, keys, token, kid="KEYBBBBBBB", apns_topic=TOPIC)
    assert named.status_code == 200
    elsewhere = await push(h2, keys, token, kid="KEYBBBBBBB", apns_topic="com.example.other")
    assert elsewhere.json()["reason"] == "DeviceTokenNotForTopic"


@pytest.mark.parametrize(("make", "reason"), [
    (lambda k: None, "MissingProviderToken"),
    (lambda k: "Basic dXNlcjpwYXNz", "MissingProviderToken"),
    (lambda k: "bearer not.a.jwt", "InvalidProviderToken"),
    (lambda k: f"bearer {k.token(signer='KEYCCCCCCC')}", "InvalidProviderToken"),  # bad sig
    (lambda k: f"bearer {k.token(kid='KEYCCCCCCC', iss=TEAM)}", "InvalidProviderToken"),
    (lambda k: f"bearer {k.token(iss='ABCDE99999')}", "InvalidProviderToken"),
    (lambda k: f"bearer {k.token(iat=time.time() + 3600)}", "InvalidProviderToken"),
    (lambda k: f"bearer {k.token(iat=time.time() - 3700)}", "ExpiredProviderToken"),
    (lambda k: "bearer " + jwt.encode({"iss": TEAM, "iat": int(time.time())}, "s" * 32,
                                      algorithm="HS256", headers={"kid": "KEYAAAAAAA"}),
     "InvalidProviderToken"),
])
async def test_provider_tokens(api, h2, keys, devices, make, reason):
    device = devices(api, "quic", topic=TOPIC)
    token = await device.welcome()
    auth = make(keys)
    headers = {"authorization": auth} if auth else {}
    response = await h2.post(f"/3/device/{token}", headers=headers, content=b'{"a":1}')
    assert (response.status_code, response.json()["reason"]) == (403, reason)
    assert pending(api, token) == 0


async def test_other_team_key_cannot_push_to_this_topic(api, h2, keys, devices):
    device = devices(api, "quic", topic=TOPIC)
    token = await device.welcome()
    response = await push(h2, keys, token, kid="KEYCCCCCCC")
    assert response.json()["reason"] == "DeviceTokenNotForTopic"
    response = await push(h2, keys, token, kid="KEYCCCCCCC", apns_topic=TOPIC)
    assert response.json()["reason"] == "TopicDisallowed"


async def test_admin_token_reads_but_cannot_push(api, h2, keys, devices):
    device = devices(api, "quic", topic=TOPIC)
    token = await device.welcome()
    response = await h2.post(f"/3/device/{token}", content=b'{"a":1}',
                             headers={"authorization": f"bearer {api.admin_token}"})
    assert (response.status_code, response.json()["reason"]) == (403, "InvalidProviderToken")


async def test_410_after_unregistration(api, h2, keys, devices):
    device = devices(api, "tls", topic=TOPIC)
    token = await device.welcome()
    before = time.time()
    device.client.unregister()
    assert (await device.next("disconnected"))["reason"] == "unregistered"
    response = await push(h2, keys, token)
    assert response.status_code == 410
    body = response.json()
    assert body["reason"] == "Unregistered"
    assert before * 1000 - 1000 <= body["timestamp"] <= time.time() * 1000 + 1000


async def test_rate_limit_per_key(gateway_factory, keys, devices):
    gw = await gateway_factory(api={"host": "127.0.0.1", "port": 0, "rate_limit": 0.5,
                                    "rate_burst": 3, "providers": keys.providers()})
    device = devices(gw, "quic", topic=TOPIC)
    token = await device.welcome()
    async with httpx.AsyncClient(http2=True, verify=tls_context(gw)) as client:
        client.base_url = f"https://localhost:{gw.api_port}"
        codes = [(await push(client, keys, token)).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        other = await push(client, keys, token, kid="KEYBBBBBBB", apns_topic=TOPIC)
        assert other.status_code == 200  # the limit is per key


async def test_503_shutdown_while_draining(api, h2, keys, devices):
    device = devices(api, "quic", topic=TOPIC)
    token = await device.welcome()
    api.router.draining = True
    response = await push(h2, keys, token)
    assert (response.status_code, response.json()["reason"]) == (503, "Shutdown")
    assert (await h2.get("/v1/health")).json() == {"status": "draining"}


# --- concurrency and crashes ---------------------------------------------------------


async def test_many_streams_on_one_connection(api, h2, keys, devices):
    device = devices(api, "quic", topic=TOPIC)
    token = await device.welcome()
    n = 200
    responses = await asyncio.gather(*(push(h2, keys, token, {"n": i}) for i in range(n)))
    assert [r.status_code for r in responses] == [200] * n
    ids = {r.headers["apns-id"] for r in responses}
    got = {(await device.next("push"))["id"] for _ in range(n)}
    assert got == ids
    assert api.metrics.value("lpgw_api_requests_total", http="2") == n


async def test_many_streams_by_prior_knowledge(api, keys, devices):
    device = devices(api, "tls", topic=TOPIC)
    token = await device.welcome()
    auth = f"bearer {keys.token()}"
    results = await node_h2(api, [{"path": f"/3/device/{token}", "body": json.dumps({"n": i}),
                                   "headers": {"authorization": auth}} for i in range(100)])
    assert [r["status"] for r in results] == [200] * 100
    got = [(await device.next("push"))["payload"]["n"] for _ in range(100)]
    assert sorted(got) == list(range(100))


async def test_a_crash_right_after_200_still_delivers(tmp_path, keys):
    gp = GatewayProcess(tmp_path / "state", free_port("127.0.0.1"),
                        {"api": {"host": "127.0.0.1", "port": free_port("127.0.0.1"),
                                 "providers": keys.providers()}})
    gp.start()
    install = str(uuid.uuid4())
    events: asyncio.Queue = asyncio.Queue()

    def device() -> tuple[DeviceClient, asyncio.Task]:
        c = DeviceClient(DeviceOptions(host="127.0.0.1", port=gp.port, pin=gp.pin,
                                       transport="tls", topic=TOPIC, install_id=install,
                                       ack=False, reconnect=False), events.put_nowait)
        return c, asyncio.create_task(c.run())

    client, task = device()
    while (event := await asyncio.wait_for(events.get(), 10))["event"] != "welcome":
        pass
    token = event["token"]
    client.stop()
    await task
    ctx = ssl.create_default_context(cafile=str(gp.state / "gateway.crt"))
    async with httpx.AsyncClient(http2=True, verify=ctx) as h:
        response = await h.post(f"https://localhost:{gp.runtime['api_port']}/3/device/{token}",
                                headers={"authorization": f"bearer {keys.token()}"},
                                content=b'{"aps":{"alert":"survive"}}')
    assert response.status_code == 200
    gp.kill(signal.SIGKILL)  # right after the 200
    gp.start()
    try:
        client, task = device()
        while (event := await asyncio.wait_for(events.get(), 10))["event"] != "push":
            pass
        assert event["id"] == response.headers["apns-id"]
        assert event["payload"] == {"aps": {"alert": "survive"}}
        client.stop()
        await task
    finally:
        gp.kill(signal.SIGTERM)


# --- lpgw's own endpoints ------------------------------------------------------------


async def test_bind_list_and_unbind_users(api, h2, keys, devices):
    device = devices(api, "tls", topic=TOPIC)
    token = await device.welcome()
    other = devices(api, "quic", topic="com.example.other")
    other_token = await other.welcome()
    provider = {"authorization": f"bearer {keys.token()}"}
    admin = {"authorization": f"bearer {api.admin_token}"}

    bound = await h2.put(f"/v1/devices/{token}/user", headers=provider,
                         json={"user": "nurse.alice"})
    assert bound.status_code == 200 and bound.json()["user"] == "nurse.alice"
    one = (await h2.get(f"/v1/devices/{token}", headers=provider)).json()
    assert one["user"] == "nurse.alice" and one["connected"] == "tls" and one["queued"] == 0

    mine = (await h2.get("/v1/devices", headers=provider)).json()["devices"]
    assert [d["token"] for d in mine] == [token]  # a key sees only its topics
    everyone = (await h2.get("/v1/devices", headers=admin)).json()["devices"]
    assert {d["token"] for d in everyone} == {token, other_token}
    alice = (await h2.get("/v1/devices?user=nurse.alice", headers=admin)).json()["devices"]
    assert [d["token"] for d in alice] == [token]
    hidden = await h2.get(f"/v1/devices/{other_token}", headers=provider)
    assert hidden.status_code == 400 and hidden.json()["reason"] == "BadDeviceToken"

    # a reconnect without an assertion keeps the binding
    await device.stop()
    again = devices(api, "tls", topic=TOPIC, install_id=device.client.o.install_id)
    await again.welcome()
    assert (await h2.get(f"/v1/devices/{token}", headers=provider)).json()["user"] == "nurse.alice"

    gone = await h2.delete(f"/v1/devices/{token}/user", headers=provider)
    assert gone.status_code == 204
    assert (await h2.get(f"/v1/devices/{token}", headers=provider)).json()["user"] is None

    bad = await h2.put(f"/v1/devices/{token}/user", headers=provider, content=b"{nope")
    assert bad.status_code == 400 and bad.json()["reason"] == "BadPayload"
    anonymous = await h2.get("/v1/devices")
    assert anonymous.status_code == 403


async def test_status_and_metrics(api, h2, keys, devices):
    device = devices(api, "quic", topic=TOPIC)
    token = await device.welcome()
    assert (await push(h2, keys, token)).status_code == 200
    await device.next("push")
    status = await h2.get("/status", headers={"authorization": f"bearer {api.admin_token}"})
    body = status.json()
    assert body["devices"]["connected"]["quic"] == 1 and body["api"]["port"] == api.api_port
    assert (await h2.get("/status")).status_code == 403
    metrics = (await h2.get("/metrics")).text
    for name in ("lpgw_devices_connected{transport=\"quic\"} 1.0",
                 "lpgw_handshakes_total", "lpgw_pushes_accepted_total{push_type=\"alert\"} 1.0",
                 "lpgw_pushes_delivered_total", "lpgw_pushes_expired_total",
                 "lpgw_pushes_dropped_total", "lpgw_delivery_latency_seconds_bucket",
                 "lpgw_api_errors_total", "lpgw_heartbeat_timeouts_total"):
        assert name in metrics, name


async def test_a_provider_key_sees_and_changes_only_its_own_apps(api, h2, keys, devices):
    """Key C (com.example.other only) next to key A (TOPIC): neither reads nor binds the
    other's devices, and /status shows a key its own apps' devices, not the site's calls."""
    mine = devices(api, "tls", topic="com.example.other")
    mine_token = await mine.welcome()
    theirs = devices(api, "quic", topic=TOPIC)
    theirs_token = await theirs.welcome()
    c = {"authorization": f"bearer {keys.token('KEYCCCCCCC')}"}
    admin = {"authorization": f"bearer {api.admin_token}"}

    for method, path, body in (("GET", "", None), ("PUT", "/user", {"user": "nurse"}),
                               ("DELETE", "/user", None)):
        refused = await h2.request(method, f"/v1/devices/{theirs_token}{path}", headers=c,
                                   json=body)
        assert (refused.status_code, refused.json()["reason"]) == (400, "BadDeviceToken")
    assert (await h2.get(f"/v1/devices/{theirs_token}", headers=admin)).json()["user"] is None
    listed = (await h2.get("/v1/devices", headers=c)).json()["devices"]
    assert [d["token"] for d in listed] == [mine_token]

    scoped = (await h2.get("/status", headers=c)).json()
    assert scoped["topics"] == ["com.example.other"]
    assert scoped["devices"] == {"connected": {"quic": 0, "tls": 1}, "known": 1}
    assert "sip" not in scoped and "storage" not in scoped and "call_actions" not in scoped
    full = (await h2.get("/status", headers=admin)).json()
    assert full["devices"]["connected"] == {"quic": 1, "tls": 1} and "storage" in full


# --- bad connections -----------------------------------------------------------------


async def test_a_silent_tcp_client_is_closed(gateway_factory, keys):
    gw = await gateway_factory(api={"host": "127.0.0.1", "port": 0, "handshake_timeout": 0.5})
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.api_port)
    async with asyncio.timeout(3):
        assert await reader.read() == b""
    writer.close()
    assert gw.metrics.value("lpgw_api_errors_total", reason="tls_handshake") == 1


async def test_garbage_after_the_preface_closes_only_that_connection(api, h2):
    ctx = tls_context(api)
    ctx.set_alpn_protocols(["h2"])
    reader, writer = await asyncio.open_connection("localhost", api.api_port, ssl=ctx)
    data_on_stream_0 = b"\x00\x00\x04\x00\x00\x00\x00\x00\x00abcd"  # a protocol error
    writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + data_on_stream_0)
    async with asyncio.timeout(3):
        while await reader.read(4096):
            pass
    writer.close()
    assert api.metrics.value("lpgw_api_errors_total", reason="http2_protocol_error") == 1
    assert (await h2.get("/v1/health")).status_code == 200


@pytest.mark.parametrize(("headers", "body", "reason"), [
    ({"apns-expiration": "²".encode()}, b'{"a":1}', "BadExpirationDate"),  # not ASCII
    ({}, b'{"a": NaN}', "BadPayload"),
    ({}, b'{"a": Infinity}', "BadPayload"),
])
async def test_lookalike_values_are_refused(api, h2, keys, devices, headers, body, reason):
    device = devices(api, "quic", topic=TOPIC)
    token = await device.welcome()
    response = await h2.post(f"/3/device/{token}", content=body,
                             headers={"authorization": f"bearer {keys.token()}", **headers})
    assert (response.status_code, response.json()["reason"]) == (400, reason)


async def test_oversize_body_in_one_frame_spares_the_other_streams(api, h2, keys, devices):
    device = devices(api, "quic", topic=TOPIC)
    token = await device.welcome()
    big = push(h2, keys, token, b'{"x": "' + b"y" * 9000 + b'"}')
    small = [push(h2, keys, token, {"n": i}) for i in range(5)]
    responses = await asyncio.gather(big, *small)
    assert responses[0].status_code == 413
    assert [r.status_code for r in responses[1:]] == [200] * 5


async def test_user_query_is_url_decoded(api, h2, keys, devices):
    device = devices(api, "quic", topic=TOPIC)
    token = await device.welcome()
    auth = {"authorization": f"bearer {keys.token()}"}
    await h2.put(f"/v1/devices/{token}/user", headers=auth, json={"user": "alice@ward 3"})
    found = await h2.get("/v1/devices", params={"user": "alice@ward 3"}, headers=auth)
    assert [d["token"] for d in found.json()["devices"]] == [token]


async def test_port_0_on_every_address_is_one_port_for_ipv4_and_ipv6(gateway_factory):
    """asyncio binds "::" as two sockets; with port 0 each would get its own number, and a
    client on the other family would be refused (the self-test once was, half the time)."""
    gw = await gateway_factory(api={"host": "::", "port": 0})
    ports = {s.getsockname()[1] for s in gw._api.sockets}
    assert len(gw._api.sockets) == 2 and ports == {gw.api_port}
    for host in ("127.0.0.1", "::1"):
        _, writer = await asyncio.open_connection(host, gw.api_port)
        writer.close()


def test_huffman_decoding_is_memoised_and_still_refuses_garbage():
    """The same :path decoded twice costs one Huffman decode; bad input still raises."""
    import hpack
    import hpack.hpack

    from gateway.api import server  # noqa: F401  (installs the memo)

    path = "/3/device/" + uuid.uuid4().hex * 2
    block = hpack.Encoder().encode([(":path", path)], huffman=True)
    hits = hpack.hpack.decode_huffman.cache_info().hits
    for _ in range(2):
        assert hpack.Decoder().decode(block) == [(":path", path)]
    assert hpack.hpack.decode_huffman.cache_info().hits == hits + 1
    with pytest.raises(hpack.HPACKDecodingError):
        hpack.hpack.decode_huffman(b"\xff\xff\xff\xff")


async def test_the_api_and_lpgw_send_keep_the_same_push_rules(api, h2, keys, devices):
    """One set of rules (core/push_rules): a background push at priority 10 and a push id
    that is not 8-4-4-4-12 are refused the same way through the API and the control socket,
    and a background push without a priority goes at 5 through both."""
    device = devices(api, "tls", push_types=("alert", "background"))
    token = await device.welcome()
    cases = [({"push_type": "background", "priority": 10}, "BadPriority"),
             ({"push_id": "0123456789abcdef0123456789abcdef"}, "BadMessageId")]
    for fields, reason in cases:
        via_control = await send(api, token, {"aps": {"content-available": 1}}, **fields)
        assert not via_control["ok"] and reason in json.dumps(via_control), via_control
        headers = {"apns-push-type": fields.get("push_type", "alert"),
                   **({"apns-priority": "10"} if "priority" in fields else {}),
                   **({"apns-id": fields["push_id"]} if "push_id" in fields else {})}
        via_api = await push(h2, keys, token, {"aps": {"content-available": 1}}, **{
            k.replace("-", "_"): v for k, v in headers.items()})
        assert (via_api.status_code, via_api.json()["reason"]) == (400, reason)
    assert (await send(api, token, {"aps": {"content-available": 1}},
                       push_type="background"))["ok"]
    assert (await device.next("push"))["priority"] == 5
    answer = await push(h2, keys, token, {"aps": {"content-available": 1}},
                        apns_push_type="background")
    assert answer.status_code == 200
    assert (await device.next("push"))["priority"] == 5


async def test_the_api_and_lpgw_send_keep_the_same_topic_rules(api, h2, keys, devices):
    """APNs' topic rule (a voip push goes to '<bundle id>.voip', an alert push not there)
    is core/push_rules.app_topic, for the API and the control socket alike. Before,
    `lpgw send` compared the topic with the device's as given: a voip push named with the
    bundle id alone was sent, one named '<bundle id>.voip' refused."""
    device = devices(api, "tls", topic=TOPIC, push_types=("alert", "voip"))
    token = await device.welcome()
    call = {"call": {"id": "c1"}}
    for topic, push_type, reason in [(TOPIC, "voip", "BadTopic"),
                                     (f"{TOPIC}.voip", "alert", "DeviceTokenNotForTopic")]:
        via_control = await send(api, token, call, push_type=push_type, topic=topic)
        assert (via_control["ok"], via_control["reason"]) == (False, reason), via_control
    via_api = await push(h2, keys, token, call, apns_push_type="voip", apns_topic=TOPIC)
    assert (via_api.status_code, via_api.json()["reason"]) == (400, "BadTopic")
    assert (await send(api, token, call, push_type="voip", topic=f"{TOPIC}.voip"))["ok"]
    assert (await device.next("push"))["push_type"] == "voip"
    answer = await push(h2, keys, token, call, apns_push_type="voip", apns_topic=f"{TOPIC}.voip")
    assert answer.status_code == 200
    assert (await device.next("push"))["push_type"] == "voip"
