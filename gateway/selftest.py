"""`lpgw selftest`: prove on the device, in seconds, that the whole path works.

Offline checks need no running gateway (config, certificate, clock, store, disk); online
checks drive the running one the way phones and the PBX do: a reference device over QUIC
and over TLS receiving a test push, SIP OPTIONS over UDP and TCP, an INVITE that rings the
test device and is cancelled, the provider API, the Bonjour record, PBX registrations.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import secrets
import shutil
import socket
import sqlite3
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from sipmessage import AuthChallenge

from gateway import certs, config, store
from gateway.client import DeviceClient, DeviceOptions
from gateway.core.tokens import SELFTEST_TOPIC, selftest_install
from gateway.sip.message import parse as parse_sip
from gateway.sip.register import Account, digest
from gateway.sip.trust import read_credentials
from gateway.transport import control

CLOCK_FLOOR = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)  # older: no RTC, no NTP yet
EXPIRY_MARGIN = datetime.timedelta(days=30)
MIN_FREE = 200 * 1024 * 1024


@dataclass
class Check:
    name: str
    ok: bool | None  # None: not applicable here
    detail: str = ""
    fix: str = ""


def _check(name: str, ok: bool, detail: str, fix: str = "") -> Check:
    return Check(name, ok, detail, "" if ok else fix)


# --- offline -----------------------------------------------------------------------------


def offline_checks(path: str | None, now: datetime.datetime | None = None
                   ) -> tuple[list[Check], config.Config | None]:
    now = now or datetime.datetime.now(datetime.UTC)
    try:
        cfg = config.load(path)
    except config.ConfigError as exc:
        return [Check("config", False, str(exc), "fix the key named above; "
                      "`lpgw check-config -c FILE` checks a file")], None
    checks = [Check("config", True, path or "embedded defaults")]
    checks += _certificate_checks(cfg, now)
    checks.append(_store_check(cfg, path))
    checks.append(_disk_check(cfg))
    return checks, cfg


def _certificate_checks(cfg: config.Config, now: datetime.datetime) -> list[Check]:
    if not cfg.cert_path.exists():
        return [Check("certificate", False, f"{cfg.cert_path} is missing",
                      "start the gateway once (it makes one) or install the site certificate")]
    try:
        cert = certs.load_cert(cfg.cert_path)
        key = serialization.load_pem_private_key(cfg.key_path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        return [Check("certificate", False, f"unreadable: {exc}",
                      f"check {cfg.cert_path} and {cfg.key_path}")]
    pin = certs.spki_pin(cert)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    matches = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == cert.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    # a clock before the start is the clock's fault (checked below), not the certificate's
    out = [_check("certificate", matches and now <= end - EXPIRY_MARGIN,
                  f"sha256/{pin}, valid {start:%Y-%m-%d} to {end:%Y-%m-%d}"
                  + ("" if matches else "; the key does not belong to it")
                  + (" (not yet, by this clock: see clock)" if now < start else ""),
                  "renew the certificate with the SAME key (phones pin the key): see README"
                  if matches else f"{cfg.key_path} is not the key of {cfg.cert_path}")]
    clock_ok = now >= start and now >= CLOCK_FLOOR
    out.append(_check(
        "clock", clock_ok, f"now {now:%Y-%m-%d %H:%M} UTC",
        "the clock is behind the certificate's start: every TLS handshake fails until it is "
        "right. A Raspberry Pi has no RTC: fit one (see hardware.md) or let NTP reach "
        "a time server, then restart lpgw"))
    return out


def _store_check(cfg: config.Config, path: str | None = None) -> Check:
    """The database, and the token secret every device token depends on."""
    secret = _secret_problem(cfg)
    if not cfg.store_path.exists():
        if secret is not None:
            return Check("store", False, secret[0], secret[1])
        return Check("store", None, "no database yet (made on first start)")
    config_arg = f" -c {path}" if path else ""
    fix = (f"the gateway refuses to start on it. Stop lpgw, then restore the state directory "
           f"from its backup (hardware.md, \"Backup and restore\"), or keep what can still be "
           f"read: `lpgw db salvage{config_arg} --replace`")
    try:
        store.check_header(cfg.store_path)
        result, devices = _read_only_integrity(cfg.store_path)
    except store.DamagedStore as exc:
        return Check("store", False, exc.problem, fix)
    except sqlite3.Error as exc:
        return Check("store", False, f"damaged: SQLite cannot read it ({exc})", fix)
    if result != "ok":
        return Check("store", False, f"damaged: quick_check says {result}", fix)
    if secret is not None:
        return Check("store", False, secret[0], secret[1])
    secret_path = cfg.state_path / store.SECRET_FILE
    kept = (f"token secret in {secret_path.name}" if secret_path.exists()
            else f"no {secret_path.name} yet (written at the next start)")
    return Check("store", True, f"integrity ok, {devices} devices; {kept}")


def _secret_problem(cfg: config.Config) -> tuple[str, str] | None:
    """What is wrong with the token secret's file (unreadable, readable by others, not the
    database's), with what to do; None when nothing is."""
    path = cfg.state_path / store.SECRET_FILE
    try:
        secret = store.read_secret_file(path)
    except (store.StoreError, OSError) as exc:
        return str(exc), f"restore {path} from the backup of the state directory"
    if secret is None:
        return None
    in_db = None
    if cfg.store_path.exists():
        with contextlib.suppress(sqlite3.Error, store.StoreError):
            store.check_header(cfg.store_path)
            in_db = _read_only_meta(cfg.store_path, "token_secret")
    if in_db is not None and in_db != secret:
        return (f"{path} and the database hold different token secrets",
                "the gateway refuses to start: put back the secret file taken with this "
                f"database (the backup), or move {path} away to keep the database's")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        return (f"{path} is readable by others (mode {mode:o})",
                f"chmod 600 {path}: whoever reads it can work out device tokens")
    return None


