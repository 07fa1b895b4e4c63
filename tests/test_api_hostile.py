"""The provider API against bad values and bugs: the documented answer, on that stream alone.

Real HTTP/2 clients (httpx, and h2's client state machine by hand for what httpx will not
send) against a real gateway. A bug no input can cause is made by replacing one router
method on the running gateway; everything else is real input.
"""

from __future__ import annotations

import asyncio
import json
import resource
import signal
import ssl
import time
import uuid
from collections.abc import Callable
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import httpx
import jwt
import pytest

from gateway import faults
from gateway.client import DeviceClient, DeviceOptions
from gateway.core.assertions import AssertionPolicy, AssertionRejected, verify_assertion
from gateway.service import free_port
from tests.conftest import GatewayProcess
from tests.test_api import TOPIC, Keys, node_h2, tls_context

MIXED_CASE_ID = "0A1b2C3d-4E5f-6A7b-8C9d-0E1f2A3b4C5d"


@pytest.fixture
def keys(tmp_path) -> Keys:
    return Keys(tmp_path)


@pytest.fixture
async def api(gateway_factory, keys):
    """A gateway whose API knows test_api's provider keys."""
    return await gateway_factory(api={"host": "127.0.0.1", "port": 0,
                                      "providers": keys.providers()})


@pytest.fixture
async def client(api):
    async with httpx.AsyncClient(http2=True, verify=tls_context(api),
                                 base_url=f"https://localhost:{api.api_port}") as made:
        yield made


def nested(depth: int, inner: str = "1") -> bytes:
    return ("[" * depth + inner + "]" * depth).encode()


def signed(keys: Keys, payload: bytes, kid: str = "KEYAAAAAAA") -> str:
    """A provider JWT over payload bytes as they are: PyJWT will not encode NaN or a list
    iss, but an app server's library (or an attacker) can."""
    return jwt.api_jws.encode(payload, keys.private[kid], algorithm="ES256",
                              headers={"kid": kid})


def auth(keys: Keys) -> dict[str, str]:
    return {"authorization": f"bearer {keys.token()}"}


