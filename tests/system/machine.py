"""A throwaway Debian machine whose PID 1 is a real systemd, for the system tests.

The host need not run systemd (CI runners and containers often do not). The machine
is a Debian root file system made by ``debootstrap`` and booted by
``systemd-nspawn --boot``; commands run inside through ``nsenter`` into all of its
namespaces, so ``systemctl`` and ``journalctl`` talk to its own systemd.

Everything lives outside the repository, in a cache directory
(``$EDGEVOICE_SYSTEM_CACHE``, default ``/var/tmp/edgevoice-system``):

* ``rootfs/`` the Debian root, built once (minutes: it downloads ~60 MB) and rebuilt
  only when the package list changes. It is never modified: the machine boots with
  ``--volatile=overlay``, so every run starts from the same clean image and its
  changes vanish with it.
* ``wheels-<hash>/`` every wheel the installer needs, downloaded once per
  ``pyproject.toml`` by the image's own Python (the booted machine has no network:
  ``--private-network``, so its services keep their default ports whatever the
  host runs, and the install is proven to work offline).

Needs root, ``debootstrap`` and ``systemd-container``. Also a command line for
poking at it by hand::

    python tests/system/machine.py boot      # then: run systemctl status, shell, stop
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SUITE = os.environ.get("EDGEVOICE_SYSTEM_SUITE", "bookworm")
#: What a board has before edgevoice is installed, plus what scripts/install would
#: otherwise apt-get (the booted machine is offline).
PACKAGES = ("systemd", "systemd-sysv", "dbus", "procps", "python3", "python3-venv",
            "libopus0", "libportaudio2", "alsa-utils")
INSIDE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class MachineError(RuntimeError):
    """The machine could not be built, booted or reached."""


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEVOICE_SYSTEM_CACHE", "/var/tmp/edgevoice-system"))


def missing_tools() -> list[str]:
    """What this host lacks to run a machine (empty: it can)."""
    missing = [t for t in ("debootstrap", "systemd-nspawn", "nsenter") if not shutil.which(t)]
    if os.geteuid() != 0:
        missing.append("root")
    return missing


def host_mirror() -> str | None:
    """The Debian mirror this host's apt uses, if any (a CI mirror or proxy is faster)."""
    if os.environ.get("EDGEVOICE_SYSTEM_MIRROR"):
        return os.environ["EDGEVOICE_SYSTEM_MIRROR"]
    sources = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    for path in sources:
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("URIs:"):
                for uri in line.split()[1:]:
                    if uri.rstrip("/").endswith("/debian"):
                        return uri
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text(errors="replace").splitlines():
            parts = line.split()
            if parts[:1] == ["deb"]:
                for uri in parts[1:]:
                    if "://" in uri and uri.rstrip("/").endswith("/debian"):
                        return uri
    return None


def _say(text: str) -> None:
    print(f"machine: {text}", file=sys.stderr, flush=True)


def build_root(cache: Path) -> Path:
    """The cached Debian root, built first if missing or made from other packages."""
    rootfs = cache / "rootfs"
    want = f"{SUITE} {','.join(PACKAGES)}"
    stamp = rootfs / ".edgevoice-packages"
    if stamp.exists() and stamp.read_text().strip() in (want, ",".join(PACKAGES)):
        return rootfs
    cache.mkdir(parents=True, exist_ok=True)
    partial = cache / "rootfs.partial"
    shutil.rmtree(partial, ignore_errors=True)
    mirror = host_mirror()
    _say(f"building {rootfs} with debootstrap (once; minutes), log {cache / 'build.log'}")
    cmd = ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE,
           str(partial)] + ([mirror] if mirror else [])
    with (cache / "build.log").open("w") as log:
        if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
            raise MachineError(f"debootstrap failed: see {cache / 'build.log'}")
    (partial / "etc" / "hostname").write_text("edgevoice-test\n")
    (partial / "etc" / "hosts").write_text("127.0.0.1\tlocalhost\n127.0.1.1\tedgevoice-test\n")
    (partial / "etc" / "machine-id").write_text("")  # a fresh id at every boot
    (partial / ".edgevoice-packages").write_text(want + "\n")
    shutil.rmtree(rootfs, ignore_errors=True)
    partial.rename(rootfs)
    return rootfs


