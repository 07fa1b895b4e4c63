"""`lpgw run | device | send | pin | status | check-config | discover | db salvage|backup`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import socket
import sqlite3
import stat
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from gateway import __version__, certs, config, logs

if TYPE_CHECKING:
    from gateway.client import DeviceClient
    from gateway.net.browse import Browser

EXIT_CONFIG = 2
EXIT_STATE = 3  # the state directory cannot be used as it is: damaged database, wrong secret
EXIT_NOT_FOUND = 5  # discovery found no gateway, or several and no way to choose


SYSTEM_CONFIG = Path("/etc/lpgw/lpgw.yaml")  # where the Ansible role and packages put it


def _load_config(path: str | None, overrides: dict | None = None) -> config.Config:
    try:
        return config.load(path, overrides)
    except config.ConfigError as exc:
        print(f"lpgw: bad configuration:\n{exc}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)


def cmd_run(args: argparse.Namespace) -> int:
    from gateway import service
    from gateway.store import DamagedStore, StoreError

    overrides = {"state_dir": args.state_dir} if args.state_dir else None
    cfg = _load_config(args.config, overrides)
    logs.setup(args.log_level or cfg.log.level, cfg.log.format)
    try:
        service.install_event_loop()
    except ValueError as exc:
        print(f"lpgw: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(service.run(cfg, args.config, overrides))
    except KeyboardInterrupt:
        pass
    except StoreError as exc:  # one line for the journal: what is wrong and what to do
        fix = ""
        if isinstance(exc, DamagedStore):
            config_arg = f" -c {args.config}" if args.config else ""
            fix = (f". Stop here: restore the state directory from its backup "
                   f"(hardware.md, \"Backup and restore\"), or keep what can still be "
                   f"read: lpgw db salvage{config_arg} --replace")
        logging.getLogger("lpgw").critical("cannot start: %s%s", exc, fix)
        return EXIT_STATE
    except OSError as exc:
        print(f"lpgw: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_db_salvage(args: argparse.Namespace) -> int:
    """Copy what a damaged database still holds into a new one (and, with --replace, put
    it in place of the damaged one, which is kept beside it)."""
    from gateway.store import StoreError, salvage

    cfg = _load_config(args.config)
    source = cfg.store_path
    target = Path(args.output) if args.output else source.with_name(source.name + ".salvaged")
    if args.replace and _gateway_answers(cfg.control_path):
        print(f"lpgw: the gateway is running (it answers on {cfg.control_path}): stop it "
              "first (systemctl stop lpgw)", file=sys.stderr)
        return 1
    try:
        found = salvage(source, target)
    except (StoreError, OSError) as exc:
        print(f"lpgw: salvage failed: {exc}", file=sys.stderr)
        return 1
    report = {"ok": True, "from": str(source), "to": str(target), "devices": found.devices,
              "pushes": found.pushes, "meta": found.meta,
              "unreadable_stretches": found.unreadable, "garbled_rows": found.bad_rows,
              "header_rebuilt": found.header_rebuilt}
    missing = {"token_secret", "gateway_id"} - set(found.meta)
    if missing:
        report["warning"] = (f"not salvaged: {', '.join(sorted(missing))}; the token secret "
                             f"file ({cfg.state_path / 'token.secret'}) keeps device tokens")
    if args.replace:
        aside = source.with_name(f"{source.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
        try:
            for suffix in ("", "-wal", "-shm"):
                old = Path(f"{source}{suffix}")
                if old.exists():
                    old.rename(Path(f"{aside}{suffix}"))
            target.rename(source)
        except OSError as exc:
            print(f"lpgw: salvaged into {target}, but cannot put it in place: {exc}",
                  file=sys.stderr)
            return 1
        report.update(to=str(source), damaged_kept_at=str(aside))
    print(json.dumps(report, indent=2))
    if not args.replace:
        print(f"lpgw: check it, then: systemctl stop lpgw; mv {source} {source}.damaged; "
              f"mv {target} {source}; systemctl start lpgw (or run again with --replace)",
              file=sys.stderr)
    return 0


def cmd_db_backup(args: argparse.Namespace) -> int:
    """What a restore needs, in one private directory: the key (the pin phones check), the
    certificate, the token secret (every device token) and a consistent copy of the
    database, taken while the gateway runs."""
    from gateway.store import SECRET_FILE, StoreError, backup, check_header

    cfg = _load_config(args.config)
    target = Path(args.to)
    try:
        check_header(cfg.store_path)
        target.mkdir(mode=0o700, parents=True, exist_ok=True)
        devices = backup(cfg.store_path, target / cfg.store_path.name)
        copied = [cfg.store_path.name]
        for path in (cfg.key_path, cfg.cert_path, cfg.state_path / SECRET_FILE):
            tmp = target / f".{path.name}.new"
            tmp.unlink(missing_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(path.read_bytes())
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target / path.name)
            copied.append(path.name)
    except (StoreError, OSError, sqlite3.Error) as exc:
        print(f"lpgw: backup failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"ok": True, "to": str(target), "files": copied, "devices": devices}))
    return 0


def _gateway_answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def cmd_cluster_import(args: argparse.Namespace) -> int:
    """Carry this box into its site (cluster: in the config), with the box stopped: the
    token secret (so no device token changes), the pin (its key pair, which every gateway
    of the site must then have), its devices with their users, and its queued pushes."""

    from gateway import certs
    from gateway.cluster import SiteUnavailable
    from gateway.cluster.migrate import import_state
    from gateway.cluster.site import import_identity
    from gateway.store import SECRET_FILE, Store, read_secret_file

    cfg = _load_config(args.config)
    if not cfg.cluster.enabled:
        print("lpgw: cluster.enabled is false in this configuration: name the site first "
              "(docs/cluster.md)", file=sys.stderr)
        return 1
    try:
        secret = read_secret_file(cfg.state_path / SECRET_FILE)
        pin = f"sha256/{certs.spki_pin(certs.load_cert(cfg.cert_path))}"
    except (OSError, ValueError) as exc:
        print(f"lpgw: cannot read this box's identity: {exc}", file=sys.stderr)
        return 1
    if secret is None:
        print(f"lpgw: no token secret in {cfg.state_path}: this is not a box that has run",
              file=sys.stderr)
        return 1
    store = Store(cfg.store_path, cfg.store.synchronous)
    try:
        gateway_id = (store.get_meta("gateway_id") or b"").decode()
        outcome = asyncio.run(import_identity(cfg.cluster, secret, pin))
        carried = asyncio.run(import_state(cfg.cluster, store, gateway_id,
                                           cfg.delivery.queue_limit))
    except SiteUnavailable as exc:
        print(f"lpgw: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(json.dumps({"ok": True, "site": cfg.cluster.site, "outcome": outcome, "pin": pin,
                      "devices": carried.devices, "devices_known": carried.devices_known,
                      "pushes": carried.pushes, "expired": carried.expired,
                      "state": "already" if carried.already else "imported"}))
    return 0


def cmd_selftest(args: argparse.Namespace) -> int:
    from gateway import selftest

    return selftest.run(args.config, offline=args.offline, as_json=args.json)


def cmd_check_config(args: argparse.Namespace) -> int:
    _load_config(args.config)
    print(f"{args.config or '(embedded defaults)'}: ok")
    return 0


def cmd_completion(args: argparse.Namespace) -> int:
    """Written from this very parser by shtab, so it never falls behind the commands."""
    import shtab

    print(shtab.complete(parser(), shell=args.shell))
    return 0


def cmd_provider_token(args: argparse.Namespace) -> int:
    """An APNs provider token (ES256 JWT: kid, iss = team, iat = now) for a trial without
    Apple's .p8: made from any P-256 private key, e.g. one from openssl (README)."""
    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_pem_private_key(Path(args.key).read_bytes(), None)
    except (OSError, ValueError, TypeError) as exc:
        print(f"lpgw: cannot read a private key from {args.key}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        print(f"lpgw: {args.key} is not a P-256 key (APNs provider keys are)", file=sys.stderr)
        return EXIT_CONFIG
    print(jwt.encode({"iss": args.team_id, "iat": int(time.time())}, key, algorithm="ES256",
                     headers={"kid": args.key_id}))
    return 0


def cmd_pin(args: argparse.Namespace) -> int:
    cfg = _load_config(args.config)
    if not cfg.cert_path.exists():
        print(f"lpgw: no certificate at {cfg.cert_path} yet; `lpgw run` makes one",
              file=sys.stderr)
        return 1
    print(f"sha256/{certs.spki_pin(certs.load_cert(cfg.cert_path))}")
    return 0


def _control(args: argparse.Namespace, message: dict) -> dict:
    from gateway.transport import control

    path = Path(args.socket) if args.socket else _load_config(args.config).control_path
    try:
        return asyncio.run(control.request(path, message))
    except (OSError, TimeoutError) as exc:
        print(f"lpgw: cannot reach the gateway at {path}: {exc}", file=sys.stderr)
        sys.exit(1)


def cmd_send(args: argparse.Namespace) -> int:
    try:
        payload = json.loads(args.payload)
    except ValueError as exc:
        print(f"lpgw: --payload is not JSON: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    reply = _control(args, {"op": "send", "token": args.token, "push_type": args.type,
                            "payload": payload, "priority": args.priority,
                            "expiration": args.expiration, "collapse_id": args.collapse_id,
                            "push_id": args.id, "topic": args.topic})
    print(json.dumps(reply))
    return 0 if reply.get("ok") else 1