def _read_only_meta(path: Path, key: str) -> bytes | None:
    live = Path(f"{path}-wal").exists()
    db = sqlite3.connect(f"file:{path}?{'mode=ro' if live else 'immutable=1'}", uri=True)
    try:
        row = db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
    finally:
        db.close()
    return None if row is None else bytes(row[0])


def _read_only_integrity(path: Path) -> tuple[str, int]:
    """quick_check without writing a byte: run as root, the self-test must not leave
    root-owned -wal/-shm files the service then cannot open."""
    # no -wal file: nobody is writing (the service is stopped, or never wrote), so the file
    # can be read as immutable, which creates no -wal/-shm either
    live = Path(f"{path}-wal").exists()
    db = sqlite3.connect(f"file:{path}?{'mode=ro' if live else 'immutable=1'}", uri=True)
    try:
        result = db.execute("PRAGMA quick_check").fetchone()[0]
        devices = db.execute("SELECT count(*) FROM devices").fetchone()[0]
    finally:
        db.close()
    return result, devices


def _disk_check(cfg: config.Config) -> Check:
    where = cfg.state_path if cfg.state_path.exists() else cfg.state_path.parent
    usage = shutil.disk_usage(where)
    return _check("disk", usage.free >= MIN_FREE,
                  f"{usage.free // 2**20} MiB free of {usage.total // 2**20} MiB at {where}",
                  "free space: journald (`journalctl --vacuum-size=50M`), old files. Once it "
                  "is full, pushes get 503 and new phones `bye unavailable`; the gateway "
                  "recovers by itself when space is back")


# --- online ------------------------------------------------------------------------------


async def online_checks(cfg: config.Config, timeout: float = 8.0) -> list[Check]:
    try:
        status = (await control.request(cfg.control_path, {"op": "status"}, 3))["status"]
    except (OSError, TimeoutError, KeyError) as exc:
        return [Check("gateway", False, f"no answer on {cfg.control_path}: {exc}",
                      "is it running? `systemctl status lpgw`, `journalctl -u lpgw -b`")]
    checks = [Check("gateway", True, f"{status['name']} ({status['gateway_id']}), up "
                    f"{status['uptime']:.0f} s")]
    storage = status.get("storage")
    if storage is not None:
        checks.append(_storage_check(storage))
    pin = status["pin"]
    host = _loopback(status["listen"]["host"])
    port = status["listen"]["port"]
    jobs: list[tuple[str, Awaitable[list[Check]]]] = [
        (f"device over {t}", _device_check(cfg, status, t, host, port, pin, timeout))
        for t in status["listen"]["transports"]]
    sip = status.get("sip")
    if sip:
        jobs += [(f"sip {t}", _sip_options(_loopback(sip["host"]), sip["port"], t))
                 for t in ("udp", "tcp")]
    if status.get("api"):
        jobs.append(("provider api", _api_check(_loopback(cfg.api.host),
                                                status["api"]["port"])))
    jobs.append(("bonjour", _mdns_check(cfg, status)))
    results = await asyncio.gather(*(asyncio.wait_for(j, timeout) for _, j in jobs),
                                   return_exceptions=True)
    for (name, _), result in zip(jobs, results, strict=True):
        if isinstance(result, BaseException):
            checks.append(Check(name, False, f"{type(result).__name__}: {result}".strip(),
                                "`journalctl -u lpgw -b` says why"))
        else:
            checks.extend(result)
    checks += _site_checks(status)
    checks += _network_checks(cfg, status)
    checks += _pbx_checks(status)
    return checks


