"""The touches of aioquic's and hpack's internals (gateway/internals.py): all in that one
module, and still possible with the libraries installed. An upgrade that removes what a
touch expects fails here, by name, before it costs memory or connections in the field."""

from __future__ import annotations

import ast
import ssl
from pathlib import Path

import aioquic.quic.connection as aioquic_connection
import hpack.hpack
import pytest
from aioquic import tls
from aioquic.asyncio import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from gateway import internals

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def owners(tmp_path):
    """A real instance of every class a touch reads (the protocols need a running loop)."""
    from gateway import certs

    d = tmp_path
    certs.ensure_self_signed(d / "cert.pem", d / "key.pem", "internals")
    server_config = QuicConfiguration(is_client=False)
    server_config.load_cert_chain(str(d / "cert.pem"), str(d / "key.pem"))
    client = QuicConnection(configuration=QuicConfiguration(
        is_client=True, verify_mode=ssl.CERT_NONE))
    client.connect(("127.0.0.1", 4433), now=0.0)  # builds its TLS context
    return {
        "aioquic.quic.connection": aioquic_connection,
        "QuicConnection": client,
        "tls.Context": client.tls,
        "QuicConnectionProtocol": QuicConnectionProtocol(client),
        "QuicServer": QuicServer(configuration=server_config),
        "hpack.hpack": hpack.hpack,
    }


def test_the_installed_versions_are_the_ones_the_touches_were_read_against():
    installed = internals.installed_versions()
    for name, read in internals.READ_AGAINST.items():
        assert internals.same_minor(installed[name], read), (
            f"{name} {installed[name]} is installed; gateway/internals.py was read against "
            f"{read}: read each touch again against the new version, then update READ_AGAINST "
            "and the pin in pyproject.toml")


@pytest.mark.parametrize("owner, name, touch", internals.EXPECTED,
                         ids=[f"{o}.{n}" for o, n, _ in internals.EXPECTED])
async def test_what_each_touch_expects_is_there(owners, owner, name, touch):
    assert hasattr(owners[owner], name), (
        f"{owner} has no {name} any more: {touch} in gateway/internals.py no longer applies")


def test_install_applies_and_reports_nothing_missing():
    assert internals.install() == []
    assert getattr(aioquic_connection.EPOCHS, "lpgw_shared", False)
    assert hasattr(hpack.hpack.decode_huffman, "cache_info")
    assert aioquic_connection.EPOCHS("IH01") is aioquic_connection.EPOCHS("IH01")


def test_install_says_what_it_cannot_apply(monkeypatch, caplog):
    """A library without what a touch needs: the gateway still starts, and says so."""
    monkeypatch.delattr(aioquic_connection, "EPOCHS")
    monkeypatch.delattr(hpack.hpack, "decode_huffman")
    problems = internals.install()
    assert len(problems) == 2 and "EPOCHS" in problems[0] and "decode_huffman" in problems[1]
    assert "EPOCHS is gone" in caplog.text


def test_one_key_share_is_what_a_phone_offers():
    assert internals.offer_one_key_share()
    ctx = tls.Context(is_client=True)
    assert ctx._supported_groups == [tls.Group.X25519]


# names only aioquic's and hpack's objects have: reading them anywhere else is a touch of
# their internals outside the one module
PRIVATE = {"_crypto_buffers", "_network_paths", "_protocols", "_retry", "_host_cids",
           "_original_destination_connection_id", "_connection_terminated",
           "_connection_terminated_handler", "_connection_id_issued_handler",
           "_connection_id_retired_handler", "_handle_timer", "_peer_certificate",
           "_supported_groups", "_is_client", "_close_event", "_close_at", "decode_huffman",
           "EPOCHS", "key_schedule", "_ec_private_keys", "_x25519_private_key"}


def test_no_other_module_touches_them():
    sources = [p for p in [*(ROOT / "gateway").rglob("*.py"), *(ROOT / "bench").rglob("*.py")]
               if p.name != "internals.py"]
    touches = []
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            named = (node.attr if isinstance(node, ast.Attribute)
                     else node.value if isinstance(node, ast.Constant) else None)
            if named in PRIVATE:
                touches.append(f"{path.relative_to(ROOT)}:{node.lineno} {named}")
    assert touches == []