def _nspawn_env() -> dict[str, str]:
    # cgroup v2 inside, as on current Debian and Raspberry Pi OS
    return {**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}


def _base_options(rootfs: Path, name: str) -> list[str]:
    opts = [f"--directory={rootfs}", f"--machine={name}", "--register=no", "--volatile=overlay"]
    if not Path("/run/systemd/system").is_dir():
        opts.append("--keep-unit")  # no systemd on the host to make a scope
    return opts


def _host_pip_options() -> list[str]:
    """nspawn options that give pip inside what pip on this host is configured with:
    its CA bundle (TLS through an intercepting proxy), its PIP_* and proxy variables,
    its pip.conf and the local folders those name (mirrors, wheel caches)."""
    opts: list[str] = []
    values: list[str] = []
    for key, value in os.environ.items():
        if key.startswith("PIP_") or key.lower() in ("http_proxy", "https_proxy", "no_proxy"):
            if key != "PIP_CERT":
                opts.append(f"--setenv={key}={value}")
            values.append(value)
    bundle = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE") \
        or "/etc/ssl/certs/ca-certificates.crt"
    if Path(bundle).is_file():
        opts += [f"--bind-ro={bundle}:/etc/edgevoice-host-ca.crt",
                 "--setenv=PIP_CERT=/etc/edgevoice-host-ca.crt"]
    conf = Path("/etc/pip.conf")
    if conf.is_file():
        opts.append(f"--bind-ro={conf}:/etc/pip.conf")
        values.append(conf.read_text(errors="replace"))
    folders = set()
    for text in values:
        for word in text.replace("=", " ").split():
            path = word.removeprefix("file://")
            if path.startswith("/") and Path(path).is_dir() and path != "/":
                folders.add(path.rstrip("/"))
    opts += [f"--bind-ro={folder}" for folder in sorted(folders)]
    return opts


def build_wheels(cache: Path, rootfs: Path) -> Path:
    """Every wheel an offline ``scripts/install`` needs, made by the image's Python."""
    digest = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()[:16]
    wheels = cache / f"wheels-{digest}"
    if (wheels / ".complete").exists():
        return wheels
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir(parents=True)
    _say(f"downloading wheels into {wheels} (once per pyproject.toml)")
    script = (
        "set -e; python3 -m venv /tmp/pip; cp -r /src /tmp/src; /tmp/pip/bin/pip install -q wheel; "
        "/tmp/pip/bin/pip download -q -d /wheels 'setuptools>=68' wheel; "
        "/tmp/pip/bin/pip wheel -q -w /wheels /tmp/src")
    src = cache / "wheel-src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir()
    for part in ("pyproject.toml", "README.md", "edgevoice"):
        if (REPO / part).is_dir():
            shutil.copytree(REPO / part, src / part,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / part, src / part)
    cmd = ["systemd-nspawn", *_base_options(rootfs, "edgevoice-wheels"), "--quiet", "--pipe",
           "--as-pid2", f"--bind={wheels}:/wheels", f"--bind-ro={src}:/src",
           *_host_pip_options(), "--", "sh", "-c", script]
    result = subprocess.run(cmd, env=_nspawn_env(), capture_output=True, text=True)
    shutil.rmtree(src, ignore_errors=True)
    if result.returncode != 0:
        raise MachineError(f"pip could not fetch the wheels:\n{result.stdout}{result.stderr}")
    # the installer builds edgevoice from the checkout itself: keep no stale copy
    for stale in wheels.glob("edgevoice-*.whl"):
        stale.unlink()
    (wheels / ".complete").write_text("")
    for old in cache.glob("wheels-*"):  # made for an earlier pyproject.toml
        if old != wheels:
            shutil.rmtree(old, ignore_errors=True)
    return wheels