def _storage_check(storage: dict) -> Check:
    """What the running gateway itself saw of its store: a full disk refuses pushes."""
    free = f", {storage['free_mib']} MiB free" if "free_mib" in storage else ""
    if storage.get("ok"):
        return Check("storage writes", True, f"the gateway writes to its store{free}")
    since = datetime.datetime.fromtimestamp(storage.get("failing_since", 0), datetime.UTC)
    return Check("storage writes", False,
                 f"failing since {since:%H:%M:%S} UTC: {storage.get('error')}{free}",
                 f"free space under {storage.get('state_dir')} (`df -h`, `du -xsh`): until "
                 "then pushes get 503 ServiceUnavailable and new phones are turned away; "
                 "the gateway recovers by itself")


def _loopback(host: str) -> str:
    return "127.0.0.1" if host in ("::", "0.0.0.0", "") else host


async def _device_check(cfg: config.Config, status: dict, transport: str, host: str,
                        port: int, pin: str, timeout: float) -> list[Check]:
    """A reference device receives a test push (and, over QUIC, rings and ends a SIP call)."""
    events: asyncio.Queue[dict] = asyncio.Queue()
    # the gateway knows this install id: it keeps the device out of its counters and
    # deletes it, with its pushes, once it disconnects
    install = selftest_install(status["gateway_id"], transport)
    name = f"device over {transport}"
    assertion = _assertion(cfg)
    if cfg.assertions.required and assertion is None:
        return [Check(name, None, "assertions are required and only the backend's ES256 key "
                      "can sign one: test with a reference device and a real assertion")]
    device = DeviceClient(DeviceOptions(host=host, port=port, pin=pin, transport=transport,
                                        install_id=install, topic=SELFTEST_TOPIC,
                                        push_types=("alert", "voip"), assertion=assertion,
                                        reconnect=False),
                          events.put_nowait)
    task = asyncio.create_task(device.run())
    try:
        welcome = await _next(events, "welcome", timeout)
        token = welcome["token"]
        marker = secrets.token_hex(4)
        reply = await control.request(cfg.control_path, {
            "op": "send", "token": token, "push_type": "alert", "expiration": 0,
            "payload": {"selftest": marker}})
        if not reply.get("ok"):
            return [Check(name, False, f"test push refused: {reply}", "see the journal")]
        push = await _next(events, "push", timeout)
        checks = [_check(name, push["payload"] == {"selftest": marker},
                         f"welcome and a test push on port {port}", "see the journal")]
        sip = status.get("sip")
        if transport == "quic" and sip:
            checks.append(await _sip_call(cfg, sip, token, events, timeout))
        if transport == "quic" and status.get("cluster"):
            checks.append(await _across_the_site(cfg, status, token, events, timeout))
        return checks
    finally:
        device.stop()
        await asyncio.wait_for(task, 3)


def _site_checks(status: dict) -> list[Check]:
    """The site as this gateway sees it: its NATS connection and the gateways alive."""
    site = status.get("cluster")
    if not site:
        return []
    others = sorted(set(site.get("gateways", {})) - {status["gateway_id"]})
    return [
        _check("site", bool(site.get("connected")),
               f"site {site['site']} ({site.get('site_id')}) through {site.get('server')}: "
               f"{len(others)} other gateway(s) alive, {site.get('site_devices', 0)} devices",
               "the site's NATS is not reachable: pushes get 503 until it is "
               "(`systemctl status nats-server` on the site's nodes, docs/cluster.md)")]


