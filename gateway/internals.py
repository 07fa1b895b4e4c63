"""Every touch of a third-party library's internals, in one place: aioquic 1.7 and hpack 4.

Nothing else in the gateway (or its benchmarks) reads a private attribute of aioquic or
hpack; `tests/test_internals.py` checks that, and that the installed versions still have
everything listed in EXPECTED. Each touch says why it exists, the version it was read
against and the measurement that justifies it (docs/performance.md has the runs).
pyproject.toml pins aioquic to 1.7.x and hpack to 4.x, the versions these were read
against; `install()` runs once at start-up (`lpgw run`, the client, the load generator)
and logs a warning naming any touch an installed version no longer supports. Every touch
is defensive: when what it expects is missing it changes nothing, so an upgrade costs
memory or speed, never connections.

The general aioquic problems behind P2, P3 and P4 are written up for upstream in
docs/performance.md ("Changes upstream aioquic could take").
"""

from __future__ import annotations

import asyncio
import functools
import logging
from importlib import metadata
from typing import Any

import aioquic.quic.connection as aioquic_connection
import hpack.hpack
from aioquic import tls
from aioquic.asyncio import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.buffer import Buffer
from aioquic.quic.connection import QuicConnection
from aioquic.quic.retry import QuicRetryTokenHandler

log = logging.getLogger("lpgw.internals")

READ_AGAINST = {"aioquic": "1.7.2", "hpack": "4.2.0"}

# (owner, attribute, which touch needs it): what the installed libraries must still have.
# Instances are checked by tests/test_internals.py on a real connection and server.
EXPECTED: tuple[tuple[str, str, str], ...] = (
    ("aioquic.quic.connection", "EPOCHS", "P1 share_frame_handler_epochs"),
    ("QuicConnection", "_crypto_buffers", "P2 release_handshake_state"),
    ("tls.Context", "key_schedule", "P2 release_handshake_state"),
    ("tls.Context", "_ec_private_keys", "P2 release_handshake_state"),
    ("tls.Context", "_x25519_private_key", "P2 release_handshake_state"),
    ("QuicConnection", "_state", "P3 release_closed_connection"),
    ("QuicConnection", "_close_at", "P3 release_closed_connection"),
    ("QuicConnection", "_close_event", "P3 release_closed_connection"),
    ("QuicConnection", "_events", "P3 release_closed_connection"),
    ("QuicConnection", "_network_paths", "P3, P7 peer_address"),
    ("QuicServer", "_connection_terminated", "P4 forget_ids_only"),
    ("QuicServer", "_protocols", "P4, P8 known_connection"),
    ("QuicConnection", "_original_destination_connection_id", "P4 forget_ids_only"),
    ("QuicConnection", "_host_cids", "P4 forget_ids_only"),
    ("QuicServer", "_retry", "P5 set_retry"),
    ("QuicConnection", "_streams", "P6 stream_backlog"),
    ("QuicConnectionProtocol", "_handle_timer", "P9 ContainedProtocol"),
    ("QuicConnectionProtocol", "_connection_terminated_handler", "P9 ContainedProtocol"),
    ("QuicConnectionProtocol", "_connection_id_issued_handler", "P9 ContainedProtocol"),
    ("QuicConnectionProtocol", "_timer", "P9 ContainedProtocol"),
    ("QuicConnectionProtocol", "_quic", "P10 connection_of"),
    ("QuicConnectionProtocol", "_transport", "P10 connection_of"),
    ("tls.Context", "_peer_certificate", "P11 peer_certificate"),
    ("tls.Context", "_supported_groups", "P12 offer_one_key_share"),
    ("tls.Context", "_is_client", "P12 offer_one_key_share"),
    ("hpack.hpack", "decode_huffman", "H1 memoised Huffman decoding"),
)


def installed_versions() -> dict[str, str]:
    return {name: metadata.version(name) for name in READ_AGAINST}


def same_minor(a: str, b: str) -> bool:
    return a.split(".")[:2] == b.split(".")[:2]


def install() -> list[str]:
    """Apply the process-wide touches (P1, H1) and check the versions; returns what is
    out of line (also logged). Idempotent."""
    problems = [f"{name} {have} installed; the touches in gateway/internals.py were read "
                f"against {READ_AGAINST[name]}" for name, have in installed_versions().items()
                if not same_minor(have, READ_AGAINST[name])]
    if not share_frame_handler_epochs():
        problems.append("aioquic.quic.connection.EPOCHS is gone: P1 not applied "
                        "(~7 KiB more per QUIC connection)")
    if not memoise_huffman():
        problems.append("hpack.hpack.decode_huffman is gone: H1 not applied "
                        "(~11% more API CPU)")
    for problem in problems:
        log.warning("%s", problem)
    return problems


