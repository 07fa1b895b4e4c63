"""The SIP bridge: requests from the PBX become pushes, device actions become responses.

A transaction user on top of `transaction.py`, still sans-IO: datagrams, `now` and the
calls' answers in; `Send`s (and the two moments the shell times) out, from `outputs()`,
which the shell takes after every input.
"""

from __future__ import annotations

import codecs
import collections
import logging
import re
from dataclasses import dataclass

from gateway import faults
from gateway.core.calls import Call, CallAnswered, Caller, CallOutcome, Calls
from gateway.core.delivery import Delivery, Rejected
from gateway.core.metrics import Metrics
from gateway.core.model import PushRequest
from gateway.core.storage import Storage
from gateway.sip.message import SipError, SipMessage, number, parse
from gateway.sip.register import PbxLink
from gateway.sip.transaction import (
    CancelReceived,
    Peer,
    RequestReceived,
    ResponseReceived,
    Send,
    ServerTransaction,
    TimedOut,
    TransactionLayer,
    TxState,
    response_destination,
    response_to,
)
from gateway.sip.trust import DigestPolicy, SourcePolicy, Verdict

log = logging.getLogger("lpgw.sip")

ALLOW = "INVITE, ACK, CANCEL, OPTIONS, MESSAGE, BYE"
RECENT_CALLS = 100  # calls' ends kept for the console
IN_DIALOG = {"BYE", "INFO", "UPDATE", "PRACK", "REFER", "NOTIFY"}
REQUIRED = ("via", "to", "from", "call-id", "cseq")
REASON_TEXT = re.compile(r'text\s*=\s*"((?:[^"\\]|\\.)*)"', re.I)
REASON_CAUSE = re.compile(r"cause\s*=\s*(\d+)", re.I)

# how each outcome of a call is said to the PBX (and to the app, in call_ended.status)
SIP_STATUS = {CallOutcome.RINGING: 180, CallOutcome.DECLINED: 603, CallOutcome.BUSY: 486,
              CallOutcome.UNREACHABLE: 480, CallOutcome.CANCELLED: 487,
              CallOutcome.UNAVAILABLE: 503}


@dataclass(frozen=True, slots=True)
class CallPushed:
    """An INVITE's incoming-call pushes are queued for the phones: once the shell has
    written them, the time since the INVITE was read is what a phone waits."""


@dataclass(frozen=True, slots=True)
class Ringing:
    """180 Ringing answered, `seconds` after the INVITE was read."""

    seconds: float


@dataclass(frozen=True, slots=True)
class AwaitKeeps:
    """In a site of gateways: a request's pushes are being kept by the site (tickets of
    Delivery's KeepPush). Its answer (an INVITE's 100 Trying, a MESSAGE's 200) waits: the
    shell hands what became of them to `SipBridge.kept(key, ...)`."""

    key: int
    tickets: tuple[int, ...]


SipOutput = Send | CallPushed | Ringing | AwaitKeeps


@dataclass(frozen=True)
class Route:
    """Request-URI user -> lpgw user, e.g. extensions to names: match '^2(\\d{3})$'."""

    match: re.Pattern
    user: str  # a re.sub template: "nurse\\1"
    topics: tuple[str, ...] = ()  # the apps whose devices it rings; empty: the site's


class UserRouter:
    """Request-URI user -> the lpgw user and the devices a call for it rings: devices bound
    to that user whose app (topic) the route allows, so that an app cannot receive another
    app's calls by binding its own device to one of that app's users."""

    def __init__(self, routes: list[Route], static: dict[str, list[str]],
                 storage: Storage, topics: tuple[str, ...] = ()) -> None:
        self.routes = routes
        self.static = static
        self.storage = storage
        self.topics = topics  # sip.topics: the apps SIP rings when a route names none

    def user_for(self, uri_user: str) -> str:
        return self.resolve(uri_user)[0]

    def resolve(self, uri_user: str) -> tuple[str, tuple[str, ...]]:
        """The lpgw user, and the topics its calls may ring (empty: every topic)."""
        for route in self.routes:
            if route.match.fullmatch(uri_user):
                return route.match.sub(route.user, uri_user), route.topics or self.topics
        return uri_user, self.topics

    def devices_of(self, user: str, topics: tuple[str, ...] = ()) -> list[str]:
        """Bound devices of those topics (all when empty), then the site's static ones."""
        bound = self.storage.devices_of_user(user, topics=topics or None)
        return list(dict.fromkeys([*bound, *self.static.get(user, [])]))

    def devices_for(self, uri_user: str) -> tuple[str, list[str]]:
        user, topics = self.resolve(uri_user)
        return user, self.devices_of(user, topics)