async def _across_the_site(cfg: config.Config, status: dict, token: str,
                           events: asyncio.Queue, timeout: float) -> Check:
    """A test push accepted by another gateway of the site reaches the test device here:
    kept by the site's stream, handed out by this gateway."""
    from gateway.cluster.remote import control_subject  # NATS: only for a site
    from gateway.cluster.site import connect

    site = status["cluster"]
    others = sorted(set(site.get("gateways", {})) - {status["gateway_id"]})
    if not others:
        return Check("push across the site", None, "no other gateway of the site is alive")
    via = others[0]
    marker = secrets.token_hex(4)
    nc = await connect(cfg.cluster)
    try:
        reply = await nc.request(control_subject(cfg.cluster.site, via), json.dumps({
            "op": "send", "token": token, "push_type": "alert",
            "expiration": int(time.time()) + 60,
            "payload": {"selftest": marker}}).encode(), timeout=timeout)
    finally:
        await nc.close()
    answer = json.loads(reply.data)
    name = f"push across the site (via {site['gateways'][via].get('name') or via})"
    if not answer.get("ok"):
        return Check(name, False, f"refused: {answer}", "see that gateway's journal")
    push = await _next(events, "push", timeout)
    return _check(name, push["payload"] == {"selftest": marker},
                  "accepted there, kept by the site, delivered here", "see the journals")


def _assertion(cfg: config.Config) -> str | None:
    """A short-lived user assertion, when this gateway's HS256 secret is readable here."""
    try:
        secret = config.hs256_secret(cfg)
    except OSError:
        return None
    if not secret:
        return None
    claims: dict = {"sub": "lpgw-selftest", "exp": int(time.time()) + 120}
    if cfg.assertions.issuer:
        claims["iss"] = cfg.assertions.issuer
    if cfg.assertions.audience:
        claims["aud"] = cfg.assertions.audience
    return jwt.encode(claims, secret, algorithm="HS256")


async def _next(events: asyncio.Queue, kind: str, timeout: float) -> dict:
    async with asyncio.timeout(timeout):
        while True:
            event = await events.get()
            if event["event"] == kind:
                return event
            if event["event"] == "disconnected":
                raise ConnectionError(f"{event.get('reason')}: {event.get('message')}")


async def _sip_call(cfg: config.Config, sip: dict, token: str, events: asyncio.Queue,
                    timeout: float) -> Check:
    """INVITE -> the test device's push -> 180 -> CANCEL -> 487, through the SIP port."""
    user = f"lpgw-selftest-{token[:8]}"
    bound = await control.request(cfg.control_path, {"op": "bind", "token": token,
                                                     "user": user})
    if not bound.get("ok"):
        return Check("sip call", False, f"cannot bind the test device: {bound}")
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        sock.bind(("127.0.0.1", 0))
        target = (_loopback(sip["host"]), sip["port"])
        port = sock.getsockname()[1]
        branch = "z9hG4bK-selftest-" + secrets.token_hex(6)
        call_id = f"{branch}@selftest"
        sock.sendto(_sip_request("INVITE", user, port, branch, target, call_id), target)
        cseq = 1
        if cfg.sip.inbound_auth.enabled:  # answer the gateway's challenge, as the PBX does
            branch, cseq = await _authenticate(cfg, loop, sock, user, port, branch, target,
                                               call_id, timeout)
        try:  # a part of the job's time: the job's own timeout would say less
            call = await _next(events, "push", timeout / 4)
        except TimeoutError:
            return Check("sip call", False, "the INVITE rang no device in time",
                         "with sip.inbound_auth: its credentials_file's first line must be "
                         "what the gateway loaded (reload it); else `journalctl -u lpgw`")
        if "call" not in call["payload"]:
            return Check("sip call", False, "the device got no incoming-call push")
        statuses = await _sip_statuses(loop, sock, {180}, timeout)
        sock.sendto(_sip_request("CANCEL", user, port, branch, target, call_id, cseq), target)
        statuses |= await _sip_statuses(loop, sock, {487}, timeout)
        ended = await _next(events, "push", timeout)
        sock.sendto(_sip_request("ACK", user, port, branch, target, call_id, cseq), target)
        ok = {180, 487} <= statuses and "call_ended" in ended["payload"]
        return _check("sip call", ok, "INVITE -> push -> 180 -> CANCEL -> 487 -> call ended",
                      f"got {sorted(statuses)}; see `journalctl -u lpgw`")
    finally:
        sock.close()
        await control.request(cfg.control_path, {"op": "bind", "token": token, "user": None})