def cmd_status(args: argparse.Namespace) -> int:
    reply = _control(args, {"op": "status"})
    print(json.dumps(reply.get("status", reply), indent=2))
    return 0 if reply.get("ok") else 1


def _endpoint(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: HOST:PORT")
    return host.strip("[]"), int(port)


def cmd_device(args: argparse.Namespace) -> int:
    from gateway.client import DeviceClient, DeviceOptions

    if not args.pin and not args.discover:
        print("lpgw device: --pin is required (or --discover, with --tofu or a pin kept in "
              "--state)", file=sys.stderr)
        return EXIT_CONFIG
    options = DeviceOptions(
        host=args.host, port=args.port, pin=args.pin or "", transport=args.transport,
        topic=args.topic, push_types=tuple(args.push_types.split(",")),
        assertion=args.assertion, ack=not args.no_ack, reconnect=not args.once,
        auto_call=args.auto_call, state_file=Path(args.state) if args.state else None)
    if args.install_id:
        options.install_id = args.install_id
    if args.gateway:  # a site's gateways: the next attempt after a failure goes to another
        from gateway.endpoints import SiteLocator

        try:
            site = [_endpoint(g) for g in [f"{args.host}:{args.port}", *args.gateway]]
        except ValueError as exc:
            print(f"lpgw device: --gateway {exc}", file=sys.stderr)
            return EXIT_CONFIG
        options.locate = SiteLocator(list(dict.fromkeys(site)), options.pin)

    def emit(event: dict) -> None:
        print(json.dumps(event), flush=True)

    async def main() -> str:
        client = DeviceClient(options, emit)
        if args.discover and not options.pin and not args.tofu:
            emit({"event": "error", "message": "no pin: give --pin, or --tofu to trust the "
                                               "gateway discovery finds (kept in --state)"})
            return "usage"
        browser = await _discover(client, args) if args.discover else None
        if isinstance(browser, str):
            return browser
        try:
            runner = asyncio.create_task(client.run())
            commands = asyncio.create_task(_device_commands(client))
            done, _ = await asyncio.wait({runner, commands}, return_when=asyncio.FIRST_COMPLETED)
            if commands in done and not runner.done():
                client.stop()
            reason = await runner
            commands.cancel()
            return reason
        finally:
            if browser is not None:
                await browser.close()

    with contextlib.suppress(KeyboardInterrupt):
        reason = asyncio.run(main())
        return {"pin_mismatch": 4, "unauthorized": 3, "not_found": EXIT_NOT_FOUND,
                "usage": EXIT_CONFIG}.get(reason, 0)
    return 0


async def _discover(client: DeviceClient, args: argparse.Namespace) -> Browser | str:
    """Browse, pick the gateway, trust its pin on --tofu; the browser stays open to re-find
    it after every disconnect. Returns the browser, or the reason to stop."""
    from gateway.net.browse import Browser, Locator

    browser = Browser((args.transport,))
    await browser.start()
    try:
        found = await browser.find(args.instance, args.gateway_id, args.discover_timeout)
    except LookupError as exc:
        client.emit({"event": "discover_failed", "message": str(exc)})
        await browser.close()
        return "not_found"
    client.emit({"event": "discovered", **found.to_dict()})
    if not client.o.pin:
        client.trust(found.pin)
    client.o.locate = Locator(browser, found.gateway_id, pin=client.o.pin)
    return browser


def cmd_discover(args: argparse.Namespace) -> int:
    """What a phone on this network would find: one JSON line per gateway service."""
    from gateway.net.browse import Browser

    async def main() -> int:
        browser = Browser(("quic", "tls") if args.transport == "any" else (args.transport,))
        await browser.start()
        try:
            if args.watch:  # one line with every gateway, each time that changes
                async for found in browser.watch():
                    print(json.dumps({"gateways": [f.to_dict() for f in found]}), flush=True)
            found = await browser.wait(lambda f: False, args.timeout)
            for f in found:
                print(json.dumps(f.to_dict()), flush=True)
            return 0 if found else EXIT_NOT_FOUND
        finally:
            await browser.close()

    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(main())
    return 0


USAGE = "ring|decline|busy CALL_ID, ack SEQ, unregister, migrate, quit"


async def _device_commands(client) -> None:
    """Lines on stdin: ring|decline|busy CALL_ID, ack SEQ, unregister, migrate, quit."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    mode = os.fstat(sys.stdin.fileno()).st_mode
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or sys.stdin.isatty()):
        await asyncio.Event().wait()  # /dev/null or a file: run until the gateway ends it
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        words = line.decode().split()
        if not words:
            continue
        verb = words[0]
        if verb in ("ring", "ringing", "decline", "busy") and len(words) == 2:
            client.call("ringing" if verb == "ring" else verb, words[1])
        elif verb == "ack" and len(words) == 2 and words[1].isdigit():
            client.ack(int(words[1]))
        elif verb == "unregister":
            client.unregister()
        elif verb == "migrate":
            await client.migrate()
        elif verb == "quit":
            return
        else:
            client.emit({"event": "usage", "message": USAGE})
    await asyncio.Event().wait()  # stdin closed: keep running until the gateway ends it


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lpgw", description=(
        "lpgw, a local push gateway for Apple's Local Push Connectivity: the server the "
        "NEAppPushProvider extensions of a site's iPhones stay connected to over QUIC or "
        "TLS, on Wi-Fi out of reach of Apple's push service. It relays calls and messages "
        "from the site's SIP PBX, and pushes from app servers through an APNs-compatible "
        "HTTP/2 API. Without -c, commands read /etc/lpgw/lpgw.yaml if it exists."))
    p.add_argument("--version", action="version", version=f"lpgw {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("-c", "--config",
                        help=f"YAML config file (default: {SYSTEM_CONFIG} if it exists, "
                             "else the embedded defaults)")
        return sp

    run = with_config(sub.add_parser("run", help="run the gateway"))
    run.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    run.add_argument("--state-dir", help="the state directory (over the file's state_dir)")
    run.set_defaults(func=cmd_run)

    test = with_config(sub.add_parser("selftest", help="check this gateway end to end"))
    test.add_argument("--offline", action="store_true",
                      help="only what needs no running gateway (config, certificate, clock, "
                           "store, disk)")
    test.add_argument("--json", action="store_true", help="one JSON object, for machines")
    test.set_defaults(func=cmd_selftest)

    with_config(sub.add_parser("check-config", help="validate a config file")).set_defaults(
        func=cmd_check_config)
    with_config(sub.add_parser("pin", help="print the gateway's public-key pin")).set_defaults(
        func=cmd_pin)

    send = with_config(sub.add_parser("send", help="push to a device through the gateway"))
    send.add_argument("token")
    send.add_argument("--type", default="alert", help="push type (alert, voip, ...)")
    send.add_argument("--payload", required=True, help="JSON object")
    send.add_argument("--priority", type=int, default=10)
    send.add_argument("--expiration", type=int, help="epoch seconds; 0 = now or never")
    send.add_argument("--collapse-id")
    send.add_argument("--id", help="push id (a UUID); made when absent")
    send.add_argument("--topic", help="check the token is for this APNs topic, as apns-topic "
                      "(a voip push: <bundle id>.voip)")
    send.add_argument("--socket", help="control socket (default: from the config)")
    send.set_defaults(func=cmd_send)

    status = with_config(sub.add_parser("status", help="the running gateway's status"))
    status.add_argument("--socket", help="control socket (default: from the config)")
    status.set_defaults(func=cmd_status)

    dev = sub.add_parser("device", help="run a reference device")
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=4433)
    dev.add_argument("--pin", help="sha256/<base64> from `lpgw pin`")
    dev.add_argument("--gateway", action="append", default=[], metavar="HOST:PORT",
                     help="another gateway of the same site (repeat): used when the one in "
                          "use fails or goes silent")
    dev.add_argument("--discover", action="store_true",
                     help="find the gateway over Bonjour instead of --host/--port, and again "
                          "after every disconnect")
    dev.add_argument("--instance", help="with --discover: the gateway's instance name")
    dev.add_argument("--gateway-id", help="with --discover: the gateway's id")
    dev.add_argument("--tofu", action="store_true",
                     help="with --discover and no pin: trust the advertised pin on first use "
                          "and keep it in --state")
    dev.add_argument("--discover-timeout", type=float, default=5.0, metavar="SECONDS")
    dev.add_argument("--transport", choices=("quic", "tls"), default="quic")
    dev.add_argument("--topic", default="com.example.lpgw")
    dev.add_argument("--push-types", default="alert,voip,background,pushtotalk")
    dev.add_argument("--install-id", help="a UUID (default: new, or from --state)")
    dev.add_argument("--state", help="file that keeps install id, last ack and seen ids")
    dev.add_argument("--assertion", help="user assertion JWT")
    dev.add_argument("--no-ack", action="store_true", help="never ack (to test redelivery)")
    dev.add_argument("--once", action="store_true", help="do not reconnect")
    dev.add_argument("--auto-call", choices=("ringing", "decline", "busy"),
                     help="answer incoming-call pushes with this action")
    dev.set_defaults(func=cmd_device)

    db = sub.add_parser("db", help="the gateway's database")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    salv = with_config(db_sub.add_parser(
        "salvage", help="copy what a damaged database still holds into a new one"))
    salv.add_argument("--output", help="the new database (default: <database>.salvaged)")
    salv.add_argument("--replace", action="store_true",
                      help="put it in place of the damaged one (kept as "
                           "<database>.damaged-<time>); the gateway must be stopped")
    salv.set_defaults(func=cmd_db_salvage)
    back = with_config(db_sub.add_parser(
        "backup", help="copy the key, certificate, token secret and database (consistent, "
                       "while running) into a private directory"))
    back.add_argument("--to", required=True, metavar="DIR")
    back.set_defaults(func=cmd_db_backup)

    site = sub.add_parser("cluster", help="this gateway's site of gateways (docs/cluster.md)")
    site_sub = site.add_subparsers(dest="cluster_command", required=True)
    with_config(site_sub.add_parser(
        "import", help="make this box's token secret and pin its site's, so no phone's "
                       "token changes")).set_defaults(func=cmd_cluster_import)

    disc = sub.add_parser("discover", help="list the gateways Bonjour finds here")
    disc.add_argument("--transport", choices=("quic", "tls", "any"), default="any")
    disc.add_argument("--timeout", type=float, default=3.0, metavar="SECONDS")
    disc.add_argument("--watch", action="store_true", help="keep printing changes")
    disc.set_defaults(func=cmd_discover)


    token = sub.add_parser("provider-token", help="print an APNs provider token (ES256 JWT, "
                           "valid an hour) signed with a P-256 key: for a trial without "
                           "Apple's .p8")
    token.add_argument("--key", required=True, help="PEM private key (P-256)")
    token.add_argument("--team-id", required=True, help="10 characters: the JWT's iss")
    token.add_argument("--key-id", required=True, help="10 characters: the JWT's kid")
    token.set_defaults(func=cmd_provider_token)
    comp = sub.add_parser("completion", help="print the shell completion script: bash or zsh "
                          "(bash: lpgw completion bash > "
                          "/usr/share/bash-completion/completions/lpgw)")
    comp.add_argument("shell", choices=("bash", "zsh"))
    comp.set_defaults(func=cmd_completion)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "config", "") is None and SYSTEM_CONFIG.exists():
        args.config = str(SYSTEM_CONFIG)  # as an installed service reads it
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
