"""The machine and the processes a benchmark measures: CPU placement, open-file limits,
/proc readings, quiet waits, and stopping what a run started by its pid."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import resource
import signal
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

from gateway.service import raise_open_files

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
# Every result a command writes carries it: figures compared "on the same run" (lpgw
# beside Mosquitto) are the ones that share it.
RUN_ID = f"{datetime.datetime.now(datetime.UTC):%Y%m%dT%H%M%SZ}-{os.getpid()}"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# CPU placement: the server under test gets a core of its own (as a gateway whose phones
# are other machines would), the load generator the others. None: no pinning.
CPUS: dict[str, set[int]] | None = None
CPU_PLAN: dict[str, Any] = {"pinned": False}


def stop_on_sigterm() -> None:
    """SIGTERM (e.g. from `timeout`) unwinds like an exception, so every `finally` stops
    the processes this run started."""
    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, handler)


def plan_cpus(pin: bool) -> dict[str, Any]:
    """Pin the server to CPU 0 and this harness and its workers to the rest (2+ cores)."""
    global CPUS, CPU_PLAN
    stop_on_sigterm()
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        CPUS, CPU_PLAN = None, {"pinned": False}
        return CPU_PLAN
    CPUS = {"server": {cpus[0]}, "clients": set(cpus[1:])}
    os.sched_setaffinity(0, CPUS["clients"])
    CPU_PLAN = {"pinned": True, "server_cpus": sorted(CPUS["server"]),
                "loadgen_cpus": sorted(CPUS["clients"])}
    return CPU_PLAN


def pin_server(pid: int) -> None:
    if CPUS is not None:
        os.sched_setaffinity(pid, CPUS["server"])
FD_RESERVE = 256  # descriptors a process needs besides its connections


# --- the machine and the processes under test ---------------------------------------------


def raise_nofile(need: int | None = None) -> dict[str, int]:
    """The open-file limit raised as `lpgw run` raises its own (to the hard limit), and
    the hard limit too when `need` is past it and this process may (root); children
    inherit it."""
    raise_open_files()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if need is not None and soft < need:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, need))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {"soft": soft, "hard": hard}


def cap_devices(wanted: int, per_connection_fds: int = 1) -> tuple[int, str | None]:
    """The most devices the open-file limit lets one server process hold."""
    limit = raise_nofile()["soft"]
    most = (limit - FD_RESERVE) // per_connection_fds
    if wanted > most:
        return most, (f"capped at {most} devices by RLIMIT_NOFILE={limit} "
                      f"(the server holds one descriptor per TCP connection)")
    return wanted, None


def machine() -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError, ValueError):
        mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
    return {"cores": os.cpu_count(), "cpu_model": model, "memory_mib": mem,
            "python": platform.python_version(), "implementation": platform.python_implementation(),
            "kernel": platform.release(), "openssl": ssl.OPENSSL_VERSION,
            "nofile": raise_nofile()}


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"head": git("rev-parse", "HEAD"),
            "gateway_changes": git("status", "--short", "gateway/").splitlines()}


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


class Proc:
    """RSS and CPU of one process, from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def status(self, field: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"no {field} for pid {self.pid}")

    def rss_kib(self) -> int:
        return self.status("VmRSS")

    def hwm_kib(self) -> int:
        return self.status("VmHWM")

    def cpu_seconds(self) -> float:
        """CPU time of the server's threads, in nanoseconds from /proc/PID/task/*/schedstat:
        utime + stime in /proc/PID/stat count 10 ms ticks, too coarse for a few handshakes.
        The servers measured here keep their threads for their whole life (a thread that
        ended would take its time with it); /proc/PID/stat where schedstat is missing."""
        try:
            total = 0
            for task in Path(f"/proc/{self.pid}/task").iterdir():
                with contextlib.suppress(FileNotFoundError):  # a thread that just ended
                    total += int((task / "schedstat").read_text().split()[0])
            return total / 1e9
        except (FileNotFoundError, ValueError, IndexError):
            raw = Path(f"/proc/{self.pid}/stat").read_text()
            fields = raw[raw.rindex(")") + 2:].split()
            return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def kernel_counters() -> dict[str, int]:
    """System-wide drop counters that explain slow storms: UDP receive-buffer overflows
    (QUIC datagrams lost) and TCP listen-queue overflows (SYNs dropped by a full backlog)."""
    out: dict[str, int] = {}
    wanted = {("Udp", "RcvbufErrors"): "udp_rcvbuf_errors",
              ("TcpExt", "ListenOverflows"): "tcp_listen_overflows",
              ("TcpExt", "ListenDrops"): "tcp_listen_drops",
              ("TcpExt", "TCPReqQFullDrop"): "tcp_syn_queue_full_drops"}
    for name in ("/proc/net/snmp", "/proc/net/netstat"):
        with contextlib.suppress(OSError):
            lines = Path(name).read_text().splitlines()
            for head, vals in zip(lines[::2], lines[1::2], strict=False):
                proto, keys = head.split(":")[0], head.split()[1:]
                for k, v in zip(keys, vals.split()[1:], strict=False):
                    if (proto, k) in wanted:
                        out[wanted[(proto, k)]] = int(v)
    return out


def counters_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after}


def system_busy_seconds() -> float:
    """CPU seconds all processes on this machine have used (/proc/stat, all cores)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / CLK_TCK


def cpu_of(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, RuntimeError, ValueError):
            total += Proc(pid).cpu_seconds()
    return total


class Background:
    """How busy the rest of the machine is while we measure (other users' processes).

    Everything the system used minus what the server, the workers and this harness used,
    in cores (1.0 = one core busy all the time). Wall-clock figures (storm times) are only
    as good as this is small; CPU-seconds figures are less affected.
    """

    def __init__(self, pids: list[int]) -> None:
        self.pids = [*pids, os.getpid()]
        self.t0, self.sys0, self.ours0 = time.monotonic(), system_busy_seconds(), cpu_of(self.pids)

    def cores(self) -> float:
        wall = max(1e-6, time.monotonic() - self.t0)
        others = (system_busy_seconds() - self.sys0) - (cpu_of(self.pids) - self.ours0)
        return round(max(0.0, others) / wall, 2)


def wait_for_quiet(limit: float = 0.3, most: float = 60.0) -> float:
    """Wait (at most `most` s) until other processes use less than `limit` cores; return
    the last reading."""
    if most <= 0:
        return -1.0
    deadline = time.monotonic() + most
    while True:
        b = Background([])
        time.sleep(2)
        load = b.cores()
        if load < limit or time.monotonic() > deadline:
            if load >= limit:
                print(f"note: the machine is busy with other work ({load} cores); "
                      "wall-clock figures will suffer", flush=True)
            return load


def stop_process(proc: subprocess.Popen, grace: float = 20) -> int | None:
    """SIGTERM by pid, wait, then SIGKILL by pid."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return proc.returncode


