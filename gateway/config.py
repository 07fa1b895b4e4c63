"""One YAML file, every key defaulted and checked; errors name the key path.

A bad value stops the start (exit 2) before anything is bound or written.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
import reprlib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from gateway.certs import load_public_key
from gateway.core.push_rules import TOPIC_SUFFIX
from gateway.records import is_token

# what a config file may be: a real one is a few KB, 4 levels deep, a hundred values
MAX_FILE = 128 * 1024  # PyYAML (pure Python) reads ~50 KB/s here: bounded time
MAX_DEPTH = 32
MAX_VALUES = 100000  # after YAML aliases are expanded (a "billion laughs" file is small)
MAX_SHOWN = 20  # problems printed; the rest are counted
MAX_LINE = 300  # characters of one problem printed

_SHORT = reprlib.Repr()  # a bad value is shown, never a huge or endless structure
_SHORT.maxstring = _SHORT.maxother = _SHORT.maxlong = 60
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict = 3, 6, 6


class ConfigError(Exception):
    """Every problem found, for the operator: the message stays short whatever the file."""

    def __init__(self, problems: list[str], source: str = "") -> None:
        self.problems = problems
        self.source = source
        where = f"{source}: " if source else ""
        lines = [_cut(f"{where}{p}") for p in problems[:MAX_SHOWN]]
        if len(problems) > MAX_SHOWN:
            lines.append(f"{where}... and {len(problems) - MAX_SHOWN} more problems")
        super().__init__("\n".join(lines))


def _cut(text: str) -> str:
    return text if len(text) <= MAX_LINE else text[:MAX_LINE] + "…"


def _key(key: Any) -> str:
    """A mapping key as a key path shows it: short, on one line."""
    text = key if isinstance(key, str) and key.isprintable() else _SHORT.repr(key)
    return text if len(text) <= 40 else text[:40] + "…"


def _k(default: Any, doc: str, *, lo: float | None = None, hi: float | None = None,
       choices: tuple[str, ...] | None = None, secret: bool = False) -> Any:
    meta = {"doc": doc, "lo": lo, "hi": hi, "choices": choices, "secret": secret}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ListenConfig:
    host: str = _k("::", "address to bind; '::' is every IPv4 and IPv6 address")
    port: int = _k(4433, "UDP (QUIC) and TCP (TLS) port; 0 picks a free one", lo=0, hi=65535)
    quic: bool = _k(True, "accept devices over QUIC")
    tls: bool = _k(True, "accept devices over TLS 1.3 on TCP")
    quic_receive_buffer: int = _k(
        8388608, "bytes of kernel receive buffer for the QUIC socket (0: the kernel's "
        "default); Linux caps it at net.core.rmem_max", lo=0, hi=268435456)
    quic_retry_above: int = _k(64, "half-open QUIC connections above which a new one must "
                               "first prove its address (a Retry); 0: always", lo=0, hi=100000)
    quic_half_open_limit: int = _k(256, "half-open QUIC connections at most (each ~80 KiB); "
                                   "Initials past it wait or are dropped", lo=1, hi=100000)


@dataclass(frozen=True)
class TlsConfig:
    cert: str = _k("", "PEM certificate; empty: <state_dir>/gateway.crt, made on first start")
    key: str = _k("", "PEM private key (P-256); empty: <state_dir>/gateway.key")


@dataclass(frozen=True)
class ProtocolConfig:
    heartbeat: float = _k(10.0, "seconds between gateway pings", lo=0.05, hi=300)
    heartbeat_misses: int = _k(3, "unanswered pings before a device is dropped", lo=1, hi=20)
    hello_timeout: float = _k(10.0, "seconds a new connection has to say hello", lo=0.05,
                              hi=120)
    max_frame: int = _k(16384, "largest frame in bytes", lo=8192, hi=1048576)
    frame_rate: float = _k(50.0, "frames per second a device may send, sustained", lo=1,
                           hi=10000)
    frame_burst: int = _k(200, "frames a device may send in a burst", lo=1, hi=100000)
    send_buffer_limit: int = _k(2097152, "bytes a device may leave unread before it is closed "
                                "(bye slow_reader); its pushes wait", lo=65536, hi=268435456)


@dataclass(frozen=True)
class DeliveryConfig:
    queue_limit: int = _k(256, "stored pushes per device; the oldest goes first", lo=1,
                          hi=100000)
    default_ttl: int = _k(2592000, "seconds a push without expiration is kept", lo=1,
                          hi=315360000)
    expire_interval: float = _k(60.0, "seconds between sweeps for expired pushes", lo=0.05,
                                hi=86400)
    unregistered_after_days: float = _k(30.0, "a device unseen this long gets 410 Unregistered "
                                        "and is then pruned with its queue", lo=0.001, hi=3650)
    max_devices: int = _k(20000, "device records kept at most; a new install past it is "
                          "refused (bye device_limit)", lo=1, hi=10000000)
    new_device_rate: float = _k(0.1, "new installs per second one source address may create, "
                                "sustained", lo=0.0001, hi=100000)
    new_device_burst: int = _k(20, "new installs one source address may create in a burst",
                               lo=1, hi=1000000)
    new_device_exempt: tuple[str, ...] = _k(("127.0.0.0/8", "::1"), "addresses/networks the "
                                            "new-install rate does not apply to")


@dataclass(frozen=True)
class ProviderConfig:
    team_id: str = _k("", "Apple team id: the JWT's iss")
    key_id: str = _k("", "key id: the JWT header's kid")
    key_file: str = _k("", "the key's PEM public key (or the .p8 itself)")
    topics: tuple[str, ...] = _k((), "bundle ids this key may push to, see and bind users of")


@dataclass(frozen=True)
class ApiConfig:
    enabled: bool = _k(True, "serve the APNs-compatible HTTP/2 API")
    host: str = _k("::", "address to bind")
    port: int = _k(2197, "TCP port (APNs uses 443 and 2197)", lo=0, hi=65535)
    cert: str = _k("", "PEM certificate for the API; empty: the gateway's")
    key: str = _k("", "PEM key for the API; empty: the gateway's")
    admin_token_file: str = _k("", "file holding a bearer token for /v1 and /status")
    rate_limit: float = _k(1000.0, "pushes per second per provider key", lo=0.001, hi=1000000)
    rate_burst: int = _k(2000, "pushes a key may send in a burst", lo=1, hi=1000000)
    idle_timeout: float = _k(3600.0, "seconds before an idle API connection is closed", lo=0.1,
                             hi=604800)
    handshake_timeout: float = _k(10.0, "seconds a new API connection has for TLS and its "
                                  "first request", lo=0.1, hi=600)
    request_timeout: float = _k(10.0, "seconds a started request has to send all of its body",
                                lo=0.1, hi=600)
    max_connections: int = _k(256, "API connections at most; the rest of the open-file "
                              "limit is kept for devices", lo=1, hi=1000000)
    max_connections_per_source: int = _k(32, "API connections at most from one address",
                                         lo=1, hi=1000000)
    max_concurrent_streams: int = _k(128, "HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS", lo=1,
                                     hi=100000)
    max_buffered_bytes: int = _k(1048576, "request bytes one connection may have buffered "
                                 "(headers and unfinished bodies)", lo=16384, hi=268435456)
    reset_rate: float = _k(20.0, "HTTP/2 stream resets per second a connection may cause, "
                           "sustained; past it: GOAWAY ENHANCE_YOUR_CALM", lo=0.01, hi=1000000)
    reset_burst: int = _k(200, "HTTP/2 stream resets a connection may cause in a burst", lo=1,
                          hi=1000000)
    metrics_need_auth: bool = _k(False, "require a bearer token for /metrics")
    providers: tuple[ProviderConfig, ...] = _k((), "provider keys (team, key id, topics)")


@dataclass(frozen=True)
class AssertionsConfig:
    required: bool = _k(False, "refuse devices whose hello has no valid user assertion")
    hs256_secret: str = _k("", "shared HS256 secret (prefer hs256_secret_file)", secret=True)
    hs256_secret_file: str = _k("", "file holding the HS256 secret")
    es256_public_key_file: str = _k("", "PEM public key of the backend that signs ES256")
    audience: str = _k("", "required 'aud' claim; empty: not checked")
    issuer: str = _k("", "required 'iss' claim; empty: not checked")


@dataclass(frozen=True)
class SipRouteConfig:
    match: str = _k("", "regular expression over the Request-URI user, whole match")
    user: str = _k("", r"the lpgw user it becomes; \1 etc. refer to groups")
    topics: tuple[str, ...] = _k((), "bundle ids whose devices this route rings; empty: "
                                     "sip.topics")


@dataclass(frozen=True)
class SipStaticBinding:
    user: str = _k("", "a user name")
    tokens: tuple[str, ...] = _k((), "device tokens that ring for this user")


@dataclass(frozen=True)
class SipRegistration:
    user: str = _k("", "the PBX account (extension) lpgw registers as an extra contact for")
    auth_user: str = _k("", "digest user name; empty: user")
    password_file: str = _k("", "file holding the digest password")
    expires: int = _k(600, "registration lifetime asked for, seconds", lo=30, hi=86400)


@dataclass(frozen=True)
class SipInboundAuth:
    enabled: bool = _k(False, "challenge INVITE and MESSAGE with digest authentication")
    realm: str = _k("", "digest realm; empty: sip.domain, else the gateway's name")
    credentials_file: str = _k("", "file of 'user:password' lines the PBX may answer with")


@dataclass(frozen=True)
class SipConfig:
    enabled: bool = _k(True, "accept SIP from the PBX (the SIP bridge)")
    host: str = _k("::", "address to bind")
    port: int = _k(5060, "UDP and TCP port; 0 picks a free one", lo=0, hi=65535)
    udp: bool = _k(True, "listen on UDP")
    tcp: bool = _k(True, "listen on TCP")
    ring_window: float = _k(45.0, "seconds a call rings on lpgw's branch before 480", lo=1,
                            hi=3600)
    reach_timeout: float = _k(10.0, "seconds for some device to acknowledge the call, else 480",
                              lo=0.1, hi=600)
    routes: tuple[SipRouteConfig, ...] = _k((), "Request-URI user -> lpgw user rules")
    static_bindings: tuple[SipStaticBinding, ...] = _k((), "users rung on fixed device tokens")
    pbx_host: str = _k("", "the PBX to register with; empty: no registration")
    pbx_port: int = _k(5060, "the PBX's SIP port", lo=1, hi=65535)
    pbx_transport: str = _k("udp", "transport to the PBX", choices=("udp", "tcp"))
    domain: str = _k("", "SIP domain of the accounts; empty: pbx_host")
    register: tuple[SipRegistration, ...] = _k((), "accounts lpgw registers with the PBX")
    keepalive_interval: float = _k(30.0, "seconds between OPTIONS pings to the PBX", lo=1,
                                   hi=86400)
    trusted: tuple[str, ...] = _k((), "addresses/networks allowed to send SIP requests; "
                                      "empty: loopback and pbx_host")
    untrusted_reply: str = _k("403", "answer to a request from elsewhere: 403, or none "
                              "(silence)", choices=("403", "none"))
    topics: tuple[str, ...] = _k((), "bundle ids whose devices SIP calls and messages ring; "
                                     "empty: every topic")
    inbound_auth: SipInboundAuth = field(default_factory=SipInboundAuth)


@dataclass(frozen=True)
class DiscoveryConfig:
    enabled: bool = _k(True, "advertise over Bonjour (mDNS/DNS-SD): _lpgw._udp and _lpgw._tcp")
    instance: str = _k("", "service instance name phones see; empty: the gateway's name")
    interfaces: tuple[str, ...] = _k((), "advertise only on these interfaces; empty: every "
                                         "non-loopback interface that is up")
    wifi_only: bool = _k(False, "advertise only on Wi-Fi interfaces")
    require_ssid: str = _k("", "advertise nothing unless a Wi-Fi interface is on this SSID")
    poll_interval: float = _k(2.0, "seconds between polls where netlink is missing", lo=0.1,
                              hi=3600)


@dataclass(frozen=True)
class StoreConfig:
    path: str = _k("", "SQLite database; empty: <state_dir>/lpgw.sqlite3")
    synchronous: str = _k("FULL", "FULL survives power loss; NORMAL only process crashes",
                          choices=("FULL", "NORMAL"))


@dataclass(frozen=True)
class ClusterConfig:
    """A site of several gateways on a NATS JetStream cluster (docs/cluster.md)."""

    enabled: bool = _k(False, "join a site of gateways on NATS JetStream; off: this box "
                              "alone, on its own SQLite file (no NATS at all)")
    site: str = _k("", "the site's name: every gateway of a site gives it, and shares its "
                       "token secret, device tokens and pin")
    servers: tuple[str, ...] = _k(("nats://127.0.0.1:4222",),
                                  "NATS URLs of the site's servers (nats:// or tls://)")
    credentials_file: str = _k("", "NATS credentials (.creds) for this gateway; empty: none")
    user: str = _k("", "NATS user name (with password_file; the role's nats-server has one "
                       "for the gateways); empty: none")
    password_file: str = _k("", "file holding the NATS user's password; empty: none")
    ca_file: str = _k("", "CA certificate to verify the NATS servers over TLS; empty: the "
                          "connection is not TLS unless a URL says tls://")
    replicas: int = _k(3, "copies of every accepted push and record (3 survives one node "
                          "lost; 1 only for a lab)", lo=1, hi=5)
    connect_timeout: float = _k(5.0, "seconds to reach NATS at start before giving up",
                                lo=0.5, hi=120)
    accept_timeout: float = _k(2.0, "seconds a push waits for the site's quorum before its "
                                    "answer is 503 (a NATS leader election takes 4.5-7 s)",
                               lo=0.2, hi=30)
    max_keeps: int = _k(2048, "pushes waiting for the site's quorum at once, at most; more "
                              "are answered 503 at once", lo=16, hi=100000)


@dataclass(frozen=True)
class LogConfig:
    level: str = _k("info", "log level", choices=("debug", "info", "warning", "error"))
    format: str = _k("text", "text: one readable line (time with its zone); json: one JSON "
                             "object per line (time in UTC, level, logger, message, fields)",
                     choices=("text", "json"))


@dataclass(frozen=True)
class Config:
    name: str = _k("lpgw", "this gateway's name, shown to operators and in Bonjour")
    state_dir: str = _k("", "where state lives; empty: $STATE_DIRECTORY, /var/lib/lpgw as "
                            "root, else ~/.local/state/lpgw")
    control_socket: str = _k("", "local socket for `lpgw send`; empty: <state_dir>/control.sock")
    listen: ListenConfig = field(default_factory=ListenConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    assertions: AssertionsConfig = field(default_factory=AssertionsConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    sip: SipConfig = field(default_factory=SipConfig)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    log: LogConfig = field(default_factory=LogConfig)

    # resolved paths

    @property
    def state_path(self) -> Path:
        if self.state_dir:
            return Path(self.state_dir).expanduser()
        if os.environ.get("STATE_DIRECTORY"):
            return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
        if os.geteuid() == 0:
            return Path("/var/lib/lpgw")
        base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
        return Path(base) / "lpgw"

    @property
    def cert_path(self) -> Path:
        return Path(self.tls.cert) if self.tls.cert else self.state_path / "gateway.crt"

    @property
    def key_path(self) -> Path:
        return Path(self.tls.key) if self.tls.key else self.state_path / "gateway.key"

    @property
    def store_path(self) -> Path:
        return Path(self.store.path) if self.store.path else self.state_path / "lpgw.sqlite3"

    @property
    def control_path(self) -> Path:
        return (Path(self.control_socket) if self.control_socket
                else self.state_path / "control.sock")


def load(path: str | Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """Read and check a config file; None means the embedded defaults. `overrides` (top
    level keys, from the command line: `lpgw run --state-dir`) win over the file, and are
    checked as the file is."""
    if path is None:
        return from_dict(dict(overrides or {}), "the command line") if overrides else Config()
    source = str(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE + 1)
    except OSError as exc:
        raise ConfigError([f"cannot read: {exc.strerror}"], source) from None
    if len(raw) > MAX_FILE:
        raise ConfigError([f"over {MAX_FILE} bytes; a config file is a few KB"], source)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError([f"line {line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); "
                           "save the file as UTF-8"], source) from None
    data = _parse(text, source)
    if data is None:
        data = {}
    if overrides and isinstance(data, dict):
        data = {**data, **overrides}
    return from_dict(data, source)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing nesting past MAX_DEPTH (its composer recurses: a deep
    file raised RecursionError) and values it cannot make (a 5,000-digit int raised
    ValueError), both with their line."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self._depth >= MAX_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} "
                                              "levels", self.peek_event().start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as exc:
            raise yaml.constructor.ConstructorError(
                None, None, f"not a valid value ({str(exc).split(';')[0][:120]})",
                node.start_mark) from None


def _parse(text: str, source: str) -> Any:
    loader: _Loader | None = None
    try:
        loader = _Loader(text)
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, source)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = " ".join((getattr(exc, "problem", None) or str(exc)).split())
        raise ConfigError([f"{where}not valid YAML: {problem}"], source) from None
    except RecursionError:  # not expected past the depth limit; never a traceback
        raise ConfigError(["nested too deeply"], source) from None
    finally:
        if loader is not None:
            loader.dispose()


def _children(node: yaml.Node) -> list[tuple[str, yaml.Node]]:
    """A node's children, each with the key path step that leads to it."""
    if isinstance(node, yaml.MappingNode):
        out = []
        for key, value in node.value:
            name = _key(key.value) if isinstance(key, yaml.ScalarNode) else "(a key)"
            out += [("(a key)", key), (name, value)]
        return out
    if isinstance(node, yaml.SequenceNode):
        return [(f"[{i}]", child) for i, child in enumerate(node.value)]
    return []