def message_payload(sender: str, display_name: str, text: str, user: str) -> dict:
    """An alert push for a SIP MESSAGE (RFC 3428)."""
    title = display_name or sender
    return {"aps": {"alert": {"title": title, "body": text[:1000]}, "sound": "default"},
            "message": {"from": sender, "display_name": display_name, "to": user,
                        "text": text}}


def message_text(body: bytes, content_type: str | None) -> str:
    """A MESSAGE body as text: in its Content-Type charset when one is named and known,
    else UTF-8, else Windows-1252 (what PBXs on Windows send), never an error."""
    charset = re.search(r';\s*charset\s*=\s*"?([A-Za-z0-9_.:\-]+)', content_type or "", re.I)
    names = [charset.group(1)] if charset else []
    for name in [*names, "utf-8", "cp1252"]:
        try:
            codecs.lookup(name)
            return body.decode(name)
        except (LookupError, ValueError):  # unknown, not a text codec, or not that charset
            continue
    return body.decode("utf-8", "replace")


def reason_text(header: str | None) -> str:
    """RFC 3326: 'SIP;cause=200;text="Call completed elsewhere"' -> its text."""
    if not header:
        return ""
    text = REASON_TEXT.search(header)
    if text:
        return text.group(1).replace('\\"', '"')
    cause = REASON_CAUSE.search(header)
    return f"cause {cause.group(1)}" if cause else header[:100]