async def _authenticate(cfg: config.Config, loop, sock: socket.socket, user: str, port: int,
                        branch: str, target: tuple[str, int], call_id: str,
                        timeout: float) -> tuple[str, int]:
    """sip.inbound_auth: the 401 to the first INVITE is ACKed and the INVITE sent again
    with credentials from the site's file (its first line); returns its branch and CSeq."""
    challenge = None
    async with asyncio.timeout(timeout):
        while challenge is None:
            answer = parse_sip(await loop.sock_recv(sock, 65535))
            if answer.status == 401:
                challenge = answer.get("www-authenticate")
    sock.sendto(_sip_request("ACK", user, port, branch, target, call_id), target)
    name, password = next(iter(read_credentials(
        Path(cfg.sip.inbound_auth.credentials_file).read_text()).items()))
    uri = f"sip:{user}@{target[0]}:{target[1]}"
    creds = digest(AuthChallenge.parse(challenge), Account(name, password, ""), "INVITE", uri, 1)
    branch = "z9hG4bK-selftest-" + secrets.token_hex(6)
    sock.sendto(_sip_request("INVITE", user, port, branch, target, call_id, 2,
                             f"Authorization: {creds}\r\n"), target)
    return branch, 2


def _sip_request(method: str, user: str, port: int, branch: str, target: tuple[str, int],
                 call_id: str, cseq: int = 1, extra: str = "") -> bytes:
    return (f"{method} sip:{user}@{target[0]}:{target[1]} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch={branch};rport\r\n"
            f"From: \"lpgw selftest\" <sip:selftest@127.0.0.1>;tag=st\r\n"
            f"To: <sip:{user}@{target[0]}>\r\nCall-ID: {call_id}\r\n"
            f"CSeq: {cseq} {'INVITE' if method == 'ACK' else method}\r\n{extra}"
            f"Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n").encode()


async def _sip_statuses(loop, sock: socket.socket, want: set[int],
                        timeout: float) -> set[int]:
    seen: set[int] = set()
    async with asyncio.timeout(timeout):
        while not want <= seen:
            data = await loop.sock_recv(sock, 65535)
            seen.add(int(data.split(b" ", 2)[1]))
    return seen


async def _sip_options(host: str, port: int, transport: str) -> list[Check]:
    request = (f"OPTIONS sip:lpgw@{host}:{port} SIP/2.0\r\n"
               f"Via: SIP/2.0/{transport.upper()} 127.0.0.1:9;branch=z9hG4bK-st"
               f"{secrets.token_hex(6)};rport\r\nFrom: <sip:selftest@127.0.0.1>;tag=st\r\n"
               f"To: <sip:lpgw@{host}>\r\nCall-ID: {secrets.token_hex(8)}@selftest\r\n"
               f"CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n").encode()
    name = f"sip {transport}"
    if transport == "tcp":
        # from loopback, as the UDP check: trusted whatever address sip.host names
        local = ("127.0.0.1", 0) if ":" not in host else None
        reader, writer = await asyncio.open_connection(host, port, local_addr=local)
        try:
            writer.write(request)
            answer = await reader.readuntil(b"\r\n")
        finally:
            writer.close()
    else:
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.bind(("127.0.0.1", 0))
            # rport sends the answer to our real port, whatever the Via says
            sock.sendto(request, (host, port))
            answer = await loop.sock_recv(sock, 65535)
    ok = answer.startswith(b"SIP/2.0 200")
    first = answer.split(b"\r\n")[0].decode(errors="replace")
    return [_check(name, ok, f"OPTIONS on {port}: {first}",
                   "check sip.* in the config and the journal")]


async def _api_check(host: str, port: int) -> list[Check]:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # liveness only; providers verify the certificate
    ctx.set_alpn_protocols(["http/1.1"])
    reader, writer = await asyncio.open_connection(host, port, ssl=ctx)
    try:
        writer.write(b"GET /v1/health HTTP/1.1\r\nHost: lpgw\r\nConnection: close\r\n\r\n")
        head = await reader.readuntil(b"\r\n")
    finally:
        writer.close()
    ok = head.startswith(b"HTTP/1.1 200")
    return [_check("provider api", ok, f"GET /v1/health on {port}: {head.decode().strip()}",
                   "check api.* in the config and the journal")]