# --- P1: one frozenset per epoch string, shared by every connection ------------------------

def share_frame_handler_epochs() -> bool:
    """Let every QuicConnection share its frame table's epoch sets; True if in place.

    Read against aioquic 1.7.2: QuicConnection.__init__ builds a table of ~33 frame
    handlers, each with `EPOCHS("IH01")`-style sets: a pure function of a short string
    that returns a new frozenset each call, ~7 KiB a connection of identical immutable
    sets. Memoising it changes no behaviour (frozensets can't be mutated; anything that is
    not str -> frozenset passes through uncached). Measured with P2: an idle QUIC phone
    ~75 KB -> 50.9 KB at 10,000 (docs/performance.md, "RSS per idle QUIC device").
    """
    original = getattr(aioquic_connection, "EPOCHS", None)
    if original is None:
        return False
    if getattr(original, "lpgw_shared", False):
        return True
    cache: dict[str, frozenset] = {}

    def epochs(shortcut: Any) -> Any:
        if isinstance(shortcut, str):
            found = cache.get(shortcut)
            if found is not None:
                return found
        value = original(shortcut)
        if isinstance(shortcut, str) and isinstance(value, frozenset):
            cache[shortcut] = value
        return value

    epochs.lpgw_shared = True  # type: ignore[attr-defined]
    aioquic_connection.EPOCHS = epochs
    return True


# --- P2: what a server connection keeps only for its handshake -----------------------------

_NO_CRYPTO_OUTPUT = Buffer(capacity=0)  # shared: nothing can be written into it, ever


def release_handshake_state(quic: QuicConnection) -> bool:
    """Free what a server connection keeps only for its handshake; True if it did.

    Call it at HandshakeCompleted. aioquic (read against 1.7.2) keeps, for the life of
    every connection:

    - `_crypto_buffers`: three 16 KiB output buffers (Initial, Handshake, 1-RTT) that its
      TLS engine writes handshake messages into; ~48 KiB a connection, most of what an idle
      connection costs. A server's TLS in SERVER_POST_HANDSHAKE refuses every message
      (AlertUnexpectedMessage) without writing any: its last output, the NewSessionTicket
      when tickets are on, is written with the client's Finished and at once moved into the
      1-RTT crypto *stream*, which keeps it for retransmission until acked. So once the
      buffers are drained (all at position 0) they are dead weight: each is replaced by one
      shared zero-capacity Buffer (reads give b"", a write would raise BufferWriteError
      rather than go anywhere).
    - the TLS key schedule (transcript hash, master secret; ~0.8 KiB with its OpenSSL hash
      context) and the ephemeral (EC)DHE private key: used up to the client's Finished and
      the ticket only. Dropping them is also forward-secrecy hygiene: an ephemeral key that
      outlives its handshake only adds risk.

    What stays is what the connection uses from now on: the 1-RTT CryptoPair with its own
    secrets (key updates are derived from it, RFC 9001 §6, not from TLS), the packet spaces,
    connection ids and network paths (migration), the crypto streams, the idle timer.
    Measured: see P1 (tests/test_quic_memory.py asserts it applies).
    """
    ctx = getattr(quic, "tls", None)
    buffers = getattr(quic, "_crypto_buffers", None)
    if (quic.configuration.is_client or ctx is None
            or getattr(ctx, "state", None) is not tls.State.SERVER_POST_HANDSHAKE
            or not isinstance(buffers, dict)
            or not all(isinstance(b, Buffer) and b.tell() == 0 for b in buffers.values())):
        return False
    quic._crypto_buffers = dict.fromkeys(buffers, _NO_CRYPTO_OUTPUT)
    for name, empty in (("key_schedule", None), ("_ec_private_keys", []),
                        ("_x25519_private_key", None), ("_x448_private_key", None)):
        if hasattr(ctx, name):
            setattr(ctx, name, empty)
    return True


# --- P3: an ended connection freed by reference counting ----------------------------------

# what aioquic's public methods read of a connection that has ended (datagrams_to_send,
# get_timer, next_event, receive_datagram and close all stop at the state check)
KEPT_AFTER_END = ("_state", "_close_at", "_close_event", "_events", "_network_paths")