def _check_expansion(root: yaml.Node, source: str) -> None:
    """Refuse what YAML aliases would blow up: over MAX_VALUES values or MAX_DEPTH levels
    once expanded, or an alias inside what it names. Measured without expanding
    (each node once, no recursion), so a "billion laughs" file costs its own size."""
    size: dict[int, int] = {}
    height: dict[int, int] = {}
    entered: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        kids = [kid for _, kid in _children(node)]
        if finished:
            size[id(node)] = min(1 + sum(size[id(k)] for k in kids), MAX_VALUES + 1)
            height[id(node)] = 1 + max((height[id(k)] for k in kids), default=0)
            entered.discard(id(node))
            continue
        if id(node) in size:
            continue
        entered.add(id(node))
        stack.append((node, True))
        for kid in kids:
            if id(kid) in entered:
                mark = kid.start_mark
                raise ConfigError([f"line {mark.line + 1}, column {mark.column + 1}: a YAML "
                                   "alias refers to a value that contains it"], source)
            if id(kid) not in size:
                stack.append((kid, False))
    if size[id(root)] > MAX_VALUES:
        path = _blame(root, lambda kid, depth: size[id(kid)] > MAX_VALUES)
        raise ConfigError([f"{path}: more than {MAX_VALUES} values (each YAML alias "
                           "counted as a copy of what it names)"], source)
    if height[id(root)] > MAX_DEPTH:
        path = _blame(root, lambda kid, depth: depth + height[id(kid)] - 1 > MAX_DEPTH)
        raise ConfigError([f"{path}: nested deeper than {MAX_DEPTH} levels (through YAML "
                           "aliases)"], source)


