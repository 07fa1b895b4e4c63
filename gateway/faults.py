"""A failure contained to the one input it came from: counted, logged once, never spread.

Every shell (QUIC, TLS, SIP, HTTP, the control socket, timers) handles each datagram,
stream, transaction or timer inside `contained(...)` or calls `record(...)` itself, then
closes or answers only that one and goes on serving the rest. An escaped exception once
stopped QUIC for every phone; this is the one place that says what happens instead.

Logging is bounded: a hostile peer that can make one path fail on every packet must not be
able to fill the journal. Per `where`, the first failure in each minute is logged with its
traceback; later ones in that minute only count, and the next log line says how many.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from gateway.core.metrics import Metrics

log = logging.getLogger("lpgw.faults")

LOG_EVERY = 60.0  # seconds between logged tracebacks of one `where`

_last_logged: dict[str, float] = {}
_unlogged: dict[str, int] = {}


def record(metrics: Metrics | None, where: str, exc: BaseException, who: str = "") -> None:
    """Count a contained failure in lpgw_internal_errors_total{where} and log it (bounded).

    `who` names the one peer, stream or timer it came from; it must hold no secret.
    The exception is not kept: its traceback holds frames (and their data) alive.
    """
    if metrics is not None:
        metrics.internal_errors.labels(where).inc()
    now = time.monotonic()
    last = _last_logged.get(where)
    if last is not None and now - last < LOG_EVERY:
        _unlogged[where] = _unlogged.get(where, 0) + 1
        return
    _last_logged[where] = now
    skipped = _unlogged.pop(where, 0)
    more = f" ({skipped} more in {where} not logged since the last)" if skipped else ""
    log.error("internal error in %s%s, contained to that one%s: %s: %s", where,
              f" ({who})" if who else "", more, type(exc).__name__, exc,
              exc_info=(type(exc), exc, exc.__traceback__))


_said: dict[str, float] = {}
_unsaid: dict[str, int] = {}
MAX_KINDS = 256  # kinds of bounded lines remembered at most (they are few and fixed)


def bounded(logger: logging.Logger, kind: str, msg: str, *args: object) -> None:
    """Log at INFO a refusal a peer can cause at will (a bad hello, frame or request): the
    first of each `kind` in a minute, the rest counted and said with the next line."""
    now = time.monotonic()
    last = _said.get(kind)
    if last is not None and now - last < LOG_EVERY:
        _unsaid[kind] = _unsaid.get(kind, 0) + 1
        return
    if len(_said) >= MAX_KINDS and kind not in _said:
        _said.clear()
        _unsaid.clear()
    _said[kind] = now
    skipped = _unsaid.pop(kind, 0)
    more = f" ({skipped} more like it not logged in the last minute)" if skipped else ""
    logger.info(msg + "%s", *args, more)


class Outcome:
    """What `contained` saw: `failed` is True once the block raised (and was contained)."""

    __slots__ = ("failed",)

    def __init__(self) -> None:
        self.failed = False


@contextmanager
def contained(metrics: Metrics | None, where: str, who: str = "") -> Iterator[Outcome]:
    """Run a block for one input; an Exception from it is recorded and swallowed.

        with contained(metrics, "quic_datagram", peer) as outcome:
            handle(datagram)
        if outcome.failed:
            close_this_one()
    """
    outcome = Outcome()
    try:
        yield outcome
    except Exception as exc:
        outcome.failed = True
        record(metrics, where, exc, who)
        del exc  # no frame of the failure outlives this block


def reset_log_limits() -> None:
    """Forget the per-minute log budget (tests)."""
    _last_logged.clear()
    _unlogged.clear()