def release_closed_connection(quic: QuicConnection) -> bool:
    """Drop an ended connection's internals; True if done.

    Read against aioquic 1.7.2. A QuicConnection is a knot of reference cycles (bound
    methods of itself in its loss recovery, TLS engine, streams and sent packets: ~300
    objects): once it ends, only a full pass of the cyclic GC would free it, and with
    10,000 QUIC phones a full pass stops the gateway for 0.5-1 s (measured 0.76 s).
    Clearing its attributes unties every knot through it, so reference counting frees the
    lot when the protocol goes. What stays is only what its public methods read before
    refusing to work on an ended connection.

    A connection not in an end state is left alone (False), and so is one still in its
    closing or draining period (its timer and packets still count); tests/test_memory.py
    fails if aioquic stops freeing this way.
    """
    if getattr(quic, "_state", None) is not aioquic_connection.QuicConnectionState.TERMINATED:
        return False
    kept = {name: getattr(quic, name) for name in KEPT_AFTER_END if hasattr(quic, name)}
    quic.__dict__.clear()
    quic.__dict__.update(kept)
    return True


# --- P4: a connection's end costs O(its ids) -----------------------------------------------

def forget_ids_only(server: QuicServer) -> bool:
    """Make a connection's end delete only its own connection ids; True if in place.

    aioquic 1.7.2's `QuicServer._connection_terminated` scans the ids of every connection
    for each one that ends: when thousands of phones drop at once (an access point
    rebooting) that is O(N^2), and 3,000 ending together kept the gateway busy for ~80 s.
    A connection's ids are the client's original destination id, or after a Retry the
    id the Retry gave it, and its live host ids (retired ones were removed as they
    retired). The server binds this handler when it creates each connection, so it must
    be set before the first one.
    """
    if not callable(getattr(server, "_connection_terminated", None)) \
            or not isinstance(getattr(server, "_protocols", None), dict):
        return False
    protocols = server._protocols

    def terminated(protocol: QuicConnectionProtocol) -> None:
        quic = protocol._quic
        ids = {quic._original_destination_connection_id,
               getattr(quic, "_retry_source_connection_id", None),
               *(c.cid for c in quic._host_cids)}
        for cid in ids:
            if cid is not None and protocols.get(cid) is protocol:
                del protocols[cid]

    server._connection_terminated = terminated  # type: ignore[method-assign]
    return True


# --- P5: Retry decided per Initial ----------------------------------------------------------

def set_retry(server: QuicServer, tokens: QuicRetryTokenHandler | None) -> None:
    """Whether the next datagram handed to `server` gets a stateless Retry.

    aioquic 1.7.2's QuicServer reads `_retry` for each Initial; its constructor's
    retry=True would ask every phone for an extra round trip even when nothing is wrong.
    Set per Initial past `listen.quic_retry_above` handshakes under way: 3,000 Initials
    that never finish cost +5.4 MiB instead of +144.6 MiB (tests/test_quic_budget.py).
    """
    # None is what aioquic's own constructor sets when retry is off
    server._retry = tokens  # type: ignore[assignment]


# --- P6: what a stream holds unacknowledged -----------------------------------------------

def stream_backlog(quic: QuicConnection, stream_id: int) -> int | None:
    """Bytes written to a stream and not yet acknowledged by the peer (None: unknown).

    aioquic has no public measure of it: its QuicStreamSender keeps exactly that in
    `_buffer` (read against 1.7.2; the offsets from the first unacknowledged byte to the
    last written one). A phone that stops reading stops extending its flow-control window,
    and what we write waits there; the link closes it past `send_buffer_limit`
    (tests/test_slow_reader.py: without it a stalled phone grew the gateway without bound).
    """
    stream = getattr(quic, "_streams", {}).get(stream_id)
    buffer = getattr(getattr(stream, "sender", None), "_buffer", None)
    return len(buffer) if isinstance(buffer, bytearray) else None


# --- P7, P8, P10, P11: reads aioquic has no public way to make -------------------------------

def peer_address(quic: QuicConnection) -> tuple[str, int] | None:
    """The address the connection now sends to (after migration, the new one): aioquic
    1.7.2 keeps it in `_network_paths[0]` only. For logs and the per-source counts."""
    paths = getattr(quic, "_network_paths", None)
    if not paths:
        return None
    addr = paths[0].addr
    return addr[0], addr[1]