def _blame(root: yaml.Node, over: Any) -> str:
    """The key path down to where a limit is passed: follow the child that passes it."""
    path, node, depth = "", root, 1
    while len(path) < 120:
        step = next(((name, kid) for name, kid in _children(node) if over(kid, depth + 1)),
                    None)
        if step is None:
            break
        name, node = step
        depth += 1
        path += name if name.startswith("[") or not path else f".{name}"
    return path or "(top level)"


def from_dict(data: Any, source: str = "") -> Config:
    problems: list[str] = []
    config = _build(Config, data, "", problems)
    if not problems:
        problems.extend(_cross_checks(config))
    if problems:
        raise ConfigError(problems, source)
    return config


def _build(cls: type, data: Any, prefix: str, problems: list[str]) -> Any:
    if not isinstance(data, dict):
        problems.append(f"{prefix.rstrip('.') or '(top level)'}: must be a mapping of keys")
        return cls()
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{_key(key)}"
        if key not in fields:
            close = (difflib.get_close_matches(str(key)[:64], fields, n=1)
                     if len(problems) < MAX_SHOWN else None)  # hints only for those shown
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            problems.append(f"{path}: unknown key{hint}")
            continue
        f = fields[key]
        kind = hints[key]
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            values[key] = _build(kind, value if value is not None else {}, f"{path}.", problems)
            continue
        if typing.get_origin(kind) is tuple:
            values[key] = _build_list(typing.get_args(kind)[0], value, path, problems)
            continue
        checked = _check(path, value, kind, f.metadata, problems)
        if checked is not None:
            values[key] = checked
    return cls(**values)


