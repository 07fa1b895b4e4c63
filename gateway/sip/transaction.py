"""RFC 3261 transactions, sans-IO: messages and `now` in, datagrams to send and events out.

Server side: INVITE (timers G, H, I) and non-INVITE (timer J) transactions, absorbing
retransmitted requests and re-sending the last response. Client side: non-INVITE requests
the gateway sends itself (REGISTER, OPTIONS; timers E, F, K).
"""

from __future__ import annotations

import enum
import heapq
import itertools
import secrets
from dataclasses import dataclass, field

from gateway.sip.message import (
    SipError,
    SipMessage,
    port_number,
    sent_by,
    split_outside_quotes,
    via_parameters,
)

T1, T2, T4 = 0.5, 4.0, 5.0
MAGIC = "z9hG4bK"


class TxState(enum.StrEnum):
    """RFC 3261 17: a transaction's state (a str, so status output stays as it was)."""

    TRYING = "trying"
    PROCEEDING = "proceeding"
    COMPLETED = "completed"
    CONFIRMED = "confirmed"  # an INVITE server transaction that got its ACK
    TERMINATED = "terminated"


@dataclass(frozen=True)
class Peer:
    """Where a message came from, and so where its responses go."""

    transport: str  # "udp" | "tcp"
    host: str
    port: int
    conn: int = 0  # the TCP connection, for responses on the same one

    @property
    def reliable(self) -> bool:
        return self.transport != "udp"


@dataclass(frozen=True)
class Send:
    data: bytes
    peer: Peer


@dataclass(frozen=True)
class RequestReceived:
    tx: ServerTransaction


@dataclass(frozen=True)
class CancelReceived:
    tx: ServerTransaction  # the CANCEL's own transaction
    invite: ServerTransaction | None  # the INVITE it cancels, when known


@dataclass(frozen=True)
class ResponseReceived:
    tx: ClientTransaction
    response: SipMessage


@dataclass(frozen=True)
class TimedOut:
    tx: ClientTransaction | ServerTransaction


@dataclass(eq=False)
class ServerTransaction:
    key: tuple
    request: SipMessage
    peer: Peer
    to_tag: str = field(default_factory=lambda: secrets.token_hex(6))
    state: TxState = TxState.TRYING  # trying/proceeding -> completed -> confirmed -> terminated
    last: bytes | None = None
    dest: Peer | None = None  # where responses go (response_destination)
    final: int = 0
    interval: float = T1
    retransmit_at: float | None = None
    give_up_at: float | None = None

    @property
    def is_invite(self) -> bool:
        return self.request.method == "INVITE"


@dataclass(eq=False)
class ClientTransaction:
    key: tuple
    request: SipMessage
    peer: Peer
    state: TxState = TxState.TRYING
    interval: float = T1
    retransmit_at: float | None = None
    give_up_at: float | None = None
    context: object = None  # the caller's, returned with events


Transaction = ServerTransaction | ClientTransaction


