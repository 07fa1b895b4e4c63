"""Network namespaces for tests: a private switch, hosts on veth pairs, commands inside.

Anything multicast (mDNS) or interface-changing runs here, never on the machine's real
interfaces. Names are unique per run; `Lab.close()` deletes every namespace it made (and
with them their veths and the processes' sockets), and kills the processes it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

IP = shutil.which("ip") or "/usr/sbin/ip"


def why_not_available(*commands: str) -> str | None:
    """A one-line reason these tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for command in ("ip", *commands):
        if shutil.which(command) is None:
            return f"needs `{command}` on PATH"
    name = f"lpgwprobe{secrets.token_hex(3)}"
    probe = subprocess.run([IP, "netns", "add", name], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create a network namespace: {probe.stderr.strip()}"
    subprocess.run([IP, "netns", "del", name], capture_output=True)
    return None


def sh(*args: str, timeout: float = 10, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done


class Lines:
    """A process's stdout read on a thread: each line with the monotonic time it arrived."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.seen: list[tuple[float, str]] = []
        self._queue: queue.Queue[tuple[float, str] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._queue.put((time.monotonic(), line.rstrip("\n")))
        self._queue.put(None)

    def drain(self) -> list[tuple[float, str]]:
        """Every line that has come (and is not consumed yet), without waiting."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return self.seen
            if item is None:
                self._queue.put(None)  # keep the end visible to wait_for
                return self.seen
            self.seen.append(item)

    def wait_for(self, match: Callable[[str], bool], timeout: float) -> tuple[float, str]:
        """The first new line that matches; AssertionError with the last lines when none."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=max(left, 0))
            except queue.Empty:
                item = ...
            if item is None or item is ...:
                tail = "\n".join(line for _, line in self.seen[-15:])
                state = "ended" if item is None else f"no match in {timeout} s"
                raise AssertionError(f"{state}; last lines:\n{tail}")
            self.seen.append(item)
            if match(item[1]):
                return item


class Netns:
    """One namespace: `ip -n` for its links, `exec`/`popen` for commands inside it."""

    def __init__(self, lab: Lab, name: str) -> None:
        self.lab = lab
        self.name = name

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return sh(IP, "-n", self.name, *args, check=check)

    def exec(self, *args: str, timeout: float = 10,
             check: bool = True) -> subprocess.CompletedProcess:
        return sh(IP, "netns", "exec", self.name, *args, timeout=timeout, check=check)

    def addresses(self, ifname: str) -> set[str]:
        """The addresses on an interface now, as `ip -j addr` reports them."""
        shown = json.loads(self.ip("-j", "addr", "show", "dev", ifname).stdout)
        return {a["local"] for link in shown for a in link.get("addr_info", [])}

    def popen(self, args: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start a process inside; the lab stops it (its whole process group) at the end."""
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.STDOUT)
        kwargs.setdefault("text", True)
        proc = subprocess.Popen([IP, "netns", "exec", self.name, *args],
                                start_new_session=True, **kwargs)
        self.lab.processes.append(proc)
        return proc


class Lab:
    """Namespaces joined by a bridge in a namespace of its own (the 'Wi-Fi')."""

    def __init__(self) -> None:
        self.tag = f"{os.getpid() % 10000:04d}{secrets.token_hex(2)}"
        self.namespaces: list[Netns] = []
        self.processes: list[subprocess.Popen] = []
        try:
            self.switch = self.add("sw")
            self.switch.ip("link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
            self.switch.ip("link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise

    def add(self, role: str) -> Netns:
        ns = Netns(self, f"lpgw{self.tag}{role}")
        sh(IP, "netns", "add", ns.name)
        self.namespaces.append(ns)
        # no duplicate address detection: IPv6 addresses are usable at once
        for key in ("all", "default"):
            ns.exec("sysctl", "-q", "-w", f"net.ipv6.conf.{key}.accept_dad=0")
        ns.ip("link", "set", "lo", "up")
        return ns

    def plug(self, ns: Netns, ifname: str, *addresses: str, up: bool = True) -> None:
        """A veth from `ns` (named ifname) to a port of the switch's bridge."""
        port = f"p{secrets.token_hex(3)}"
        self.switch.ip("link", "add", port, "type", "veth", "peer", "name", ifname,
                       "netns", ns.name)
        self.switch.ip("link", "set", port, "master", "br0", "up")
        ns.exec("sysctl", "-q", "-w", f"net.ipv6.conf.{ifname}.accept_dad=0")
        for address in addresses:
            ns.ip("addr", "add", address, "dev", ifname)
        if up:
            ns.ip("link", "set", ifname, "up")

    def close(self) -> None:
        # the whole process group: daemons outlive a leader that has already ended
        for proc in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        self.processes.clear()
        for ns in reversed(self.namespaces):
            sh(IP, "netns", "del", ns.name, check=False)
        self.namespaces.clear()

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- avahi as a phone's independent mDNS stack -----------------------------------------

AVAHI_CONF = """[server]
use-ipv4=yes
use-ipv6=yes
allow-interfaces={ifname}
[publish]
disable-publishing=yes
"""

# Its own /run (a private mount namespace) for a private system bus and avahi-daemon, so
# the host's daemons are never touched. Each line on stdin starts one round of one-shot
# browses (-t) for both service types; their lines come back prefixed by that line's tag.
AVAHI_SCRIPT = r"""
set -e
mount -t tmpfs none /run
mkdir -p /run/dbus /run/avahi-daemon
dbus-daemon --config-file=/usr/share/dbus-1/system.conf \
  --address=unix:path=/run/dbus/system_bus_socket --nofork --nopidfile 2>/dev/null &
for i in $(seq 100); do [ -S /run/dbus/system_bus_socket ] && break; sleep 0.05; done
avahi-daemon -f "$1" --no-drop-root --no-chroot --no-rlimits 2>"$2" &
for i in $(seq 200); do [ -S /run/avahi-daemon/socket ] && break; sleep 0.05; done
echo ready
while read -r tag; do
  ( for type in _lpgw._udp _lpgw._tcp; do
      stdbuf -oL avahi-browse -rtp "$type" 2>/dev/null | sed -u "s/^/$tag /" &
    done
    wait
    echo "$tag end" ) &
done
"""


class AvahiRecord:
    """One resolved service from `avahi-browse -p`: the `=` line."""

    def __init__(self, line: str) -> None:
        fields = line.split(";", 9)
        self.interface, self.protocol = fields[1], fields[2]
        self.instance = re.sub(r"\\(\d{3})", lambda m: chr(int(m[1])), fields[3])
        self.instance = re.sub(r"\\(.)", r"\1", self.instance)
        self.type, self.host, self.address = fields[4], fields[6], fields[7]
        self.port = int(fields[8])
        self.txt = dict(item.strip('"').split("=", 1) for item in re.findall(r'"[^"]*"',
                                                                             fields[9]))

    def __repr__(self) -> str:
        return f"<{self.type} {self.protocol} {self.instance!r} {self.address} {self.txt}>"


class AvahiPhone:
    """avahi-daemon in a namespace of its own, browsed on demand with avahi-browse."""

    def __init__(self, ns: Netns, ifname: str, workdir: Path) -> None:
        conf = workdir / f"avahi-{ns.name}.conf"
        conf.write_text(AVAHI_CONF.format(ifname=ifname))
        self.log = workdir / f"avahi-{ns.name}.log"
        self.proc = ns.popen(["unshare", "-m", "bash", "-c", AVAHI_SCRIPT, "avahi",
                              str(conf), str(self.log)], stdin=subprocess.PIPE)
        self.lines = Lines(self.proc)
        self.lines.wait_for(lambda line: line == "ready", 15)
        self._rounds = 0

    def until(self, good: Callable[[list[AvahiRecord]], bool], timeout: float,
              every: float = 0.2, whole: bool = False) -> tuple[float, list[AvahiRecord]]:
        """Browse rounds every `every` s until one's records are `good`; when they came.

        A one-shot avahi-browse shows the daemon's cache at that moment, so overlapping
        rounds tell when a change became visible. A round resolves each (type, protocol) at
        most once, and within milliseconds, so it is judged as its records come (all rounds
        end together on the daemon's 1 s tick), or only at its end when `whole` (for tests
        of absence).
        """
        deadline = time.monotonic() + timeout
        rounds: dict[str, list[AvahiRecord]] = {}
        last: list[AvahiRecord] = []
        next_round = 0.0
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise AssertionError(f"avahi never saw the right records; last: {last}")
            if now >= next_round:
                self._rounds += 1
                rounds[f"r{self._rounds}"] = []
                self.proc.stdin.write(f"r{self._rounds}\n")
                self.proc.stdin.flush()
                next_round = now + every
            try:
                when, line = self.lines.wait_for(lambda line: True,
                                                 min(next_round, deadline) - now)
            except AssertionError:
                continue
            tag, _, body = line.partition(" ")
            if tag not in rounds:
                continue  # a round of an earlier call
            if body.startswith("="):
                rounds[tag].append(AvahiRecord(body))
                if not whole and good(rounds[tag]):
                    return when, rounds[tag]
            elif body == "end":
                last = rounds.pop(tag)
                if good(last):
                    return when, last


def leftover_namespaces(tag: str) -> list[str]:
    """Namespaces of this run still present (for the cleanup assertion)."""
    names = Path("/run/netns")
    return sorted(p.name for p in names.iterdir() if tag in p.name) if names.exists() else []
