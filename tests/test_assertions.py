"""User assertions (JWTs from the app's backend): verify_assertion alone, then through admit."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.core.assertions import AssertionPolicy, AssertionRejected, verify_assertion
from gateway.core.delivery import Delivery, DeliverySettings, Refused
from gateway.core.metrics import Metrics
from gateway.protocol.messages import Hello
from gateway.store import Store
from tests.fakelink import Driven, FakeLink

NOW = 1_800_000_000.0
HS_SECRET = b"s" * 32
INSTALL = "5f0c6a1e-3b7d-4c2a-9e8f-1a2b3c4d5e6f"
TOPIC = "com.example.app"


def _pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


ES_KEY = ec.generate_private_key(ec.SECP256R1())
ES_PUBLIC_PEM = _pem(ES_KEY)
OTHER_ES_KEY = ec.generate_private_key(ec.SECP256R1())

HS = AssertionPolicy(hs256_secret=HS_SECRET)
ES = AssertionPolicy(es256_public_key=ES_PUBLIC_PEM)


def claims(**kw: Any) -> dict[str, Any]:
    c: dict[str, Any] = {"sub": "alice", "exp": int(NOW) + 60}
    for key, value in kw.items():
        if value is None:
            c.pop(key, None)
        else:
            c[key] = value
    return c


def hs256(secret: bytes = HS_SECRET, **kw: Any) -> str:
    return jwt.encode(claims(**kw), secret, algorithm="HS256")


def es256(key: ec.EllipticCurvePrivateKey = ES_KEY, **kw: Any) -> str:
    return jwt.encode(claims(**kw), key, algorithm="ES256")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def handmade(header: dict[str, Any], payload: dict[str, Any], hmac_key: bytes | None) -> str:
    """A JWT built by hand, for what PyJWT refuses to make (alg none, key confusion)."""
    head = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(payload).encode())
    if hmac_key is None:
        return head + "."
    sig = hmac.new(hmac_key, head.encode(), hashlib.sha256).digest()
    return head + "." + _b64(sig)


def rejected(policy: AssertionPolicy, token: str, now: float = NOW) -> str:
    with pytest.raises(AssertionRejected) as info:
        verify_assertion(policy, token, now)
    return str(info.value)


# --- verify_assertion ------------------------------------------------------------------


def test_policy_enabled_only_with_a_key():
    assert not AssertionPolicy().enabled
    assert not AssertionPolicy(required=True).enabled
    assert HS.enabled and ES.enabled


def test_no_key_configured_rejects():
    assert "no assertion key" in rejected(AssertionPolicy(), hs256())


def test_valid_hs256_gives_the_subject():
    assert verify_assertion(HS, hs256(), NOW) == "alice"


def test_valid_es256_gives_the_subject():
    assert verify_assertion(ES, es256(sub="bob"), NOW) == "bob"


def test_both_keys_configured_accept_both_algorithms():
    both = AssertionPolicy(hs256_secret=HS_SECRET, es256_public_key=ES_PUBLIC_PEM)
    assert verify_assertion(both, hs256(), NOW) == "alice"
    assert verify_assertion(both, es256(), NOW) == "alice"


def test_the_passed_clock_decides_not_the_wall_clock():
    # expired long ago by the wall clock, valid at the `now` passed in
    assert verify_assertion(HS, hs256(exp=1000), 900.0) == "alice"
    # valid by the wall clock, expired at the `now` passed in
    rejected(HS, hs256(exp=int(NOW)), NOW + 3600)


def test_expiry_allows_the_leeway_and_no_more():
    token = hs256(exp=int(NOW))
    assert verify_assertion(HS, token, NOW + 30) == "alice"  # leeway is 30 s by default
    assert "expired" in rejected(HS, token, NOW + 30.5)
    strict = AssertionPolicy(hs256_secret=HS_SECRET, leeway=0)
    assert verify_assertion(strict, token, NOW) == "alice"
    rejected(strict, token, NOW + 1)


def test_not_before_in_the_future_is_rejected():
    assert "not valid yet" in rejected(HS, hs256(nbf=int(NOW) + 120))
    assert verify_assertion(HS, hs256(nbf=int(NOW) + 20), NOW) == "alice"  # within leeway
    later = hs256(nbf=int(NOW) + 120, exp=int(NOW) + 600)
    assert verify_assertion(HS, later, NOW + 100) == "alice"


def test_wrong_hs256_secret_is_rejected():
    rejected(HS, hs256(secret=b"t" * 32))


def test_tampered_payload_is_rejected():
    head, _, sig = hs256().split(".")
    forged = _b64(json.dumps(claims(sub="root")).encode())
    rejected(HS, f"{head}.{forged}.{sig}")


def test_es256_signed_by_another_key_is_rejected():
    rejected(ES, es256(key=OTHER_ES_KEY))


def test_alg_none_is_rejected():
    token = handmade({"alg": "none", "typ": "JWT"}, claims(), None)
    assert "'none'" in rejected(HS, token)
    rejected(ES, token)


def test_hs256_is_rejected_when_only_es256_is_configured():
    assert "HS256" in rejected(ES, hs256())


def test_key_confusion_hs256_signed_with_the_public_key_is_rejected():
    token = handmade({"alg": "HS256", "typ": "JWT"}, claims(), ES_PUBLIC_PEM.encode())
    rejected(ES, token)


def test_es256_is_rejected_when_only_hs256_is_configured():
    rejected(HS, es256())


@pytest.mark.parametrize("alg", ["HS384", "HS512", "RS256", "ES384", "EdDSA"])
def test_other_algorithms_are_rejected(alg):
    token = handmade({"alg": alg, "typ": "JWT"}, claims(), HS_SECRET)
    rejected(HS, token)


@pytest.mark.parametrize("value", ["", "garbage", "a.b", "a.b.c", "x" * 100])
def test_not_a_jwt_is_rejected(value):
    rejected(HS, value)


@pytest.mark.parametrize("bad", [
    {"exp": None},
    {"sub": None},
    {"exp": "soon"},
    {"exp": True},
    {"sub": ""},
    {"sub": "u" * 129},
    {"sub": 42},
])
def test_bad_or_missing_claims_are_rejected(bad):
    token = handmade({"alg": "HS256", "typ": "JWT"}, claims(**bad), HS_SECRET)
    rejected(HS, token)


def test_subject_of_128_characters_is_accepted():
    assert verify_assertion(HS, hs256(sub="u" * 128), NOW) == "u" * 128


def test_audience_is_checked_when_configured():
    policy = AssertionPolicy(hs256_secret=HS_SECRET, audience="lpgw")
    assert verify_assertion(policy, hs256(aud="lpgw"), NOW) == "alice"
    assert verify_assertion(policy, hs256(aud=["other", "lpgw"]), NOW) == "alice"
    rejected(policy, hs256(aud="other"))
    rejected(policy, hs256())  # no aud at all
    # without an audience configured, an aud claim does not matter
    assert verify_assertion(HS, hs256(aud="whatever"), NOW) == "alice"


def test_issuer_is_checked_when_configured():
    policy = AssertionPolicy(es256_public_key=ES_PUBLIC_PEM, issuer="https://backend.example")
    assert verify_assertion(policy, es256(iss="https://backend.example"), NOW) == "alice"
    rejected(policy, es256(iss="https://evil.example"))
    rejected(policy, es256())
    assert verify_assertion(ES, es256(iss="https://anyone.example"), NOW) == "alice"


# --- through Delivery.admit --------------------------------------------------------------


def hello(assertion: str | None = None) -> Hello:
    return Hello(version=1, install_id=INSTALL, topic=TOPIC, push_types=("voip",),
                 assertion=assertion)


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "lpgw.db")
    yield s
    s.close()


def make(store: Store, policy: AssertionPolicy) -> Delivery:
    return Driven(Delivery(store, token_secret=b"k" * 32, gateway_id="gw1",
                           settings=DeliverySettings(), policy=policy, metrics=Metrics()))


def refused(d: Delivery, link: FakeLink, assertion: str | None, now: float = NOW) -> Refused:
    with pytest.raises(Refused) as info:
        d.admit(link, hello(assertion), now)
    assert info.value.reason == "unauthorized"
    assert link.events == []  # no welcome, nothing sent
    return info.value


def test_valid_hs256_assertion_binds_the_user(store):
    d = make(store, HS)
    link = FakeLink()
    token = d.admit(link, hello(hs256()), NOW)
    assert link.events == [("welcome", token, "alice")]
    assert store.device(token).user == "alice"
    assert d.metrics.value("lpgw_handshakes_total", transport="quic", result="welcome") == 1


def test_valid_es256_assertion_binds_the_user(store):
    d = make(store, ES)
    link = FakeLink()
    token = d.admit(link, hello(es256(sub="bob")), NOW)
    assert link.events == [("welcome", token, "bob")]
    assert store.device(token).user == "bob"


@pytest.mark.parametrize(("policy", "assertion"), [
    (HS, hs256(exp=int(NOW) - 31)),  # expired beyond the 30 s leeway
    (HS, hs256(secret=b"t" * 32)),  # wrong signature
    (HS, "not-a-jwt"),
    (ES, hs256()),  # HS256 while only ES256 is configured
    (ES, handmade({"alg": "none"}, claims(), None)),
    (ES, es256(key=OTHER_ES_KEY)),
    (AssertionPolicy(es256_public_key=ES_PUBLIC_PEM, audience="lpgw"), es256(aud="x")),
    (AssertionPolicy(es256_public_key=ES_PUBLIC_PEM, issuer="me"), es256(iss="you")),
], ids=["expired", "signature", "garbage", "hs-for-es", "none", "es-other-key", "aud", "iss"])
def test_bad_assertion_is_refused(store, policy, assertion):
    d = make(store, policy)
    refused(d, FakeLink(), assertion)
    assert d.metrics.value("lpgw_handshakes_total", transport="quic",
                           result="unauthorized") == 1
    assert d.metrics.value("lpgw_devices_connected", transport="quic") == 0
    assert store.count_devices() == 0


def test_required_policy_refuses_a_hello_without_assertion(store):
    d = make(store, AssertionPolicy(hs256_secret=HS_SECRET, required=True))
    refused(d, FakeLink(), None)
    assert store.count_devices() == 0
    link = FakeLink()
    token = d.admit(link, hello(hs256()), NOW)
    assert link.events == [("welcome", token, "alice")]


def test_optional_policy_admits_without_assertion(store):
    d = make(store, HS)
    link = FakeLink()
    token = d.admit(link, hello(None), NOW)
    assert link.events == [("welcome", token, None)]
    assert store.device(token).user is None


def test_assertion_is_ignored_when_no_key_is_configured(store):
    d = make(store, AssertionPolicy())
    link = FakeLink()
    token = d.admit(link, hello(hs256()), NOW)
    assert link.events == [("welcome", token, None)]
    assert store.device(token).user is None


def test_refused_hello_does_not_take_over_a_live_connection(store):
    d = make(store, HS)
    first = FakeLink()
    token = d.admit(first, hello(hs256()), NOW)
    refused(d, FakeLink(), hs256(secret=b"t" * 32), NOW + 1)
    assert [e[0] for e in first.events] == ["welcome"]  # not closed as replaced
    assert d.is_connected(token)
    assert d.metrics.value("lpgw_devices_connected", transport="quic") == 1
    assert store.device(token).user == "alice"