class TransactionLayer:
    def __init__(self, max_transactions: int = 4096) -> None:
        self.server: dict[tuple, ServerTransaction] = {}
        self.client: dict[tuple, ClientTransaction] = {}
        self.max_transactions = max_transactions
        self._timers: list[tuple[float, int, Transaction]] = []
        self._seq = itertools.count()

    # --- input ------------------------------------------------------------------------

    def receive(self, msg: SipMessage, peer: Peer, now: float) -> list:
        if not msg.is_request:
            return self._receive_response(msg)
        key = server_key(msg)
        if msg.method == "ACK":
            tx = self.server.get((*key[:-1], "INVITE"))
            if tx is not None and tx.state == TxState.COMPLETED:
                tx.state = TxState.CONFIRMED
                tx.retransmit_at = None
                self._schedule(tx, give_up_at=now + (0 if peer.reliable else T4))
            return []  # an ACK is never answered; for an unknown transaction it is dropped
        tx = self.server.get(key)
        if tx is not None:  # a retransmission: absorb it, re-send the last response
            return [Send(tx.last, tx.dest or tx.peer)] if tx.last else []
        if len(self.server) >= self.max_transactions:
            raise SipError("too many transactions in progress", 503)
        tx = ServerTransaction(key, msg, peer)
        self.server[key] = tx
        if msg.method == "CANCEL":
            invite = self.server.get((*key[:-1], "INVITE"))
            return [CancelReceived(tx, invite)]
        # an INVITE's 100 Trying is the TU's to send (it answers at once: the bridge sends it
        # right after the call's push, so the phone is not kept waiting for it)
        return [RequestReceived(tx)]

    def _receive_response(self, msg: SipMessage) -> list:
        try:
            key = (msg.branch, msg.cseq.method)
        except SipError:
            return []
        tx = self.client.get(key)
        if tx is None or tx.state in (TxState.COMPLETED, TxState.TERMINATED):
            return []  # late or stray: dropped
        if msg.status < 200:
            tx.state = TxState.PROCEEDING
            return []
        self._forget(tx)  # timer K would only absorb retransmitted responses: none matter
        tx.state = TxState.COMPLETED
        return [ResponseReceived(tx, msg)]

    # --- output -----------------------------------------------------------------------

    def respond(self, tx: ServerTransaction, status: int, now: float, reason: str = "",
                headers: list[tuple[str, str]] | None = None, body: bytes = b"") -> list:
        if tx.state in (TxState.COMPLETED, TxState.CONFIRMED, TxState.TERMINATED):
            return []  # one final response per transaction
        response = response_to(tx.request, status, tx.peer, reason,
                               tx.to_tag if status > 100 else None)
        for name, value in headers or []:
            response.headers.append((name.lower(), value))
        response.body = body
        tx.last = response.encode()
        tx.dest = response_destination(response, tx.peer)
        actions = [Send(tx.last, tx.dest)]
        if status < 200:
            tx.state = TxState.PROCEEDING
            return actions
        tx.final = status
        if tx.is_invite and status >= 300:
            tx.state = TxState.COMPLETED
            tx.interval = T1
            self._schedule(tx, retransmit_at=None if tx.peer.reliable else now + T1,
                           give_up_at=now + 64 * T1)  # timers G and H
        elif tx.is_invite:
            tx.state = TxState.TERMINATED
            self._forget(tx)
        else:
            tx.state = TxState.COMPLETED
            self._schedule(tx, give_up_at=now + (0 if tx.peer.reliable else 64 * T1))  # J
        return actions

    def request(self, msg: SipMessage, peer: Peer, now: float,
                context: object = None) -> tuple[ClientTransaction, list]:
        """Send a non-INVITE request of our own in a new client transaction."""
        key = (msg.branch, msg.cseq.method)
        tx = ClientTransaction(key, msg, peer, context=context)
        self.client[key] = tx
        self._schedule(tx, retransmit_at=None if peer.reliable else now + T1,
                       give_up_at=now + 64 * T1)  # timers E and F
        return tx, [Send(msg.encode(), peer)]

    # --- time -------------------------------------------------------------------------

    def clock_stepped(self, delta: float) -> None:
        """The wall clock jumped `delta` s: every timer keeps the time it had left."""
        self._timers = []
        every: list[Transaction] = [*self.server.values(), *self.client.values()]
        for tx in every:
            if tx.retransmit_at is not None:
                tx.retransmit_at += delta
            if tx.give_up_at is not None:
                tx.give_up_at += delta
            due = self._due(tx)
            if due is not None:
                heapq.heappush(self._timers, (due, next(self._seq), tx))

    def next_timer(self) -> float | None:
        while self._timers:
            at, _, tx = self._timers[0]
            if self._due(tx) == at:
                return at
            heapq.heappop(self._timers)  # stale entry
        return None

    def handle_timer(self, now: float) -> list:
        actions: list = []
        while self._timers and self._timers[0][0] <= now:
            at, _, tx = heapq.heappop(self._timers)
            if self._due(tx) != at:
                continue
            done = False
            try:
                self._expire(tx, now, actions)
                done = True
            finally:
                if not done:  # its timer raised: it is forgotten, and never fires again
                    self._forget(tx)
        return actions

    def _expire(self, tx: Transaction, now: float,
                actions: list) -> None:
        if tx.give_up_at is not None and now >= tx.give_up_at:
            state = tx.state
            self._forget(tx)
            if isinstance(tx, ClientTransaction) or (tx.is_invite and state == TxState.COMPLETED):
                actions.append(TimedOut(tx))  # timer F, or H: no ACK came
            return
        if tx.retransmit_at is not None and now >= tx.retransmit_at:
            if isinstance(tx, ServerTransaction):
                if tx.last is not None:
                    actions.append(Send(tx.last, tx.dest or tx.peer))
            else:
                actions.append(Send(tx.request.encode(), tx.peer))
            tx.interval = min(tx.interval * 2, T2)
            self._schedule(tx, retransmit_at=now + tx.interval)

    def forget(self, tx: ServerTransaction | ClientTransaction) -> None:
        """End a transaction now, answered or not (its TU failed): the table never keeps
        one that nothing will finish."""
        self._forget(tx)

    def _due(self, tx: Transaction) -> float | None:
        times = [t for t in (tx.retransmit_at, tx.give_up_at) if t is not None]
        return min(times) if times else None

    def _schedule(self, tx: Transaction, **times: float | None) -> None:
        for name, value in times.items():
            setattr(tx, name, value)
        due = self._due(tx)
        if due is not None:
            heapq.heappush(self._timers, (due, next(self._seq), tx))

    def _forget(self, tx: Transaction) -> None:
        tx.state = TxState.TERMINATED
        tx.retransmit_at = tx.give_up_at = None
        table = self.server if isinstance(tx, ServerTransaction) else self.client
        if table.get(tx.key) is tx:
            del table[tx.key]