def known_connection(server: QuicServer, cid: bytes) -> QuicConnectionProtocol | None:
    """The protocol a connection id belongs to (aioquic 1.7.2: `QuicServer._protocols`):
    the listener sorts datagrams of known connections from Initials without parsing them
    twice (DeviceQuicServer: a storm's reads stay ahead of its handshakes)."""
    return server._protocols.get(cid)


def connection_of(protocol: QuicConnectionProtocol) -> QuicConnection:
    """A protocol's QuicConnection: aioquic 1.7.2 keeps it as `_quic` (its own examples
    subclass and read it; there is no public accessor)."""
    return protocol._quic


def datagram_transport_of(protocol: QuicConnectionProtocol | QuicServer
                          ) -> asyncio.DatagramTransport | None:
    """The socket's transport under a protocol or server (aioquic 1.7.2: `_transport`):
    the client closes its socket and rebinds it (a phone changing network), the listener
    sizes its receive buffer."""
    return protocol._transport


def peer_certificate(ctx: tls.Context) -> Any:
    """The peer's leaf certificate after the handshake (aioquic 1.7.2 keeps it in
    `_peer_certificate` only): the device client pins the gateway's SPKI with it."""
    return getattr(ctx, "_peer_certificate", None)


# --- P9: a connection's failure stays its own --------------------------------------------

class ContainedProtocol(QuicConnectionProtocol):
    """QuicConnectionProtocol with its timer contained and its ending explicit.

    aioquic 1.7.2's protocol runs `_handle_timer` from the loop: if it raised, the loop
    would drop the timer and the connection would never time out, held for ever
    (tests/test_containment.py). Its server binds `_connection_*_handler`s holding the
    protocol: cycles, let go of once it ended (P3's reasoning)."""

    def _handle_timer(self) -> None:
        try:
            super()._handle_timer()
        except Exception as exc:
            self.timer_failed(exc)

    def timer_failed(self, exc: Exception) -> None:
        """What a subclass does when aioquic's timer raised (end the connection)."""
        raise exc

    @property
    def connection(self) -> QuicConnection:
        return self._quic

    def forget_now(self) -> None:
        """Tell the server this connection is gone, and stop its timer, without waiting
        for the closing period (a failed connection, an abandoned handshake)."""
        self._connection_terminated_handler()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def unbind_server(self) -> None:
        """Drop the server's handlers (partials holding this protocol)."""
        self._connection_id_issued_handler = _ignore
        self._connection_id_retired_handler = _ignore
        self._connection_terminated_handler = _ignore


def _ignore(*args: object) -> None:
    """A handler of a connection that has ended."""


# --- H1: hpack's Huffman decoding, memoised ------------------------------------------------

def memoise_huffman() -> bool:
    """hpack (read against 4.2.0) decodes Huffman strings bit by bit in Python: a ninth of
    the API's CPU at 2,000 pushes/s, decoding again and again the same :path (device tokens
    repeat) and the same header values. `hpack.hpack.decode_huffman` is pure and its input
    is bytes: memoised, bounded (4,096 entries). Measured with the leaner response
    headers: 2,200 -> 2,500 pushes/s at 100 in flight (docs/performance.md)."""
    decode = getattr(hpack.hpack, "decode_huffman", None)
    if decode is None:
        return False
    if not hasattr(decode, "cache_info"):
        hpack.hpack.decode_huffman = functools.lru_cache(maxsize=4096)(decode)  # type: ignore[assignment]
    return True


# --- P12: one key share per ClientHello (the load generator only) -------------------------

def offer_one_key_share() -> bool:
    """Make this process's aioquic clients offer a single X25519 key share, as a phone (and
    an OpenSSL client) does; True if in place. Not part of `install()`: only bench/'s load
    generator calls it. aioquic 1.7.2's client generates four (P-256, P-384, X25519, X448)
    for every handshake, ~1.2 ms of the load generator's Python per ClientHello, which
    made 10,000-phone storms measure the generator, not the gateway."""
    if getattr(tls.Context, "lpgw_one_share", False):
        return True
    if not hasattr(tls.Context, "__init__"):
        return False
    init = tls.Context.__init__

    def __init__(self: tls.Context, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        groups = getattr(self, "_supported_groups", None)
        if getattr(self, "_is_client", False) and groups and tls.Group.X25519 in groups:
            self._supported_groups = [tls.Group.X25519]

    tls.Context.__init__ = __init__  # type: ignore[method-assign]
    tls.Context.lpgw_one_share = True  # type: ignore[attr-defined]
    return True