class Machine:
    """One booted machine. Use as a context manager: it is powered off on exit."""

    def __init__(self, rootfs: Path, *, binds_ro: Sequence[tuple[Path, str]] = (),
                 workdir: Path) -> None:
        self.rootfs = rootfs
        self.binds_ro = list(binds_ro)
        self.name = f"edgevoice-test-{os.getpid()}"
        self.console = workdir / "console.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Machine:
        self.boot()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def boot(self, timeout_s: float = 90.0) -> None:
        opts = [*_base_options(self.rootfs, self.name), "--boot", "--console=read-only",
                "--private-network"]
        # let systemd inside load BPF programs, so DevicePolicy= and IPAddressDeny= are
        # enforced as on a board (nspawn withholds CAP_BPF and bpf() by default)
        if int(Path("/proc/sys/kernel/cap_last_cap").read_text()) >= 39:
            opts += ["--capability=CAP_BPF", "--system-call-filter=bpf"]
        opts += [f"--bind-ro={host}:{inside}" for host, inside in self.binds_ro]
        shutil.rmtree(f"/run/systemd/nspawn/propagate/{self.name}", ignore_errors=True)
        with self.console.open("wb") as console:
            self.proc = subprocess.Popen(["systemd-nspawn", *opts], stdin=subprocess.DEVNULL,
                                         stdout=console, stderr=subprocess.STDOUT,
                                         env=_nspawn_env(), start_new_session=True)
        deadline = time.monotonic() + timeout_s
        state = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise MachineError(f"systemd-nspawn exited: {self.console.read_text()[-2000:]}")
            if self._leader() is not None:
                state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
                if state in ("running", "degraded"):
                    return
            time.sleep(0.3)
        raise MachineError(f"systemd did not come up (state {state!r}); see {self.console}")

    def _leader(self) -> int | None:
        """The machine's PID 1 as the host sees it: systemd-nspawn's child."""
        if self.proc is None:
            return None
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except OSError:
            return None
        for child in children.split():
            try:
                if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                    return int(child)
            except OSError:
                continue
        return None

    def run(self, *cmd: str, check: bool = True, input: str | None = None,
            timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside as root; its output as text."""
        leader = self._leader()
        if leader is None:
            raise MachineError("the machine is not running")
        full = ["nsenter", f"--target={leader}", "--mount", "--uts", "--ipc", "--net", "--pid",
                "--cgroup", "--root", "--wd", "--", "env", "-i", f"PATH={INSIDE_PATH}",
                "HOME=/root", "LANG=C.UTF-8", "SYSTEMD_PAGER=cat", "SYSTEMD_COLORS=0", *cmd]
        result = subprocess.run(full, capture_output=True, text=True, input=input,
                                timeout=timeout)
        if check and result.returncode != 0:
            raise MachineError(f"{' '.join(cmd)} exited {result.returncode}:\n"
                               f"{result.stdout}{result.stderr}")
        return result

    def sh(self, script: str, check: bool = True, timeout: float = 300.0
           ) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-c", script, check=check, timeout=timeout)

    def stop(self) -> None:
        """Power off (systemd inside shuts down in order); kill it if it hangs."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # nspawn asks the machine's systemd to power off
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        shutil.rmtree(f"/run/systemd/nspawn/propagate/{self.name}", ignore_errors=True)
        self.proc = None


def prepare() -> tuple[Path, Path]:
    """The cached root and wheel folder, made first when missing."""
    problems = missing_tools()
    if problems:
        raise MachineError(f"needs {', '.join(problems)} (apt-get install debootstrap "
                           "systemd-container)")
    cache = cache_dir()
    rootfs = build_root(cache)
    return rootfs, build_wheels(cache, rootfs)


def main(argv: Sequence[str]) -> int:  # pragma: no cover - a tool for people
    if not argv or argv[0] not in ("prepare", "boot"):
        print(__doc__)
        return 2
    rootfs, wheels = prepare()
    if argv[0] == "prepare":
        print(rootfs, wheels)
        return 0
    work = cache_dir() / "manual"
    work.mkdir(exist_ok=True)
    machine = Machine(rootfs, binds_ro=[(REPO, "/usr/local/src/edgevoice"),
                                        (wheels, "/var/cache/edgevoice-wheels")], workdir=work)
    machine.boot()
    print(f"booted; nsenter --target={machine._leader()} --all  (Ctrl-C powers it off)")
    with contextlib.suppress(KeyboardInterrupt):
        signal.pause()
    machine.stop()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