class RawH2:
    """An HTTP/2 client by hand (h2's client state machine over TLS): for bytes httpx will
    not send, PINGs, and to watch a connection's GOAWAY."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_outbound_headers=False))
        self.conn.initiate_connection()
        self.answers: dict[int, dict[str, Any]] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.eof = False
        self._send()

    @classmethod
    async def open(cls, gw) -> RawH2:
        ctx = tls_context(gw)
        ctx.set_alpn_protocols(["h2"])
        return cls(*await asyncio.open_connection("localhost", gw.api_port, ssl=ctx))

    def post(self, path: str, headers: list[tuple[str, bytes]], body: bytes) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream_id, [
            (b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"localhost"),
            (b":path", path.encode()), *((n.encode(), v) for n, v in headers)])
        self.conn.send_data(stream_id, body, end_stream=True)
        self.answers[stream_id] = {"headers": {}, "body": b"", "ended": False}
        self._send()
        return stream_id

    def ping(self, data: bytes) -> None:
        self.conn.ping(data)
        self._send()

    async def until(self, done: Callable[[], bool], timeout: float = 5) -> None:
        async with asyncio.timeout(timeout):
            while not done() and not self.eof:
                data = await self.reader.read(65536)
                if not data:
                    self.eof = True
                    break
                for event in self.conn.receive_data(data):
                    self._event(event)
                self._send()

    def ended(self, *stream_ids: int) -> Callable[[], bool]:
        return lambda: all(self.answers[s]["ended"] for s in stream_ids)

    def answer(self, stream_id: int) -> tuple[int, dict[str, str], dict]:
        got = self.answers[stream_id]
        return int(got["headers"][":status"]), got["headers"], json.loads(got["body"] or "{}")

    def close(self) -> None:
        self.writer.close()

    def _event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            self.answers[event.stream_id]["headers"] = {
                n.decode(): v.decode("latin-1") for n, v in event.headers}
        elif isinstance(event, h2.events.DataReceived):
            self.answers[event.stream_id]["body"] += event.data
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
            self.answers[event.stream_id]["ended"] = True
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = event

    def _send(self) -> None:
        if data := self.conn.data_to_send():
            self.writer.write(data)


# --- point 3: bad values get the documented answer ---------------------------------------


async def test_deeply_nested_json_is_bad_payload_not_a_500(api, client, keys, devices):
    device = devices(api, "tls", topic=TOPIC)
    token = await device.welcome()
    deep = await client.post(f"/3/device/{token}", headers=auth(keys),
                                content=b'{"a": ' + nested(2000) + b"}")
    assert (deep.status_code, deep.json()["reason"]) == (400, "BadPayload"), deep.text
    assert "deeper than 64 levels" in deep.json()["message"]
    one_too_many = await client.post(f"/3/device/{token}", headers=auth(keys),
                                        content=b'{"a": ' + nested(64) + b"}")
    assert one_too_many.json()["reason"] == "BadPayload"
    assert api.store.count_pending(token) == 0
    at_the_limit = await client.post(f"/3/device/{token}", headers=auth(keys),
                                        content=b'{"a": ' + nested(63) + b', "b": "[[[[[["}')
    assert at_the_limit.status_code == 200  # 64 levels, and brackets in strings do not count
    assert (await device.next("push"))["payload"]["b"] == "[[[[[["
    bind = await client.put(f"/v1/devices/{token}/user", headers=auth(keys),
                               content=b'{"user": ' + nested(3000, '"x"') + b"}")
    assert (bind.status_code, bind.json()["reason"]) == (400, "BadPayload"), bind.text
    assert api.metrics.value("lpgw_api_errors_total", reason="InternalServerError") == 0


@pytest.mark.parametrize("body", [b'{"a": 1e999}', b'{"a": [-1.5e400]}'])
async def test_a_number_out_of_range_is_bad_payload(api, client, keys, devices, body):
    """Python reads 1e999 as Infinity; it was accepted (200) and reached the phone as a
    frame that is not JSON, and the push was lost."""
    device = devices(api, "tls", topic=TOPIC)
    token = await device.welcome()
    response = await client.post(f"/3/device/{token}", headers=auth(keys), content=body)
    assert (response.status_code, response.json()["reason"]) == (400, "BadPayload")
    assert "out of range" in response.json()["message"]
    assert api.store.count_pending(token) == 0


async def test_provider_token_claims_of_the_wrong_type_are_invalid(api, client, keys,
                                                                    devices):
    device = devices(api, "tls", topic=TOPIC)
    token = await device.welcome()
    now = int(time.time())
    team = '"ABCDE12345"'
    bad_claims = [
        f'{{"iss": ["ABCDE12345"], "iat": {now}}}',  # a list: once a TypeError, a 500
        f'{{"iss": {{"team": "ABCDE12345"}}, "iat": {now}}}',
        f'{{"iss": 12345, "iat": {now}}}',
        f'{{"iss": {team}, "iat": NaN}}',  # NaN compares false to every time: never stale
        f'{{"iss": {team}, "iat": Infinity}}',
        f'{{"iss": {team}, "iat": -Infinity}}',
        f'{{"iss": {team}, "iat": 1e300}}',
        f'{{"iss": {team}, "iat": 1{"0" * 400}}}',  # once an OverflowError, a 500
        f'{{"iss": {team}, "iat": -5}}',
        f'{{"iss": {team}, "iat": "{now}"}}',
        f'{{"iss": {team}, "iat": true}}',
        f'{{"iss": {team}, "iat": {now}, "exp": NaN}}',
        f'{{"iss": {team}, "iat": {now}, "exp": 1e300}}',
        f'{{"iss": {team}, "iat": {now}, "exp": "never"}}',
        f'{{"iss": {team}, "iat": {now}, "nbf": Infinity}}',
        '{"iss": ' + team + ', "iat": ' + str(now) + ', "x": ' + nested(3000).decode() + "}",
    ]
    for claims in bad_claims:
        jwt_token = signed(keys, claims.encode())
        for request in (client.post(f"/3/device/{token}", content=b'{"a": 1}',
                                       headers={"authorization": f"bearer {jwt_token}"}),
                        client.get("/v1/devices",
                                      headers={"authorization": f"bearer {jwt_token}"})):
            response = await request
            assert (response.status_code, response.json()["reason"]) == \
                (403, "InvalidProviderToken"), (claims[:80], response.text)
    assert api.store.count_pending(token) == 0
    good = signed(keys, f'{{"iss": {team}, "iat": {now}, "exp": {now + 3600}}}'.encode())
    response = await client.post(f"/3/device/{token}", content=b'{"a": 1}',
                                    headers={"authorization": f"bearer {good}"})
    assert response.status_code == 200  # a well-formed exp is accepted (not enforced)


def hs256(payload: str, secret: bytes) -> str:
    return jwt.api_jws.encode(payload.encode(), secret, algorithm="HS256")


@pytest.mark.parametrize("claims", [
    '{"sub": "alice", "exp": NaN}',  # was accepted: NaN never expires
    '{"sub": "alice", "exp": Infinity}',
    '{"sub": "alice", "exp": 1e300}',
    '{"sub": "alice", "exp": 1' + "0" * 400 + "}",
    '{"sub": "alice", "exp": %d, "nbf": NaN}',
    '{"sub": "alice", "exp": %d, "nbf": "tomorrow"}',  # was ignored
    '{"sub": "alice", "exp": %d, "iat": -Infinity}',
])
def test_assertion_times_must_be_real_times(claims):
    secret = b"s" * 32
    token = hs256(claims.replace("%d", str(int(time.time()) + 600)), secret)
    with pytest.raises(AssertionRejected, match="seconds since 1970"):
        verify_assertion(AssertionPolicy(hs256_secret=secret), token, time.time())


async def test_a_device_with_a_never_expiring_assertion_is_refused(gateway_factory, devices,
                                                                   tmp_path):
    secret = b"k" * 40
    secret_file = tmp_path / "assertion.secret"
    secret_file.write_bytes(secret)
    gw = await gateway_factory(assertions={"hs256_secret_file": str(secret_file)})
    refused = devices(gw, "tls", reconnect=False,
                      assertion=hs256('{"sub": "nurse.alice", "exp": NaN}', secret))
    bye = await refused.next("disconnected")
    assert bye["reason"] == "unauthorized" and "seconds since 1970" in bye["message"]
    fine = devices(gw, "tls", reconnect=False, assertion=hs256(
        f'{{"sub": "nurse.bob", "exp": {int(time.time()) + 600}}}', secret))
    assert (await fine.next("welcome"))["user"] == "nurse.bob"


# --- point 8: what APNs clients rely on ---------------------------------------------------


async def test_every_answer_echoes_apns_id_as_sent(api, client, keys, devices,
                                                   gateway_factory, tmp_path):
    device = devices(api, "quic", topic=TOPIC)
    token = await device.welcome()
    mine = {"apns-id": MIXED_CASE_ID}

    ok = await client.post(f"/3/device/{token}", headers={**auth(keys), **mine},
                              content=b'{"a": 1}')
    assert ok.status_code == 200 and ok.headers["apns-id"] == MIXED_CASE_ID
    assert (await device.next("push"))["id"] == MIXED_CASE_ID.lower()  # canonical for phones

    too_large = await client.post(f"/3/device/{token}", headers={**auth(keys), **mine},
                                     content=b'{"x": "' + b"y" * 9000 + b'"}')
    assert too_large.status_code == 413  # answered early, before the body is all read
    assert too_large.headers.get("apns-id") == MIXED_CASE_ID

    for path, headers, status in [
        (f"/3/device/{token}", {"apns-topic": "com.example.nope"}, 400),
        (f"/3/device/{token}", {"authorization": "Basic eDp5"}, 403),
        (f"/3/devices/{token}", {}, 404),
    ]:
        refused = await client.post(path, content=b'{"a": 1}',
                                       headers={**auth(keys), **mine, **headers})
        assert refused.status_code == status, refused.text
        assert refused.headers.get("apns-id") == MIXED_CASE_ID, (path, headers)
    not_a_uuid = await client.post(f"/3/device/{token}", content=b'{"a": 1}',
                                      headers={**auth(keys), "apns-id": "Not-A-UUID"})
    assert not_a_uuid.json()["reason"] == "BadMessageId"
    assert not_a_uuid.headers.get("apns-id") == "Not-A-UUID"

    api.router.draining = True
    shutdown = await client.post(f"/3/device/{token}", headers={**auth(keys), **mine},
                                    content=b'{"a": 1}')
    assert shutdown.status_code == 503 and shutdown.headers["apns-id"] == MIXED_CASE_ID
    api.router.draining = False

    async with httpx.AsyncClient(http2=False, verify=tls_context(api)) as h1:
        url = f"https://localhost:{api.api_port}"
        big = await h1.post(f"{url}/v1/devices/{token}/user", content=b"x" * 9000,
                            headers={**auth(keys), **mine})
        assert big.status_code == 413 and big.headers.get("apns-id") == MIXED_CASE_ID
        wrong_http = await h1.post(f"{url}/3/device/{token}", content=b'{"a": 1}',
                                   headers={**auth(keys), **mine})
        assert wrong_http.status_code == 505 and wrong_http.headers["apns-id"] == MIXED_CASE_ID

    limited = await gateway_factory(tmp_path / "limited", api={
        "host": "127.0.0.1", "port": 0, "rate_limit": 0.001, "rate_burst": 1,
        "providers": keys.providers()})
    async with httpx.AsyncClient(http2=True, verify=tls_context(limited),
                                 base_url=f"https://localhost:{limited.api_port}") as client:
        codes = []
        for _ in range(2):
            r = await client.post(f"/3/device/{token}", headers={**auth(keys), **mine},
                                  content=b'{"a": 1}')
            codes.append((r.status_code, r.headers.get("apns-id")))
        assert codes[1] == (429, MIXED_CASE_ID)


async def test_nghttp2_by_prior_knowledge_matches_every_answer_by_apns_id(api, keys, devices):
    """Node's nghttp2 without ALPN (as aioapns and pushy connect): several requests at once
    on one connection, each answer found by its apns-id, the early 413 too."""
    device = devices(api, "tls", topic=TOPIC)
    token = await device.welcome()
    ids = [str(uuid.uuid4()).upper() for _ in range(3)]
    bearer = f"bearer {keys.token()}"
    results = await node_h2(api, [
        {"path": f"/3/device/{token}", "body": '{"x": "' + "y" * 9000 + '"}',
         "headers": {"authorization": bearer, "apns-id": ids[0]}},
        {"path": f"/3/devices/{token}", "body": '{"a": 1}',
         "headers": {"authorization": bearer, "apns-id": ids[1]}},
        {"path": f"/3/device/{token}", "body": '{"a": 1}',
         "headers": {"authorization": bearer, "apns-id": ids[2]}},
    ])
    assert [(r.get("status"), r.get("headers", {}).get("apns-id")) for r in results] == [
        (413, ids[0]), (404, ids[1]), (200, ids[2])], results


async def test_only_3_device_token_is_the_push_path(api, client, keys, devices):
    device = devices(api, "quic", topic=TOPIC)
    token = await device.welcome()
    for path in (f"/3/devices/{token}", f"/3/device/{token}/extra", f"/3/deviceX/{token}",
                 f"/3/device{token}"):
        response = await client.post(path, headers=auth(keys), content=b'{"a": 1}')
        assert (response.status_code, response.json()["reason"]) == (404, "BadPath"), path
    for path in ("/3/device", "/3/device/"):
        response = await client.post(path, headers=auth(keys), content=b'{"a": 1}')
        assert response.json()["reason"] == "MissingDeviceToken"
    assert api.store.count_pending(token) == 0
    async with httpx.AsyncClient(http2=False, verify=tls_context(api)) as h1:
        response = await h1.post(f"https://localhost:{api.api_port}/3/devices/{token}",
                                 headers=auth(keys), content=b'{"a": 1}')
        assert (response.status_code, response.json()["reason"]) == (404, "BadPath")


async def test_upper_case_tokens_work_and_the_text_says_so(api, client, keys, devices):
    device = devices(api, "quic", topic=TOPIC)
    token = await device.welcome()
    pushed = await client.post(f"/3/device/{token.upper()}", headers=auth(keys),
                                  content=b'{"a": 1}')
    assert pushed.status_code == 200
    assert (await client.get(f"/v1/devices/{token.upper()}", headers=auth(keys))).json()[
        "token"] == token
    bad = await client.get(f"/v1/devices/{'g' * 64}", headers=auth(keys))
    assert bad.json() == {"reason": "BadDeviceToken",
                          "message": "a device token is 64 hex characters"}


async def test_a_push_that_cannot_be_stored_gets_503_with_its_apns_id(tmp_path, keys):
    """The database's disk refuses writes (RLIMIT_FSIZE on the gateway process: the WAL
    cannot grow): the group commit fails, and each push in it is answered 503
    ServiceUnavailable saying it was not stored, not 500; the gateway goes on answering."""
    limit = 300_000
    gp = GatewayProcess(tmp_path / "state", free_port("127.0.0.1"),
                        {"api": {"host": "127.0.0.1", "port": free_port("127.0.0.1"),
                                 "providers": keys.providers()}})
    gp.start(preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    try:
        events: asyncio.Queue = asyncio.Queue()
        phone = DeviceClient(DeviceOptions(host="127.0.0.1", port=gp.port, pin=gp.pin,
                                           transport="tls", topic=TOPIC, ack=False),
                             events.put_nowait)
        task = asyncio.create_task(phone.run())
        while (event := await asyncio.wait_for(events.get(), 10))["event"] != "welcome":
            pass
        ctx = ssl.create_default_context(cafile=str(gp.state / "gateway.crt"))
        async with httpx.AsyncClient(http2=True, verify=ctx, base_url=(
                f"https://localhost:{gp.runtime['api_port']}")) as client:
            answers = []
            for i in range(200):
                apns_id = str(uuid.uuid4()).upper()
                r = await client.post(f"/3/device/{event['token']}", content=json.dumps(
                    {"i": i, "pad": "y" * 3000}).encode(), headers={
                    "authorization": f"bearer {keys.token()}", "apns-id": apns_id})
                answers.append((r.status_code, r.headers.get("apns-id") == apns_id))
                if r.status_code != 200:
                    break
            assert answers[-1] == (503, True), answers
            body = r.json()
            assert body["reason"] == "ServiceUnavailable"
            assert "not stored" in body["message"]
            assert (await client.get("/v1/health")).json() == {"status": "ok"}
        phone.stop()
        await task
    finally:
        gp.kill(signal.SIGTERM)


# --- point 1: a bug costs the one stream or connection it happened on --------------------


async def test_a_bug_in_routing_one_request_answers_it_500(api, client, keys, devices,
                                                          monkeypatch, caplog):
    """A bug below Router.handle: that request gets 500 with its apns-id, counted, and
    logged without the device token (8 characters at most) or the JWT."""
    device = devices(api, "quic", topic=TOPIC)
    token = await device.welcome()

    def broken(req, path, now):
        raise RuntimeError("a bug")

    monkeypatch.setattr(api.router, "_push", broken)
    faults.reset_log_limits()
    jwt_token = keys.token()
    response = await client.post(f"/3/device/{token}", content=b'{"a": 1}', headers={
        "authorization": f"bearer {jwt_token}", "apns-id": MIXED_CASE_ID})
    assert (response.status_code, response.json()["reason"]) == (500, "InternalServerError")
    assert response.headers["apns-id"] == MIXED_CASE_ID
    assert api.metrics.value("lpgw_internal_errors_total", where="api_request") == 1
    assert f"POST /3/device/{token[:8]}…" in caplog.text
    assert token[:9] not in caplog.text and jwt_token.split(".")[1] not in caplog.text


async def test_a_bug_on_one_http2_stream_costs_that_stream_alone(api, client, keys, devices,
                                                                monkeypatch):
    device = devices(api, "quic", topic=TOPIC)
    token = await device.welcome()
    handle = api.router.handle

    def handle_or_break(req, now):
        if dict(req.headers).get("apns-collapse-id") == "boom":
            raise RuntimeError("a bug no input should reach")
        return handle(req, now)

    monkeypatch.setattr(api.router, "handle", handle_or_break)
    requests = [client.post(f"/3/device/{token}", content=json.dumps({"n": i}).encode(),
                               headers={**auth(keys), "apns-id": str(uuid.uuid4())})
                for i in range(5)]
    requests.insert(2, client.post(f"/3/device/{token}", content=b'{"a": 1}', headers={
        **auth(keys), "apns-id": MIXED_CASE_ID, "apns-collapse-id": "boom"}))
    answers = await asyncio.gather(*requests)
    assert [r.status_code for r in answers] == [200, 200, 500, 200, 200, 200]
    assert answers[2].json()["reason"] == "InternalServerError"
    assert answers[2].headers["apns-id"] == MIXED_CASE_ID
    after = await client.post(f"/3/device/{token}", headers=auth(keys), content=b'{"a": 2}')
    assert after.status_code == 200 and after.http_version == "HTTP/2"
    assert api.metrics.value("lpgw_internal_errors_total", where="api_http2_stream") == 1
    async with httpx.AsyncClient(http2=True, verify=tls_context(api)) as other:
        health = await other.get(f"https://localhost:{api.api_port}/v1/health")
        assert health.status_code == 200
    got = {(await device.next("push"))["payload"].get("n") for _ in range(6)}
    assert got == {0, 1, 2, 3, 4, None}


async def test_a_bug_in_http1_closes_that_connection_alone(api, keys, monkeypatch):
    handle = api.router.handle

    def handle_or_break(req, now):
        if ("x-test", "boom") in req.headers and not req.http2:
            raise RuntimeError("a bug no input should reach")
        return handle(req, now)

    monkeypatch.setattr(api.router, "handle", handle_or_break)
    url = f"https://localhost:{api.api_port}"
    async with httpx.AsyncClient(http2=False, verify=tls_context(api)) as victim, \
            httpx.AsyncClient(http2=False, verify=tls_context(api)) as bystander:
        assert (await bystander.get(f"{url}/v1/health")).status_code == 200
        broken = await victim.get(f"{url}/v1/health",
                                  headers={"apns-id": MIXED_CASE_ID, "x-test": "boom"})
        assert (broken.status_code, broken.json()["reason"]) == (500, "InternalServerError")
        assert broken.headers["connection"] == "close"
        assert broken.headers["apns-id"] == MIXED_CASE_ID
        assert (await bystander.get(f"{url}/v1/health")).status_code == 200
    assert api.metrics.value("lpgw_internal_errors_total", where="api_http1") == 1


async def test_a_header_value_that_is_not_utf8_costs_only_its_stream(api, keys, devices):
    """Bytes 0x80-0xff are legal in an HTTP/2 field value. Decoded inside h2 they raised
    out of its state machine and cost every stream on the connection."""
    device = devices(api, "quic", topic=TOPIC)
    token = await device.welcome()
    client = await RawH2.open(api)
    try:
        bearer = f"bearer {keys.token()}".encode()
        odd = client.post(f"/3/device/{token}", [("authorization", bearer),
                                                 ("apns-topic", TOPIC.encode() + b"\xff"),
                                                 ("apns-id", MIXED_CASE_ID.encode())],
                          b'{"a": 1}')
        fine = client.post(f"/3/device/{token}", [("authorization", bearer)], b'{"b": 2}')
        await client.until(client.ended(odd, fine))
        status, headers, body = client.answer(odd)
        assert (status, body["reason"]) == (400, "TopicDisallowed")
        assert headers["apns-id"] == MIXED_CASE_ID
        assert client.answer(fine)[0] == 200 and client.goaway is None
    finally:
        client.close()
    assert (await device.next("push"))["payload"] == {"b": 2}


async def test_a_failure_inside_the_h2_state_machine_closes_that_connection_alone(
        api, client, keys, devices, monkeypatch):
    """h2 raising something other than its ProtocolError (no known input does: the
    state machine is made to, for one marked PING) ends that connection with GOAWAY
    INTERNAL_ERROR, counted; the next connection is served."""
    receive = h2.connection.H2Connection.receive_data

    def receive_or_break(self, data):
        if b"lpgwboom" in data:
            raise RuntimeError("a bug inside h2")
        return receive(self, data)

    monkeypatch.setattr(h2.connection.H2Connection, "receive_data", receive_or_break)
    device = devices(api, "quic", topic=TOPIC)
    token = await device.welcome()
    victim = await RawH2.open(api)
    try:
        victim.ping(b"lpgwboom")
        await victim.until(lambda: victim.goaway is not None)
        assert victim.goaway.error_code == h2.errors.ErrorCodes.INTERNAL_ERROR
        await victim.until(lambda: False)  # then the gateway closes it
        assert victim.eof
    finally:
        victim.close()
    assert api.metrics.value("lpgw_internal_errors_total", where="api_http2") == 1
    response = await client.post(f"/3/device/{token}", headers=auth(keys), content=b'{"a": 1}')
    assert response.status_code == 200