async def _mdns_check(cfg: config.Config, status: dict) -> list[Check]:
    if not cfg.discovery.enabled:
        return [Check("bonjour", None, "discovery is off in the config")]
    from gateway.net.browse import Browser

    browser = Browser(tuple(status["listen"]["transports"]))
    await browser.start()
    try:
        found = await browser.wait(
            lambda f: any(x.gateway_id == status["gateway_id"] for x in f), 4)
    finally:
        await browser.close()
    mine = [f for f in found if f.gateway_id == status["gateway_id"]]
    if not mine:
        return [Check("bonjour", False, "this gateway's record is not visible from itself",
                      "check discovery.* (interfaces, require_ssid) and `lpgw status` network")]
    pins = {f.pin for f in mine}
    return [_check("bonjour", pins == {status["pin"]},
                   f"{mine[0].instance!r} on {', '.join(mine[0].addresses)}",
                   f"the advertised pin {pins} is not the certificate's {status['pin']}: "
                   "restart lpgw after changing the certificate")]


def _network_checks(cfg: config.Config, status: dict) -> list[Check]:
    """Interfaces up and the SSID as configured: the gateway advertises, or says why not."""
    if not cfg.discovery.enabled:
        return [Check("network", None, "discovery is off in the config")]
    network = status.get("network") or {}
    addresses = ", ".join(network.get("addresses") or []) or "none"
    reason = network.get("reason") or network.get("error") or "unknown"
    return [_check("network", bool(network.get("advertising")),
                   f"advertising on {addresses}" if network.get("advertising")
                   else f"not advertising: {reason}",
                   "check discovery.interfaces / wifi_only / require_ssid and the Wi-Fi "
                   "association (`lpgw status` shows the interfaces it sees)")]


def _pbx_checks(status: dict) -> list[Check]:
    pbx = (status.get("sip") or {}).get("pbx")
    if not pbx:
        return []
    checks = [_check("pbx", bool(pbx.get("reachable")), f"{pbx['pbx']} answers OPTIONS",
                     "the PBX does not answer: check sip.pbx_host/pbx_port and the firewall")]
    for reg in pbx.get("registrations", []):
        checks.append(_check(f"registration {reg['user']}", reg["state"] == "registered",
                             f"{reg['state']}" + (f": {reg['error']}" if reg.get("error")
                                                  else ""),
                             "check the account's password file and the PBX's logs"))
    return checks


# --- the command -------------------------------------------------------------------------


def run(path: str | None, offline: bool, as_json: bool,
        print_: Callable[[str], None] = print) -> int:
    started = time.monotonic()
    checks, cfg = offline_checks(path)
    if cfg is not None and not offline:
        checks += asyncio.run(online_checks(cfg))
    ok = all(c.ok is not False for c in checks)
    seconds = round(time.monotonic() - started, 2)
    if cfg is not None and not offline:
        _report(cfg, ok, [c.name for c in checks if c.ok is False])
    if as_json:
        print_(json.dumps({"ok": ok, "seconds": seconds,
                           "checks": [asdict(c) for c in checks]}))
    else:
        print_(render(checks, ok, seconds))
    return 0 if ok else 1


async def in_gateway(cfg: config.Config) -> list[Check]:
    """The self-test as the console runs it, inside the running gateway: its certificate,
    its disk, and every online check (a device over each transport, SIP, the API, Bonjour,
    the site), each a client of the gateway like `lpgw selftest`'s."""
    now = datetime.datetime.now(datetime.UTC)
    return [*_certificate_checks(cfg, now), _disk_check(cfg), *await online_checks(cfg)]


def _report(cfg: config.Config, ok: bool, failed: list[str]) -> None:
    """Tell the running gateway how the self-test went (its /metrics says it, for the
    alert on a failing self-test); a gateway that does not answer is already a failed
    check above."""
    with contextlib.suppress(OSError, TimeoutError, ValueError):
        asyncio.run(control.request(cfg.control_path, {
            "op": "selftest_report", "ok": ok, "failed": failed[:64]}, 3))


def render(checks: list[Check], ok: bool, seconds: float) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        mark = {True: "ok  ", False: "FAIL", None: "n/a "}[c.ok]
        lines.append(f"{mark}  {c.name:<{width}}  {c.detail}")
        if c.fix:
            lines.append(f"      {'':<{width}}  -> {c.fix}")
    failed = sum(c.ok is False for c in checks)
    lines.append(f"\n{'all checks passed' if ok else f'{failed} check(s) FAILED'} "
                 f"in {seconds} s")
    return "\n".join(lines)