def _build_list(item: type, value: Any, path: str, problems: list[str]) -> tuple:
    if value is None:
        return ()
    if not isinstance(value, list):
        problems.append(f"{path}: must be a list")
        return ()
    if dataclasses.is_dataclass(item):
        return tuple(_build(item, v, f"{path}[{i}].", problems) for i, v in enumerate(value))
    out = []
    for i, v in enumerate(value):
        if not isinstance(v, item):
            problems.append(f"{path}[{i}]: must be a {item.__name__}")
        else:
            out.append(v)
    return tuple(out)


def _check(path: str, value: Any, kind: type, meta: Any, problems: list[str]) -> Any:
    shown = "(hidden)" if meta.get("secret") else _SHORT.repr(value)
    if kind is bool:
        if not isinstance(value, bool):
            problems.append(f"{path}: must be true or false (got {shown})")
            return None
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{path}: must be a whole number (got {shown})")
            return None
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            problems.append(f"{path}: must be a number (got {shown})")
            return None
        if isinstance(value, float) and not math.isfinite(value):  # NaN passes lo and hi
            problems.append(f"{path}: must be a finite number (got {shown})")
            return None
    elif kind is str:
        if value is None:
            value = ""
        if not isinstance(value, str):
            problems.append(f"{path}: must be a string (got {shown})")
            return None
    lo, hi, choices = meta.get("lo"), meta.get("hi"), meta.get("choices")
    if lo is not None and value < lo:
        problems.append(f"{path}: must be at least {lo} (got {shown})")
        return None
    if hi is not None and value > hi:
        problems.append(f"{path}: must be at most {hi} (got {shown})")
        return None
    if choices:  # words are taken in any case (FULL, full), and kept as the choice spells it
        chosen = [c for c in choices if str(c).lower() == str(value).lower()]
        if not chosen:
            problems.append(f"{path}: must be one of {', '.join(choices)} (got {shown})")
            return None
        value = chosen[0]
    return float(value) if kind is float else value  # after the range: a huge int overflows


SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")


def _cluster_checks(c: ClusterConfig) -> list[str]:
    if not c.enabled:
        return []
    problems = []
    if not SITE_NAME.fullmatch(c.site):
        problems.append("cluster.site: a name of letters, digits, '-' and '_' (at most 63), "
                        "the same on every gateway of the site")
    if not c.servers:
        problems.append("cluster.servers: at least one NATS URL")
    for url in c.servers:
        if not re.fullmatch(r"(nats|tls)://[^\s/]+:\d{1,5}", url):
            problems.append(f"cluster.servers: {url[:60]!r} is not nats://host:port or "
                            "tls://host:port")
    if bool(c.user) != bool(c.password_file):
        problems.append("cluster: set both user and password_file, or neither")
    for key, value in (("cluster.credentials_file", c.credentials_file),
                       ("cluster.password_file", c.password_file),
                       ("cluster.ca_file", c.ca_file)):
        if value and not os.access(value, os.R_OK):
            problems.append(f"{key}: cannot read {value}")
    return problems


def _cross_checks(c: Config) -> list[str]:
    problems = []
    if not (c.listen.quic or c.listen.tls):
        problems.append("listen: at least one of quic and tls must be true")
    if bool(c.tls.cert) != bool(c.tls.key):
        problems.append("tls: set both cert and key, or neither")
    for key, value in (("tls.cert", c.tls.cert), ("tls.key", c.tls.key),
                       ("assertions.hs256_secret_file", c.assertions.hs256_secret_file),
                       ("assertions.es256_public_key_file", c.assertions.es256_public_key_file)):
        if value and not os.access(value, os.R_OK):
            problems.append(f"{key}: cannot read {value}")
    key_file = c.assertions.es256_public_key_file
    if key_file and os.access(key_file, os.R_OK) and (problem := _text_file_problem(key_file)):
        problems.append(f"assertions.es256_public_key_file: {problem}")
    if c.assertions.hs256_secret and c.assertions.hs256_secret_file:
        problems.append("assertions: set hs256_secret or hs256_secret_file, not both")
    if c.assertions.required and not (c.assertions.hs256_secret or
                                      c.assertions.hs256_secret_file or
                                      c.assertions.es256_public_key_file):
        problems.append("assertions.required: true needs a key (hs256_secret_file or "
                        "es256_public_key_file)")
    problems.extend(_api_checks(c.api))
    problems.extend(_network_problems("delivery.new_device_exempt",
                                      c.delivery.new_device_exempt))
    problems.extend(_sip_checks(c.sip))
    problems.extend(_cluster_checks(c.cluster))
    secret = hs256_secret(c) if not problems else None
    if secret is not None and len(secret) < 32:
        problems.append("assertions.hs256_secret: must be at least 32 bytes")
    return problems


