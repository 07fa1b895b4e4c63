"""Which new QUIC connection to start next when more arrive than the gateway can start.

A full handshake costs the gateway ~2.5 ms of Python; in a reconnect storm thousands of
phones send their first packets (Initials) within a second. Left in the socket, they fill
its buffer and the kernel drops everything behind them, including the second flights of
handshakes already under way (work done, then thrown away). The shell (DeviceQuicServer
in quic.py) only files what it reads: the Initials of unknown connections here, packets of
known connections into a backlog it handles first. Sans-IO: datagrams in, datagrams out,
no clock.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

INITIAL_TYPE_V1 = 0x00  # long header, packet type bits 0b00 (RFC 9000 17.2.2)


def new_connection_id(data: bytes) -> bytes | None:
    """The destination connection id if `data` starts with a QUIC v1 Initial, else None.

    Only the few header bytes are read (no decryption): anything odd returns None and goes
    the normal way, where aioquic does the full checks."""
    if len(data) < 7 or not data[0] & 0x80 or (data[0] & 0x30) >> 4 != INITIAL_TYPE_V1:
        return None
    if data[1:5] != b"\x00\x00\x00\x01":
        return None
    length = data[5]
    if length > 20 or len(data) < 6 + length:
        return None
    return bytes(data[6:6 + length])


def initial_token(data: bytes) -> bytes | None:
    """The token of a QUIC v1 Initial (b"" when it has none: a first try; a Retry's token
    when it answers one), or None when `data` is not a readable Initial."""
    if new_connection_id(data) is None:
        return None
    at = 6 + data[5]
    if at >= len(data) or data[at] > 20:
        return None
    at += 1 + data[at]  # the source connection id
    if at >= len(data):
        return None
    size = 1 << (data[at] >> 6)  # a variable-length integer (RFC 9000 16)
    if at + size > len(data):
        return None
    length = int.from_bytes(data[at:at + size], "big") & ((1 << (8 * size - 2)) - 1)
    at += size
    return bytes(data[at:at + length]) if at + length <= len(data) else None


class InitialQueue:
    """New connections waiting to be started: most recently heard first, bounded.

    A phone that just (re)sent its Initial is the likeliest to be still waiting, so it is
    started first; when full, the phone heard from longest ago is dropped (it will retry,
    as it would after a kernel drop). A ClientHello may span datagrams (post-quantum key
    shares), and a phone retransmits: up to `per_connection` datagrams are kept per
    connection, in order, and all are handed on together.
    """

    def __init__(self, limit: int = 2000, per_connection: int = 4) -> None:
        self.limit = limit
        self.per_connection = per_connection
        self._waiting: OrderedDict[bytes, list[tuple[bytes, Any]]] = OrderedDict()
        self.dropped = 0  # connections dropped unstarted, ever

    def __len__(self) -> int:
        return len(self._waiting)

    def offer(self, cid: bytes, data: bytes, addr: Any) -> int:
        """Queue one Initial; returns how many connections were dropped to make room."""
        datagrams = self._waiting.pop(cid, None) or []
        datagrams.append((data, addr))
        del datagrams[:-self.per_connection]
        self._waiting[cid] = datagrams  # now the most recently heard
        dropped = 0
        while len(self._waiting) > self.limit:
            self._waiting.popitem(last=False)
            dropped += 1
        self.dropped += dropped
        return dropped

    def take(self) -> list[tuple[bytes, Any]] | None:
        """The datagrams of the connection to start now, or None when nobody waits."""
        if not self._waiting:
            return None
        return self._waiting.popitem(last=True)[1]