def server_key(msg: SipMessage) -> tuple:
    """RFC 3261 17.2.3: the branch with the magic cookie; older peers by their fields."""
    vias = msg.vias
    if not vias:
        raise SipError("no Via header")
    top = vias[0]
    branch = top.parameters.get("branch") or ""
    method = "INVITE" if msg.method == "ACK" else msg.method
    if branch.startswith(MAGIC):
        return (branch, f"{top.host}:{top.port or ''}", method)
    from_tag = msg.address("from").parameters.get("tag") or ""
    return (msg.call_id, str(msg.cseq.sequence), from_tag, f"{top.host}:{top.port}", method)


def response_to(request: SipMessage, status: int, peer: Peer, reason: str = "",
                to_tag: str | None = None) -> SipMessage:
    """A response with the request's Via (top one stamped with received/rport), From, To,
    Call-ID and CSeq."""
    response = SipMessage(status=status, reason=reason)
    vias = request.get_all("via")
    if vias:
        vias[0] = stamp_via(vias[0], peer)
    for via in vias:
        response.headers.append(("via", via))
    response.headers.append(("from", request.get("from") or ""))
    to = request.get("to") or ""
    if to_tag and ";tag=" not in to.replace(" ", "").lower():
        to = f"{to};tag={to_tag}"
    response.headers.append(("to", to))
    response.headers.append(("call-id", request.call_id))
    response.headers.append(("cseq", request.get("cseq") or ""))
    return response


def stamp_via(value: str, peer: Peer) -> str:
    """The top Via of a response: RFC 3261 18.2.1 `received` and RFC 3581 `rport` set from
    the socket address the request came from. Whatever the request said in its own
    `received` or `rport` values is dropped, never trusted. Never raises: a Via too broken to
    read is copied as it came (its response still goes to the source address)."""
    parts = split_outside_quotes(value, ";")
    hostport = sent_by(value)
    if not parts or hostport is None:
        return value
    params = via_parameters(value)
    differs = hostport[0] != peer.host
    if "rport" not in params and "received" not in params and not differs:
        return value
    kept = [p for p in parts[1:]
            if p.partition("=")[0].strip().lower() not in ("rport", "received")]
    if "rport" in params:
        kept.append(f"rport={peer.port}")
    if "rport" in params or differs:
        kept.append(f"received={peer.host}")
    return ";".join([parts[0], *kept])


def response_destination(response: SipMessage, peer: Peer) -> Peer:
    """Where a response goes; never raises.

    Over TCP: the connection the request came on. Over UDP: always the source host of the
    request (what RFC 3261 18.2.2 reaches through `received`, which we stamp from the
    socket, never from the message); the port is the source port when the Via asks for it
    with `rport` (RFC 3581), else the Via's sent-by port, else 5060 (RFC 3261 18.2.2). The
    sent-by port is kept rather than always the source port because a PBX may send from
    one socket and listen on another, as RFC 3261 allows; a sent-by port that cannot be a
    port (only a message refused with 400 has one) falls back to the source port.
    """
    if peer.reliable:
        return peer
    vias = response.get_all("via")
    port = peer.port
    if vias and "rport" not in via_parameters(vias[0]):
        hostport = sent_by(vias[0])
        if hostport is not None:
            port = 5060 if hostport[1] is None else (port_number(hostport[1]) or peer.port)
    return Peer("udp", peer.host, port)