class SipBridge:
    def __init__(self, calls: Calls, delivery: Delivery, router: UserRouter,
                 metrics: Metrics, server_name: str = "lpgw") -> None:
        self.calls = calls
        self.delivery = delivery
        self.router = router
        self.metrics = metrics
        self.server_name = server_name
        self.tx = TransactionLayer()
        self.draining = False
        self._out: list[SipOutput] = []
        self.pbx: PbxLink | None = None
        self.sources: SourcePolicy | None = None  # None: requests from anywhere (tests)
        self.digest: DigestPolicy | None = None  # inbound digest authentication, when on
        # the last RECENT_CALLS calls' ends, for the console and /status; and when each
        # ringing call rang (bounded by the calls under way)
        self.recent: collections.deque[dict] = collections.deque(maxlen=RECENT_CALLS)
        self._rang: dict[str, float] = {}
        # SIP's counters at zero from the start (core/metrics.py says why)
        for method in {*(m.strip() for m in ALLOW.split(",")), *IN_DIALOG, "other"}:
            metrics.sip_requests.labels(method)
        for verdict in Verdict:
            metrics.sip_auth.labels(verdict.value)
        for outcome in ("forbidden", "dropped"):
            metrics.sip_untrusted.labels(outcome)
        for code in SIP_STATUS.values():
            metrics.sip_call_answers.labels(str(code))
        self._invite_of: dict[str, ServerTransaction] = {}  # call id -> INVITE transaction
        self._call_of: dict[int, Call] = {}  # id(INVITE transaction) -> call
        self._trying: ServerTransaction | None = None  # an INVITE still owed its 100
        # in a site: transactions whose answer waits for the site to keep their pushes
        # (key -> the transaction, and the call of an INVITE)
        self._keeping: dict[int, tuple[ServerTransaction, Call | None]] = {}

    def outputs(self) -> list[SipOutput]:
        """What to send and time since the last call, in order: the shell carries it out
        after every input (a datagram, a timer, a call's answer)."""
        out, self._out = self._out, []
        return out

    # --- input ------------------------------------------------------------------------

    def receive(self, data: bytes, peer: Peer, now: float, stream: bool = False) -> str:
        """Handle one message; returns what it was, for the shell's counters."""
        trusted = self.sources is None or self.sources.allows(peer.host)
        if not trusted and (self.sources is None or self.sources.reply == "none"):
            self.metrics.sip_untrusted.labels("dropped").inc()
            return "untrusted"
        try:
            msg = parse(data, stream=stream)
        except SipError as exc:
            self.metrics.sip_errors.labels("parse").inc()
            if trusted:
                self._refuse_raw(data, peer, exc, now)
            else:
                self.metrics.sip_untrusted.labels("dropped").inc()
            return "malformed"
        if not trusted:
            return self._untrusted(msg, peer)
        if msg.is_request:
            self.metrics.sip_requests.labels(msg.method if msg.method in ALLOW or
                                             msg.method in IN_DIALOG else "other").inc()
        try:
            self._check(msg)
            actions = self.tx.receive(msg, peer, now)
        except SipError as exc:
            self.metrics.sip_errors.labels(str(exc.status or "drop")).inc()
            # an ACK is never answered (RFC 3261 17.2.1), and a request without any Via
            # value has nowhere a response could be matched: both are dropped
            if msg.is_request and exc.status and msg.method != "ACK" and msg.get_all("via"):
                self._reply_without_transaction(msg, peer, exc.status, str(exc))
            return "refused"
        outcome = "absorbed"
        for action in actions:
            outcome = self._act(action, now) or outcome
        return outcome

    def _act(self, action: object, now: float, where: str = "sip_request") -> str | None:
        """One event of the transaction layer. A failure in the work for one transaction is
        contained to it: counted, logged (bounded), answered 500 and ended."""
        tx = action.tx if isinstance(action, RequestReceived | CancelReceived) else None
        who = f"{tx.request.method} {tx.request.call_id[:40]!r}" if tx is not None else ""
        with faults.contained(self.metrics, where, who) as outcome:
            return self._dispatch(action, now)
        if outcome.failed and tx is not None:
            self._abandon(tx, now)
        return "failed"

    def _dispatch(self, action: object, now: float) -> str | None:
        if isinstance(action, Send):
            self._out.append(action)
        elif isinstance(action, RequestReceived) and action.tx.is_invite:
            # The phone first: the 100 Trying (ours to send, RFC 3261 17.2.1: we answer at
            # once) is made and sent once the call's push is written, or just before any
            # answer of ours.
            self._trying = action.tx
            try:
                return self._request(action.tx, now)
            finally:
                self._send_trying(now)
        elif isinstance(action, RequestReceived):
            return self._request(action.tx, now)
        elif isinstance(action, CancelReceived):
            return self._cancel(action, now)
        elif isinstance(action, ResponseReceived):
            if self.pbx is not None:
                self.pbx.on_response(action.tx.context, action.response, now)
            return "response"
        elif isinstance(action, TimedOut):
            if isinstance(action.tx, ServerTransaction):
                self.metrics.sip_errors.labels("no_ack").inc()
            elif self.pbx is not None:
                self.pbx.on_response(action.tx.context, None, now)
        return None

    def _untrusted(self, msg: SipMessage, peer: Peer) -> str:
        """A message from a source not in sip.trusted: a request gets 403 (to its source,
        never an address it names), anything else is dropped; nothing else happens."""
        if msg.is_request and msg.method != "ACK" and msg.get_all("via"):
            self.metrics.sip_untrusted.labels("forbidden").inc()
            self._reply_without_transaction(msg, peer, 403, "Forbidden")
        else:
            self.metrics.sip_untrusted.labels("dropped").inc()
        return "untrusted"

    def _authorized(self, tx: ServerTransaction, now: float) -> bool:
        """Inbound digest (sip.inbound_auth): False once the request has been answered
        401 (no or stale credentials) or 403 (wrong ones)."""
        if self.digest is None:
            return True
        verdict = self.digest.check(tx.request, now)
        self.metrics.sip_auth.labels(verdict.value).inc()
        if verdict is Verdict.OK:
            return True
        if verdict is Verdict.BAD:
            self._reply(tx, 403, now, reason="Bad Credentials")
        else:
            self._reply(tx, 401, now, headers=[(
                "www-authenticate", self.digest.challenge(now, verdict is Verdict.STALE))])
        return False

    def _abandon(self, tx: ServerTransaction, now: float) -> None:
        """A transaction whose handling failed still ends: 500 while it can be answered,
        and forgotten if even that fails, so the table never keeps what nothing finishes.
        Its call, if one was offered, ends too (the phone stops ringing)."""
        if self._trying is tx:
            self._trying = None
        self._keeping.pop(id(tx), None)
        call = self._call_of.pop(id(tx), None)
        if call is not None:
            self._invite_of.pop(call.id, None)
        with faults.contained(self.metrics, "sip_request", "answering 500"):
            self._reply(tx, 500, now)
        if tx.state in (TxState.TRYING, TxState.PROCEEDING):
            self.tx.forget(tx)
        if call is not None and call.final is None:
            with faults.contained(self.metrics, "sip_request", f"ending call {call.id}"):
                self.calls.cancel(call, "gateway error", now)

    def _send_trying(self, now: float) -> None:
        tx, self._trying = self._trying, None
        if tx is not None:
            self._reply(tx, 100, now)

    def _check(self, msg: SipMessage) -> None:
        if not msg.is_request:
            return
        for name in REQUIRED:
            if not msg.get(name):
                raise SipError(f"Missing {name.title()} header")
        for name in ("to", "from", "call-id", "cseq", "max-forwards", "content-length"):
            if sum(1 for k, _ in msg.headers if k == name) > 1:
                raise SipError(f"more than one {name} header")
        if msg.cseq.sequence >= 2**31:
            raise SipError("CSeq sequence number out of range")
        if msg.cseq.method != msg.method and msg.method != "ACK":
            raise SipError("CSeq method does not match the request")
        msg.address("from")
        msg.address("to")
        msg.request_uri  # noqa: B018  (validates; 416 for other schemes)
        msg.vias  # noqa: B018  (validates the top Via: sent-by, rport, received)
        max_forwards = msg.get("max-forwards")
        if max_forwards is not None:
            hops = number(max_forwards, 10)
            if hops is None:
                raise SipError("bad Max-Forwards")
            if hops == 0 and msg.method not in ("OPTIONS", "ACK"):
                raise SipError("Too Many Hops", 483)

    def _request(self, tx: ServerTransaction, now: float) -> str:
        req = tx.request
        method = req.method
        has_tag = req.to_tag() is not None
        unsupported = [x for x in req.get_all("require") if x]
        if unsupported and method not in ("CANCEL", "ACK"):
            self._reply(tx, 420, now, headers=[("unsupported", ", ".join(unsupported))])
            return "refused"
        if method == "OPTIONS":
            self._reply(tx, 200, now, headers=[("allow", ALLOW), ("accept", "text/plain"),
                                               ("supported", "")])
            return "options"
        if method in ("INVITE", "MESSAGE") and not has_tag and not self._authorized(tx, now):
            return "refused"
        if method == "INVITE":
            if has_tag or req.get("replaces"):
                self._reply(tx, 481, now)  # a re-INVITE or a transfer: not ours to push
                return "refused"
            return self._invite(tx, now)
        if method == "MESSAGE":
            return self._message(tx, now)
        if has_tag or method in IN_DIALOG:
            self._reply(tx, 481, now)
            return "refused"
        self._reply(tx, 405, now, headers=[("allow", ALLOW)])
        return "refused"

    def _invite(self, tx: ServerTransaction, now: float) -> str:
        if self.draining:
            self._reply(tx, 503, now, headers=[("retry-after", "30")])
            return "refused"
        req = tx.request
        caller_address = req.address("from")
        callee = req.request_uri
        user, devices = self.router.devices_for(callee.user or "")
        caller = Caller(uri=str(caller_address.uri), display_name=caller_address.name,
                        callee=str(callee), details={"sip_call_id": req.call_id})
        call = self.calls.offer(user, caller, now, devices)
        if call is not None:
            self._out.append(CallPushed())
        if call is None:
            self._reply(tx, 480, now, reason="No Device Bound")
            return "unreachable"
        self._invite_of[call.id] = tx
        self._call_of[id(tx)] = call
        if call.tickets:  # a site keeps them: the 100 Trying once it has one of them
            self._trying = None
            self._hold(tx, call, call.tickets)
        return "invite"

    def _hold(self, tx: ServerTransaction, call: Call | None, tickets: list[int]) -> None:
        self._keeping[id(tx)] = (tx, call)
        self._out.append(AwaitKeeps(id(tx), tuple(tickets)))

    def kept(self, key: int, kept: int, failure: str | None, now: float) -> None:
        """What the site did with a held request's pushes: `kept` of them are kept (else
        `failure` says why none). An INVITE gets its 100 Trying, or 503 and its call ends
        (the PBX tries another branch); a MESSAGE gets 200, or 503."""
        held = self._keeping.pop(key, None)
        if held is None:
            return  # answered meanwhile (CANCEL, a failure) or gone
        tx, call = held
        with faults.contained(self.metrics, "sip_kept", tx.request.call_id[:40]):
            if kept and call is not None:
                if tx.state is TxState.TRYING:
                    self._reply(tx, 100, now)
            elif kept:
                self._reply(tx, 200, now)
            elif call is not None:
                self.metrics.sip_errors.labels("site_unavailable").inc()
                self.calls.unavailable(call, f"the site did not keep the call: {failure}",
                                       now)
            else:
                self.metrics.sip_errors.labels("site_unavailable").inc()
                self._reply(tx, 503, now, headers=[("retry-after", "5")])

    def _cancel(self, event: CancelReceived, now: float) -> str:
        invite = event.invite
        call = self._call_of.get(id(invite)) if invite is not None else None
        if call is None or call.final is not None:
            self._reply(event.tx, 481, now)
            return "refused"
        self._reply(event.tx, 200, now)
        self.calls.cancel(call, reason_text(event.tx.request.get("reason")), now)
        return "cancel"

    def _message(self, tx: ServerTransaction, now: float) -> str:
        req = tx.request
        content_type = (req.get("content-type") or "text/plain").split(";")[0].strip().lower()
        if not content_type.startswith("text/"):
            self._reply(tx, 415, now, headers=[("accept", "text/plain")])
            return "refused"
        user, devices = self.router.devices_for(req.request_uri.user or "")
        if not any(self.delivery.reachable(t) for t in devices):
            self._reply(tx, 480, now)
            return "unreachable"
        sender = req.address("from")
        payload = message_payload(str(sender.uri), sender.name,
                                  message_text(req.body, req.get("content-type")), user)
        accepted, reasons, tickets = 0, set(), []
        for token in devices:
            try:
                result = self.delivery.submit(token, PushRequest("alert", payload), now)
                accepted += 1
            except Rejected as exc:
                reasons.add(exc.reason)
                log.info("MESSAGE for %s not pushed: %s", user, exc.reason)
                continue
            if result.ticket is not None:
                tickets.append(result.ticket)
        if tickets:  # a site keeps them: 200 once it has one of them
            self._hold(tx, None, tickets)
        elif accepted:
            self._reply(tx, 200, now)
        elif "PayloadTooLarge" in reasons:  # not "away" (480): the PBX must not retry it
            self._reply(tx, 513, now)
        else:
            self._reply(tx, 480, now)
        return "message"

    # --- output -----------------------------------------------------------------------

    def answer(self, answered: CallAnswered) -> None:
        """A device's answer (or the call's end) for the PBX, as the calls returned it
        (after a device's ack or action, or a timer): a failure here is contained to this
        call's transaction."""
        call, now = answered.call, answered.at
        status = SIP_STATUS[answered.outcome]
        tx = self._invite_of.get(call.id)
        if tx is None:
            if status >= 200:
                self._rang.pop(call.id, None)
            return
        if status >= 200:
            del self._invite_of[call.id]
            self._call_of.pop(id(tx), None)
        self.metrics.sip_call_answers.labels(str(status)).inc()
        self._remember(call, status, now)
        with faults.contained(self.metrics, "sip_answer", f"call {call.id}"):
            self._reply(tx, status, now)
            if status == 180:
                self._out.append(Ringing(now - call.started))
        if status >= 200 and tx.state in (TxState.TRYING, TxState.PROCEEDING):
            self.tx.forget(tx)  # its final answer failed: nothing else would end it

    def _reply(self, tx: ServerTransaction, status: int, now: float, reason: str = "",
               headers: list[tuple[str, str]] | None = None) -> None:
        if self._trying is tx:
            self._send_trying(now)  # the 100 Trying goes before the answer
        extra = [("server", self.server_name), *(headers or [])]
        self._out.extend(self.tx.respond(tx, status, now, reason, extra))

    def _reply_without_transaction(self, msg: SipMessage, peer: Peer, status: int,
                                   reason: str) -> None:
        """A stateless answer (RFC 3261 8.2.6), to the request's source (never raises for
        what the request says: response_to and response_destination do not)."""
        response = response_to(msg, status, peer, reason[:60])
        self._out.append(Send(response.encode(), response_destination(response, peer)))

    def _refuse_raw(self, data: bytes, peer: Peer, exc: SipError, now: float) -> None:
        """A request too broken to parse whole still gets a 400 when its Via can be found."""
        if not exc.status:
            return
        head = data.split(b"\r\n\r\n", 1)[0][:8192]
        lines = re.split(r"\r\n|\r|\n", head.decode("utf-8", "replace"))
        start = lines[0].split() if lines else []
        if len(start) < 3 or start[0].startswith("SIP/") or not start[-1].startswith("SIP/"):
            return
        msg = SipMessage(method=start[0], uri="sip:invalid")
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if colon and name.strip().lower() in ("via", "v", "from", "f", "to", "t",
                                                  "call-id", "i", "cseq"):
                key = {"v": "via", "f": "from", "t": "to", "i": "call-id"}.get(
                    name.strip().lower(), name.strip().lower())
                msg.headers.append((key, value.strip()))
        if msg.get("via") and msg.method != "ACK":
            self._reply_without_transaction(msg, peer, exc.status, str(exc))

    # --- time -------------------------------------------------------------------------

    def clock_stepped(self, delta: float) -> None:
        """The wall clock jumped `delta` s (the shell saw it): transactions, ring windows
        and the PBX link keep the time they had left."""
        self.tx.clock_stepped(delta)
        self.calls.clock_stepped(delta)
        if self.pbx is not None:
            self.pbx.clock_stepped(delta)

    def next_timer(self) -> float | None:
        times = [t for t in (self.tx.next_timer(), self.calls.next_timer(),
                             self.pbx.next_timer() if self.pbx else None) if t is not None]
        return min(times) if times else None

    def handle_timer(self, now: float) -> bool:
        """Ring windows, transaction timers, the PBX link: each runs even when another
        failed (contained, counted in lpgw_internal_errors_total{where="sip_timer"}).
        False when one failed, so the shell does not call again at once for it."""
        ok = True
        for name, part in (("calls", self.calls.handle_timer),
                           ("transactions", self._transaction_timers),
                           ("pbx", self._pbx_timers)):
            with faults.contained(self.metrics, "sip_timer", name) as outcome:
                part(now)
            ok = ok and not outcome.failed
        return ok

    def _transaction_timers(self, now: float) -> None:
        for action in self.tx.handle_timer(now):
            self._act(action, now, "sip_timer")  # one that fails keeps none of the others

    def _pbx_timers(self, now: float) -> None:
        if self.pbx is not None:
            for request, context in self.pbx.due_requests(now):
                _, sends = self.tx.request(request, self.pbx.pbx, now, context)
                self._out.extend(sends)

    def status(self, now: float) -> dict:
        return {"calls": self.calls.describe(), "transactions": len(self.tx.server),
                "pbx": self.pbx.status(now) if self.pbx else None,
                "recent_calls": list(self.recent)}

    def _remember(self, call: Call, status: int, now: float) -> None:
        if status < 200:
            self._rang.setdefault(call.id, now)
            return
        rang = self._rang.pop(call.id, None)
        self.recent.append({
            "id": call.id, "user": call.user, "from": call.caller.uri, "status": status,
            "started": round(call.started, 3), "ended": round(now, 3),
            "ringing_after": None if rang is None else round(rang - call.started, 3),
            "seconds": round(now - call.started, 3)})
