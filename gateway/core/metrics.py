"""Counters for everything the gateway counts; one registry per gateway instance.

Every counter with a known set of labels exists at zero from the start (`_zero`): a
series that appears only with its first event makes `rate()` and alerts on it blind
until then. Labels whose values live in an upper layer (SIP's methods and verdicts) are
set to zero there.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import Metric

from gateway.protocol.messages import CALL_ACTIONS, PUSH_TYPES

TRANSPORTS = ("quic", "tls")
# Delivery's verdicts on a device's hello
HANDSHAKE_RESULTS = ("welcome", "unauthorized", "rate_limited", "device_limit", "unavailable")
DROP_REASONS = ("collapsed", "queue_full")
NOT_KEPT = ("busy", "timeout", "no_quorum", "contended", "lookup", "error")


class _Counters:
    """The counters' registry as one collector of the exposed one."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        return iter(self.registry.collect())


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        # what /metrics shows: these counters, plus process_* (CPU seconds, resident memory,
        # open files, start time) and python_info as every Prometheus client exports them,
        # plus what the shell adds (gateway/gauges.py). Apart from `registry`, which
        # `value` reads: the process collector lists /proc/self/fd, 20,000 entries at
        # 10,000 phones, and /status read 18 values (the console every 2 s: 9% of a core)
        self.exposed = CollectorRegistry(auto_describe=True)
        self.exposed.register(_Counters(r))
        ProcessCollector(registry=self.exposed)
        PlatformCollector(registry=self.exposed)
        self.connected = Gauge("lpgw_devices_connected", "Devices connected now",
                               ["transport"], registry=r)
        self.handshakes = Counter("lpgw_handshakes", "Device hellos by outcome",
                                  ["transport", "result"], registry=r)
        self.accepted = Counter("lpgw_pushes_accepted", "Pushes accepted", ["push_type"],
                                registry=r)
        self.delivered = Counter("lpgw_pushes_delivered", "Pushes acknowledged by devices",
                                 registry=r)
        self.expired = Counter("lpgw_pushes_expired", "Pushes dropped because they expired",
                               registry=r)
        self.dropped = Counter("lpgw_pushes_dropped", "Pushes dropped before delivery",
                               ["reason"], registry=r)
        self.rejected = Counter("lpgw_pushes_rejected", "Push requests refused", ["reason"],
                                registry=r)
        self.latency = Histogram(
            "lpgw_delivery_latency_seconds", "From accepted to acknowledged", registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                     30, 60, 300, 3600))
        self.protocol_errors = Counter("lpgw_protocol_errors", "Refused device frames and "
                                       "closes for bad input", ["code"], registry=r)
        self.disconnects = Counter("lpgw_disconnects", "Device connections ended",
                                   ["transport", "reason"], registry=r)
        self.heartbeat_timeouts = Counter("lpgw_heartbeat_timeouts",
                                          "Devices dropped for missed heartbeats", registry=r)
        self.api_errors = Counter("lpgw_api_errors", "API requests refused, by APNs reason",
                                  ["reason"], registry=r)
        self.api_connections = Gauge("lpgw_api_connections", "API connections open now",
                                     registry=r)
        self.api_connections_refused = Counter(
            "lpgw_api_connections_refused", "API connections closed at once: past "
            "api.max_connections or max_connections_per_source", ["reason"], registry=r)
        self.api_requests = Counter("lpgw_api_requests", "API requests by HTTP version",
                                    ["http"], registry=r)
        self.sip_requests = Counter("lpgw_sip_requests", "SIP requests received", ["method"],
                                    registry=r)
        self.sip_errors = Counter("lpgw_sip_errors", "SIP messages refused or dropped",
                                  ["kind"], registry=r)
        self.sip_untrusted = Counter(
            "lpgw_sip_untrusted", "SIP messages from sources outside sip.trusted: "
            "forbidden (answered 403) or dropped", ["outcome"], registry=r)
        self.sip_auth = Counter("lpgw_sip_auth", "Inbound digest checks of INVITE and "
                                "MESSAGE by verdict (ok, challenge, stale, bad)", ["verdict"],
                                registry=r)
        self.sip_invite_to_push = Histogram(
            "lpgw_sip_invite_to_push_seconds", "From an INVITE read to its pushes written",
            registry=r, buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1))
        self.sip_invite_to_ringing = Histogram(
            "lpgw_sip_invite_to_ringing_seconds",
            "From an INVITE read to the 180 sent once a device acknowledged the call",
            registry=r, buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                                 5, 10, 30))
        self.sip_call_answers = Counter(
            "lpgw_sip_call_answers", "What the gateway answered the PBX's INVITEs once their "
            "devices had spoken or the call ended: 180 (a device rings), 603 (declined), 486 "
            "(busy), 480 (no device reached), 487 (cancelled), 503 (the site could not keep "
            "the call)", ["status"], registry=r)
        self.quic_initials_dropped = Counter(
            "lpgw_quic_initials_dropped", "New QUIC connections' first packets dropped while "
            "the gateway was busy (the phone retries)", registry=r)
        self.quic_retries = Counter(
            "lpgw_quic_retries_sent", "Retry packets sent: new QUIC connections asked to "
            "prove their address first (past listen.quic_retry_above)", registry=r)
        self.quic_tokens_refused = Counter(
            "lpgw_quic_retry_tokens_refused", "Initials with a Retry token that was not ours, "
            "had expired or named another address", registry=r)
        self.quic_half_open = Gauge("lpgw_quic_half_open", "QUIC handshakes under way",
                                    registry=r)
        self.quic_half_open_refused = Counter(
            "lpgw_quic_half_open_refused", "New QUIC connections dropped: "
            "listen.quic_half_open_limit handshakes were under way", registry=r)
        self.quic_half_open_expired = Counter(
            "lpgw_quic_half_open_expired", "QUIC handshakes dropped unfinished after "
            "HALF_OPEN_TIMEOUT", registry=r)
        self.quic_backlog_dropped = Counter(
            "lpgw_quic_backlog_dropped", "Packets of QUIC connections dropped because "
            "too many waited to be handled (the peer retransmits)", registry=r)
        self.cluster_errors = Counter(
            "lpgw_cluster_errors", "Writes to the site's NATS that failed (retried), by what",
            ["what"], registry=r)
        self.cluster_connected = Gauge(
            "lpgw_cluster_connected", "1 while this gateway is connected to its site's NATS "
            "(a site of gateways only)", registry=r)
        self.cluster_gateways = Gauge(
            "lpgw_cluster_gateways", "Gateways of the site heard from lately, this one "
            "included", registry=r)
        self.cluster_keeps = Gauge(
            "lpgw_cluster_keeps_waiting", "Pushes waiting for the site's quorum now "
            "(cluster.max_keeps at most; more are answered 503)", registry=r)
        self.cluster_not_kept = Counter(
            "lpgw_cluster_not_kept", "Pushes the site did not keep (answered 503), by why: "
            "busy (cluster.max_keeps), timeout (no quorum within cluster.accept_timeout), "
            "no_quorum (the stream said so at once), lookup (the site's registry did not "
            "answer about a token this gateway did not know), error", ["why"], registry=r)
        self.cluster_stream_messages = Gauge(
            "lpgw_cluster_stream_messages", "Pushes the site's stream keeps now (all "
            "devices), as of the last look (every 5 s)", registry=r)
        self.cluster_stream_current = Gauge(
            "lpgw_cluster_stream_replicas_current", "Copies of the site's stream that are "
            "current (the leader's included): below cluster.replicas, a node is behind or "
            "gone", registry=r)
        self.cluster_relayed = Counter(
            "lpgw_cluster_relayed", "Pushes the site's stream handed to this gateway for a "
            "device connected here", registry=r)
        self.cluster_presence_moved = Counter(
            "lpgw_cluster_presence_moved", "Devices that had moved to another gateway of the "
            "site when this one let go of them (its entry was left alone)", registry=r)
        self.installs_refused = Counter(
            "lpgw_device_installs_refused", "New installs refused: rate (too many from one "
            "address) or full (delivery.max_devices)", ["reason"], registry=r)
        self.devices_pruned = Counter("lpgw_devices_pruned", "Devices deleted with their "
                                      "queues after delivery.unregistered_after_days unseen",
                                      registry=r)
        self.call_actions = Counter("lpgw_call_actions", "Call actions from devices",
                                    ["action"], registry=r)
        # a pass stops the whole gateway: a full one visits every object (each QUIC phone is
        # thousands), measured ~0.5-1 s at 10,000 QUIC phones
        self.gc_pauses = Histogram(
            "lpgw_gc_pause_seconds", "Cyclic garbage-collector passes, by generation "
            "(2: full); the gateway does nothing else meanwhile", ["generation"], registry=r,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))

        # a failure contained to one connection, stream, datagram, transaction or timer
        # (gateway/faults.py): the gateway went on serving the others
        self.internal_errors = Counter(
            "lpgw_internal_errors", "Internal errors contained to the one input they came "
            "from, by where they happened", ["where"], registry=r)

        self.slow_readers = Counter(
            "lpgw_slow_readers", "Devices closed (bye slow_reader) because they left more than "
            "protocol.send_buffer_limit bytes unread", ["transport"], registry=r)

        # a full or failing disk (gateway/core/delivery.py): pushes and new devices refused
        # ("push", "device", ...), writes worth no fsync deferred and redone ("last_seen", "ack")
        self.storage_failures = Counter(
            "lpgw_storage_failures", "Store operations that failed (full or failing disk), by "
            "what: refused (push, device, unregister) or deferred and redone later (last_seen, "
            "ack, expire)", ["what"], registry=r)

        self.console_sessions = Gauge(
            "lpgw_console_sessions", "Console sessions signed in now (at most 32; a further "
            "sign-in ends the oldest)", registry=r)
        self.console_sign_ins = Counter(
            "lpgw_console_sign_ins", "Console sign-in attempts by result: ok, refused (not "
            "the admin token), limited (past 10 a minute)", ["result"], registry=r)
        self.clock_steps = Counter(
            "lpgw_clock_steps", "Steps of the wall clock seen against the monotonic clock "
            "(NTP's first sync on a board without RTC, a hand-set clock)", registry=r)

        self._zero()

    def _zero(self) -> None:
        for push_type in PUSH_TYPES:
            self.accepted.labels(push_type)
        for reason in DROP_REASONS:
            self.dropped.labels(reason)
        for transport in TRANSPORTS:
            self.connected.labels(transport)
            self.slow_readers.labels(transport)
            for result in HANDSHAKE_RESULTS:
                self.handshakes.labels(transport, result)
        for http in ("1.1", "2"):
            self.api_requests.labels(http)
        for action in CALL_ACTIONS:
            self.call_actions.labels(action)
        for reason in ("rate", "full"):
            self.installs_refused.labels(reason)
        for why in NOT_KEPT:
            self.cluster_not_kept.labels(why)
        for generation in range(3):
            self.gc_pauses.labels(str(generation))
        for result in ("ok", "refused", "limited"):
            self.console_sign_ins.labels(result)

    def value(self, name: str, **labels: str) -> float:
        """A sample's current value (0 when never set); for status output and tests."""
        return self.registry.get_sample_value(name, labels) or 0.0