def _text_file_problem(path: str) -> str | None:
    """Why a file the gateway reads as text cannot be (else None): at start it would be a
    traceback."""
    try:
        with open(path, "rb") as f:
            f.read(MAX_FILE).decode("utf-8")
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"
    except UnicodeDecodeError:
        return f"{path} is not UTF-8 text"
    return None


def _api_checks(api: ApiConfig) -> list[str]:
    problems = []
    if bool(api.cert) != bool(api.key):
        problems.append("api: set both cert and key, or neither")
    for key, value in (("api.cert", api.cert), ("api.key", api.key),
                       ("api.admin_token_file", api.admin_token_file)):
        if value and not os.access(value, os.R_OK):
            problems.append(f"{key}: cannot read {value}")
    if api.admin_token_file and os.access(api.admin_token_file, os.R_OK):
        problem = _text_file_problem(api.admin_token_file)
        if problem:
            problems.append(f"api.admin_token_file: {problem}")
        elif len(Path(api.admin_token_file).read_text().strip()) < 16:
            problems.append("api.admin_token_file: the token must be at least 16 characters")
    seen = set()
    for i, p in enumerate(api.providers):
        where = f"api.providers[{i}]"
        if not re.fullmatch(r"[A-Z0-9]{10}", p.team_id):
            problems.append(f"{where}.team_id: must be 10 capital letters or digits")
        if not re.fullmatch(r"[A-Z0-9]{10}", p.key_id):
            problems.append(f"{where}.key_id: must be 10 capital letters or digits")
        if p.key_id in seen:
            problems.append(f"{where}.key_id: {p.key_id} is listed twice")
        seen.add(p.key_id)
        if not p.topics:
            problems.append(f"{where}.topics: list at least one bundle id")
        for topic in p.topics:
            suffix = next((s for s in TOPIC_SUFFIX.values() if topic.endswith(s)), None)
            if suffix is not None:
                problems.append(
                    f"{where}.topics: {topic!r} ends in {suffix!r}, a push type's suffix; "
                    f"list the app's bundle id ({topic[: -len(suffix)]!r}): the suffix "
                    "belongs in apns-topic, and a key for the app may send every push type")
        try:
            load_public_key(Path(p.key_file).read_bytes())
        except OSError as exc:
            problems.append(f"{where}.key_file: cannot read {p.key_file}: {exc.strerror}")
        except (ValueError, TypeError) as exc:
            problems.append(f"{where}.key_file: not a P-256 key: {exc}")
    return problems


def _sip_checks(sip: SipConfig) -> list[str]:
    problems = []
    for i, route in enumerate(sip.routes):
        try:
            pattern = re.compile(route.match)
            pattern.sub(route.user, "")
        except (re.error, IndexError) as exc:
            problems.append(f"sip.routes[{i}]: {exc}")
        if not route.match or not route.user:
            problems.append(f"sip.routes[{i}]: needs match and user")
    for i, binding in enumerate(sip.static_bindings):
        if not binding.user:
            problems.append(f"sip.static_bindings[{i}].user: is required")
        for j, token in enumerate(binding.tokens):
            if not is_token(token):
                problems.append(f"sip.static_bindings[{i}].tokens[{j}]: not a device token")
    problems.extend(_network_problems("sip.trusted", sip.trusted))
    auth = sip.inbound_auth
    if auth.enabled and not auth.credentials_file:
        problems.append("sip.inbound_auth.credentials_file: needed when enabled")
    elif auth.credentials_file:
        problem = _text_file_problem(auth.credentials_file)
        if problem:
            problems.append(f"sip.inbound_auth.credentials_file: {problem}")
        elif auth.enabled and not any(
                ":" in line for line in Path(auth.credentials_file).read_text().splitlines()):
            problems.append("sip.inbound_auth.credentials_file: no 'user:password' line")
    if sip.register and not sip.pbx_host:
        problems.append("sip.register: needs sip.pbx_host")
    for i, reg in enumerate(sip.register):
        if not reg.user:
            problems.append(f"sip.register[{i}].user: is required")
        if not reg.password_file or not os.access(reg.password_file, os.R_OK):
            problems.append(f"sip.register[{i}].password_file: cannot read "
                            f"{reg.password_file or '(empty)'}")
    return problems


def _network_problems(key: str, values: tuple[str, ...]) -> list[str]:
    """Each entry must be an IPv4/IPv6 address or network (CIDR), host bits allowed."""
    problems = []
    for i, value in enumerate(values):
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            problems.append(f"{key}[{i}]: not an address or network: {_SHORT.repr(value)}")
    return problems


def hs256_secret(c: Config) -> bytes | None:
    if c.assertions.hs256_secret_file:
        return Path(c.assertions.hs256_secret_file).read_bytes().strip()
    if c.assertions.hs256_secret:
        return c.assertions.hs256_secret.encode()
    return None


def schema_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every key path, for the documentation check."""
    keys = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if typing.get_origin(hints[f.name]) is tuple:
            keys.append(f"{prefix}{f.name}")
        elif dataclasses.is_dataclass(hints[f.name]):
            keys.extend(schema_keys(hints[f.name], f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys
