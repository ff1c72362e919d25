"""scripts/install and scripts/uninstall, run for real into a throwaway root.

``--root DIR`` installs into a root filesystem that is not this machine: users are
created in DIR/etc/passwd (``useradd --root``) and files are owned by the ids
recorded there, so every owner and mode can be checked without touching the host.
Most tests skip the virtualenv (``--no-venv``); one slow test runs pip for real.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "scripts" / "install"
UNINSTALL = REPO / "scripts" / "uninstall"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("useradd") is None,
    reason="the installer needs root and useradd (it creates users and chowns files)",
)

DEVICE_CONFIG = "# shipped device config, v1\nlog_level: info\n"
RELAY_CONFIG = "# shipped relay config, v1\nlog_level: info\n"


# ----------------------------------------------------------------------------- helpers


def make_root(path: Path, *, gpio: bool = True) -> Path:
    """A minimal root filesystem: just enough /etc for useradd --root."""
    etc = path / "etc"
    etc.mkdir(parents=True)
    groups = ["root:x:0:", "audio:x:29:", "video:x:44:"]
    if gpio:
        groups.append("gpio:x:997:")
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (etc / "group").write_text("\n".join(groups) + "\n")
    (etc / "shadow").write_text("root:*:19000:0:99999:7:::\n")
    (etc / "gshadow").write_text("".join(f"{g.split(':')[0]}:*::\n" for g in groups))
    for name in ("shadow", "gshadow"):
        (etc / name).chmod(0o640)
    return path


def make_source(path: Path) -> Path:
    """A checkout with the real units and scripts but config files of our own."""
    shutil.copytree(REPO / "systemd", path / "systemd")
    shutil.copytree(REPO / "scripts", path / "scripts")
    shutil.copy(REPO / "pyproject.toml", path / "pyproject.toml")
    (path / "config").mkdir()
    (path / "config" / "device.yaml").write_text(DEVICE_CONFIG)
    (path / "config" / "relay.yaml").write_text(RELAY_CONFIG)
    return path


@dataclass
class Staging:
    root: Path
    source: Path

    def run(self, script: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        extra = ["--source", str(self.source), "--no-venv"] if script == INSTALL else []
        result = subprocess.run(
            [str(script), "--root", str(self.root), *extra, *args],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if check:
            assert result.returncode == 0, result.stdout + result.stderr
        return result

    def install(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run(INSTALL, *args, check=check)

    def uninstall(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(UNINSTALL, *args)

    def path(self, target: str) -> Path:
        return self.root / target.lstrip("/")

    def ids(self) -> tuple[dict[str, int], dict[str, int]]:
        users = {
            line.split(":")[0]: int(line.split(":")[2])
            for line in self.path("/etc/passwd").read_text().splitlines()
        }
        groups = {
            line.split(":")[0]: int(line.split(":")[2])
            for line in self.path("/etc/group").read_text().splitlines()
        }
        return users, groups

    def owner_and_mode(self, target: str) -> tuple[str, str, str]:
        """('0640', 'root', 'edgevoice'): names resolved in the staging root's files."""
        st = self.path(target).lstat()
        users, groups = self.ids()
        user = next(name for name, uid in users.items() if uid == st.st_uid)
        group = next(name for name, gid in groups.items() if gid == st.st_gid)
        return f"{st.st_mode & 0o7777:04o}", user, group

    def members(self, group: str) -> set[str]:
        for line in self.path("/etc/group").read_text().splitlines():
            name, _, _, members = line.split(":")
            if name == group:
                return set(filter(None, members.split(",")))
        raise KeyError(group)


@pytest.fixture
def staging(tmp_path: Path) -> Staging:
    return Staging(make_root(tmp_path / "root"), make_source(tmp_path / "src"))


def manifest(root: Path) -> dict[str, tuple[object, ...]]:
    """Every path under root with its type, mode, owner, content hash and mtime."""
    entries: dict[str, tuple[object, ...]] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        rel = "/" + str(path.relative_to(root))
        if path.is_symlink():
            entries[rel] = ("link", os.readlink(path), st.st_uid, st.st_gid)
        elif path.is_dir():
            entries[rel] = ("dir", st.st_mode, st.st_uid, st.st_gid)
        else:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            entries[rel] = ("file", st.st_mode, st.st_uid, st.st_gid, digest, st.st_mtime_ns)
    return entries


DEVICE_LAYOUT = {
    # path: (mode, owner, group)
    "/etc/edgevoice": ("0755", "root", "root"),
    "/etc/edgevoice/device.yaml": ("0640", "root", "edgevoice"),
    "/etc/edgevoice/device.token": ("0600", "root", "root"),
    "/var/lib/edgevoice": ("0750", "edgevoice", "edgevoice"),
    "/etc/systemd/system/edgevoice.service": ("0644", "root", "root"),
    "/etc/systemd/system/edgevoice-reconfigure.path": ("0644", "root", "root"),
    "/etc/systemd/system/edgevoice-reconfigure.service": ("0644", "root", "root"),
}
DEVICE_LINKS = {
    "/etc/systemd/system/multi-user.target.wants/edgevoice.service": (
        "/etc/systemd/system/edgevoice.service"
    ),
    "/etc/systemd/system/paths.target.wants/edgevoice-reconfigure.path": (
        "/etc/systemd/system/edgevoice-reconfigure.path"
    ),
    "/usr/local/bin/edgevoice": "/opt/edgevoice/venv/bin/edgevoice",
}


# ----------------------------------------------------------------------------- device


def test_device_install_puts_every_file_in_place_with_its_owner_and_mode(
    staging: Staging,
) -> None:
    before = set(manifest(staging.root))
    staging.install("--token", "kitchen.s3cret")

    for target, expected in DEVICE_LAYOUT.items():
        assert staging.owner_and_mode(target) == expected, target
    for link, points_to in DEVICE_LINKS.items():
        assert os.readlink(staging.path(link)) == points_to, link
    assert staging.path("/etc/edgevoice/device.yaml").read_text() == DEVICE_CONFIG
    assert staging.path("/etc/edgevoice/device.token").read_text() == "kitchen.s3cret\n"
    for unit in (
        "edgevoice.service",
        "edgevoice-reconfigure.path",
        "edgevoice-reconfigure.service",
    ):
        installed = staging.path(f"/etc/systemd/system/{unit}").read_bytes()
        assert installed == (REPO / "systemd" / unit).read_bytes()

    # nothing else was created (the passwd backups come from useradd)
    created = set(manifest(staging.root)) - before
    expected_paths = (
        set(DEVICE_LAYOUT)
        | set(DEVICE_LINKS)
        | {
            "/etc/systemd",
            "/etc/systemd/system",
            "/etc/systemd/system/multi-user.target.wants",
            "/etc/systemd/system/paths.target.wants",
            "/usr",
            "/usr/local",
            "/usr/local/bin",
            "/var",
            "/var/lib",
            "/etc/.pwd.lock",
            "/etc/passwd-",
            "/etc/group-",
            "/etc/shadow-",
            "/etc/gshadow-",
        }
    )
    assert created == expected_paths


def test_device_user_is_a_locked_system_user_in_the_device_groups(staging: Staging) -> None:
    staging.install("--token", "t")
    entry = next(
        line.split(":")
        for line in staging.path("/etc/passwd").read_text().splitlines()
        if line.startswith("edgevoice:")
    )
    assert int(entry[2]) < 1000  # a system uid
    assert entry[5] == "/var/lib/edgevoice"
    assert entry[6] == "/usr/sbin/nologin"
    for group in ("audio", "gpio", "video"):
        assert "edgevoice" in staging.members(group), group
    shadow = staging.path("/etc/shadow").read_text()
    assert any(line.startswith("edgevoice:!") for line in shadow.splitlines())


def test_a_board_without_a_gpio_group_installs_without_one(tmp_path: Path) -> None:
    staging = Staging(make_root(tmp_path / "root", gpio=False), make_source(tmp_path / "src"))
    staging.install("--token", "t")
    assert "gpio" not in staging.path("/etc/group").read_text()
    assert "edgevoice" in staging.members("audio")


def test_a_second_run_changes_nothing(staging: Staging) -> None:
    staging.install("--token", "kitchen.s3cret")
    first = manifest(staging.root)
    time.sleep(0.01)  # so a rewritten file would show a different mtime
    result = staging.install("--token", "kitchen.s3cret")
    assert manifest(staging.root) == first
    assert "0 change(s)" in result.stdout


def test_a_user_edited_config_survives_and_new_defaults_land_beside_it(
    staging: Staging,
) -> None:
    staging.install("--token", "t")
    config = staging.path("/etc/edgevoice/device.yaml")
    edited = DEVICE_CONFIG + "relay:\n  url: wss://relay.example:8443\n"
    config.write_text(edited)
    shipped = DEVICE_CONFIG.replace("v1", "v2")
    (staging.source / "config" / "device.yaml").write_text(shipped)

    staging.install()
    assert config.read_text() == edited
    dist = "/etc/edgevoice/device.yaml.dist"
    assert staging.path(dist).read_text() == shipped
    assert staging.owner_and_mode(dist) == ("0640", "root", "edgevoice")

    settled = manifest(staging.root)
    staging.install()
    assert manifest(staging.root) == settled

    # once the operator adopts the defaults, the stale copy goes away
    config.write_text(shipped)
    staging.install()
    assert not staging.path(dist).exists()


def test_an_unreadable_config_is_left_alone_but_reported(staging: Staging) -> None:
    staging.install("--token", "t")
    config = staging.path("/etc/edgevoice/device.yaml")
    os.chown(config, 0, 0)
    config.chmod(0o600)
    result = staging.install()
    assert staging.owner_and_mode("/etc/edgevoice/device.yaml") == ("0600", "root", "root")
    assert "edgevoice cannot read /etc/edgevoice/device.yaml" in result.stderr


def test_without_a_token_an_empty_root_only_file_waits_for_one(staging: Staging) -> None:
    result = staging.install()
    token = staging.path("/etc/edgevoice/device.token")
    assert token.read_bytes() == b""
    assert staging.owner_and_mode("/etc/edgevoice/device.token") == ("0600", "root", "root")
    assert "token is not set yet" in result.stdout

    staging.install("--token", "kitchen.s3cret")
    assert token.read_text() == "kitchen.s3cret\n"
    # a later run without --token keeps it, and puts loosened permissions back
    token.chmod(0o644)
    result = staging.install()
    assert token.read_text() == "kitchen.s3cret\n"
    assert staging.owner_and_mode("/etc/edgevoice/device.token") == ("0600", "root", "root")
    assert "token is not set yet" not in result.stdout


def test_the_token_can_come_from_stdin(staging: Staging) -> None:
    result = subprocess.run(
        [
            str(INSTALL),
            "--root",
            str(staging.root),
            "--source",
            str(staging.source),
            "--no-venv",
            "--token",
            "-",
        ],
        input="from.stdin\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert staging.path("/etc/edgevoice/device.token").read_text() == "from.stdin\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--token", "two words"], "one word"),
        (["--frobnicate"], "unknown option"),
        (["--extras", "pi;rm -rf /"], "--extras"),
        (["--relay", "--token", "x"], "--token is for the device"),
        (["--relay-url", "http://relay/"], "--relay-url"),
        (["--relay-url", "wss://a b/"], "--relay-url"),
    ],
)
def test_bad_arguments_are_refused_before_anything_happens(
    staging: Staging, args: list[str], message: str
) -> None:
    before = manifest(staging.root)
    result = staging.install(*args, check=False)
    assert result.returncode != 0
    assert message in result.stderr
    assert manifest(staging.root) == before


def test_a_staging_root_that_is_no_root_filesystem_is_explained(tmp_path: Path) -> None:
    empty = tmp_path / "image"
    empty.mkdir()
    result = subprocess.run([str(INSTALL), "--root", str(empty), "--no-venv",
                             "--source", str(make_source(tmp_path / "src"))],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "etc/passwd and" in result.stderr and "useradd --root" in result.stderr
    assert "debootstrap" in result.stderr  # says what a staging root is
    assert not any(empty.iterdir())
    assert "DIR/etc/passwd" in subprocess.run([str(INSTALL), "--help"], capture_output=True,
                                              text=True, check=True).stdout


def fake_pythons(bindir: Path, **scripts: str) -> Path:
    """A PATH directory with `pythonX.Y` stand-ins (e.g. a pyenv shim that fails)."""
    bindir.mkdir()
    for name, body in scripts.items():
        path = bindir / name.replace("_", ".")
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    return bindir


def test_a_python_that_does_not_run_is_skipped_and_none_is_explained(
        staging: Staging, tmp_path: Path) -> None:
    shim = 'echo "pyenv: python3.13: command not found" >&2; exit 127'
    bindir = fake_pythons(tmp_path / "bin", python3_13=shim, python3_12=shim, python3=shim,
                          python3_11='echo 3.9; exit 0')
    before = manifest(staging.root)
    # every usual command, but no Python other than the stand-ins
    usual = tmp_path / "usual"
    usual.mkdir()
    for d in ("/usr/bin", "/bin", "/usr/sbin", "/sbin"):
        for tool in Path(d).iterdir() if Path(d).is_dir() else ():
            if not tool.name.startswith("python") and not (usual / tool.name).exists():
                (usual / tool.name).symlink_to(tool)
    env = {**os.environ, "PATH": f"{bindir}:{usual}"}
    result = subprocess.run([str(INSTALL), "--root", str(staging.root), "--source",
                             str(staging.source), "--relay", "--extras", "nova"],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode != 0
    assert "no usable Python >= 3.12" in result.stderr, result.stderr
    assert "python3.13 (does not run)" in result.stderr or "does not run" in result.stderr
    assert "--python" in result.stderr and "aws-sdk-bedrock-runtime" in result.stderr
    assert manifest(staging.root) == before  # refused before changing anything
    asked = subprocess.run([str(INSTALL), "--root", str(staging.root), "--source",
                            str(staging.source), "--python", str(bindir / "python3.13")],
                           capture_output=True, text=True, timeout=60, env=env)
    assert asked.returncode != 0 and "does not run" in asked.stderr
    assert manifest(staging.root) == before


def test_relay_url_goes_into_a_new_config_and_the_result_loads(staging: Staging) -> None:
    from edgevoice.config.model import load_device_config

    shutil.copy(REPO / "config" / "device.yaml", staging.source / "config" / "device.yaml")
    staging.install("--relay-url", "wss://relay.example.net:8780/")
    config = load_device_config(staging.path("/etc/edgevoice/device.yaml"))
    assert config.relay.url == "wss://relay.example.net:8780/"
    # an existing file is never rewritten: a different URL only earns a warning
    again = staging.install("--relay-url", "wss://other.example.net/")
    assert "set relay.url" in again.stderr
    config = load_device_config(staging.path("/etc/edgevoice/device.yaml"))
    assert config.relay.url == "wss://relay.example.net:8780/"


def test_a_source_without_its_config_is_refused(staging: Staging) -> None:
    (staging.source / "config" / "device.yaml").unlink()
    result = staging.install(check=False)
    assert result.returncode != 0
    assert "config/device.yaml is missing" in result.stderr


# ----------------------------------------------------------------------------- relay


def test_relay_install_uses_its_own_user_and_no_device_token(staging: Staging) -> None:
    staging.install("--relay")
    assert staging.owner_and_mode("/etc/edgevoice/relay.yaml") == (
        "0640",
        "root",
        "edgevoice-relay",
    )
    assert staging.path("/etc/edgevoice/relay.yaml").read_text() == RELAY_CONFIG
    assert staging.owner_and_mode("/var/lib/edgevoice-relay") == (
        "0750",
        "edgevoice-relay",
        "edgevoice-relay",
    )
    for unit in (
        "edgevoice-relay.service",
        "edgevoice-relay-reconfigure.path",
        "edgevoice-relay-reconfigure.service",
    ):
        assert staging.owner_and_mode(f"/etc/systemd/system/{unit}") == ("0644", "root", "root")
    assert (
        os.readlink(
            staging.path("/etc/systemd/system/multi-user.target.wants/edgevoice-relay.service")
        )
        == "/etc/systemd/system/edgevoice-relay.service"
    )
    assert not staging.path("/etc/edgevoice/device.token").exists()
    # an empty token store, so that the relay starts (it refuses a missing one)
    assert staging.owner_and_mode("/var/lib/edgevoice-relay/tokens.json") == (
        "0600", "edgevoice-relay", "edgevoice-relay")
    from edgevoice.relay.auth import check_token_store
    assert check_token_store(staging.path("/var/lib/edgevoice-relay/tokens.json"), "x") == 0
    assert not staging.path("/etc/systemd/system/edgevoice.service").exists()
    assert "edgevoice-relay" not in staging.members("audio")
    settled = manifest(staging.root)
    staging.install("--relay")
    assert manifest(staging.root) == settled


# ----------------------------------------------------------------------------- uninstall


def test_uninstall_keeps_config_token_and_state_unless_purged(staging: Staging) -> None:
    staging.install("--token", "kitchen.s3cret")
    staging.path("/etc/edgevoice/device.yaml").write_text("edited: true\n")
    staging.uninstall()

    for gone in (
        "/etc/systemd/system/edgevoice.service",
        "/etc/systemd/system/edgevoice-reconfigure.path",
        "/etc/systemd/system/edgevoice-reconfigure.service",
        *DEVICE_LINKS,
    ):
        assert not staging.path(gone).is_symlink() and not staging.path(gone).exists(), gone
    assert staging.path("/etc/edgevoice/device.yaml").read_text() == "edited: true\n"
    assert staging.path("/etc/edgevoice/device.token").read_text() == "kitchen.s3cret\n"
    assert staging.path("/var/lib/edgevoice").is_dir()
    assert "edgevoice:" in staging.path("/etc/passwd").read_text()

    # reinstalling picks up where it left off
    staging.install()
    assert staging.path("/etc/edgevoice/device.yaml").read_text() == "edited: true\n"
    assert staging.path("/etc/edgevoice/device.token").read_text() == "kitchen.s3cret\n"

    staging.uninstall("--purge")
    for gone in ("/etc/edgevoice", "/var/lib/edgevoice", "/opt/edgevoice"):
        assert not staging.path(gone).exists(), gone
    assert "edgevoice:" in staging.path("/etc/passwd").read_text()


def test_the_shared_venv_stays_until_the_last_service_goes(staging: Staging) -> None:
    staging.install("--token", "t")
    staging.install("--relay")
    venv = staging.path("/opt/edgevoice/venv/bin")
    venv.mkdir(parents=True)
    (venv / "edgevoice").write_text("#!/bin/sh\n")

    staging.uninstall()
    assert venv.exists()
    assert staging.path("/usr/local/bin/edgevoice").is_symlink()
    assert staging.path("/etc/edgevoice/relay.yaml").exists()

    staging.uninstall("--relay", "--purge")
    assert not staging.path("/opt/edgevoice").exists()
    assert not staging.path("/usr/local/bin/edgevoice").is_symlink()
    assert not staging.path("/etc/edgevoice/relay.yaml").exists()
    assert staging.path("/etc/edgevoice/device.yaml").exists()  # the device's, not purged


# ----------------------------------------------------------------------------- systemd


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_the_installed_tree_passes_systemd_analyze_verify(staging: Staging) -> None:
    staging.install("--token", "t")
    staging.install("--relay")
    for candidate in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if (candidate / "multi-user.target").exists():
            shutil.copytree(candidate, staging.path("/usr/lib/systemd/system"), symlinks=True)
            break
    else:
        pytest.skip("systemd's own unit files are not installed")
    for stub in ("/opt/edgevoice/venv/bin/edgevoice", "/usr/bin/systemctl"):
        binary = staging.path(stub)
        binary.parent.mkdir(parents=True, exist_ok=True)
        binary.write_text("#!/bin/sh\n")
        binary.chmod(0o755)
    units = sorted(p.name for p in staging.path("/etc/systemd/system").glob("edgevoice*.*"))
    assert len(units) == 6, units
    for unit in units:
        result = subprocess.run(
            [
                "systemd-analyze",
                "verify",
                "--man=no",
                f"--root={staging.root}",
                f"/etc/systemd/system/{unit}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert (result.returncode, result.stdout + result.stderr) == (0, ""), unit


# ----------------------------------------------------------------------------- venv


@pytest.mark.slow
def test_a_real_virtualenv_install_into_the_staging_root(tmp_path: Path) -> None:
    # The real checkout (its own config/), pip and all; no extras, to stay quick.
    root = make_root(tmp_path / "root")
    had_build_dir = (REPO / "build").exists()
    started = time.monotonic()
    result = subprocess.run(
        [str(INSTALL), "--root", str(root), "--extras", "", "--token", "t"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    venv = root / "opt/edgevoice/venv"
    python = venv / "bin/python"
    check = subprocess.run(
        [str(python), "-c", "import edgevoice.service.notify, edgevoice.cli, sdnotify"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 0, check.stderr
    # scripts must point where the venv will live on the target, not into the staging root
    shebang = (venv / "bin/edgevoice").read_text().splitlines()[0]
    assert shebang == "#!/opt/edgevoice/venv/bin/python"
    assert str(root) not in (venv / "bin/activate").read_text()
    assert (venv / "edgevoice-extras").read_text() == "\n"
    assert (root / "etc/edgevoice/device.yaml").read_bytes() == (
        REPO / "config/device.yaml"
    ).read_bytes()
    # the checkout is left clean: pip built from a copy
    assert had_build_dir or not (REPO / "build").exists()
    st = venv.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, 0, 0o755)
    assert time.monotonic() - started < 300


# ----------------------------------------------------------------------------- host mode

HOST_SIMULATION = """
set -e
fs="$1"; shift
mount -t tmpfs edgevoice-test "$fs"
mkdir -p "$fs/etc" && cp -a /etc/. "$fs/etc/" && mount --bind "$fs/etc" /etc
for dir in /opt /var/lib /usr/local /run; do
    mkdir -p "$fs$dir" && mount --bind "$fs$dir" "$dir"
done
"$@"
"""


def run_as_if_on_this_host(tmp_path: Path, script: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` with /etc, /opt, /var/lib, /usr/local and /run replaced by
    private copies in a private mount namespace, so the host stays untouched."""
    fs = tmp_path / "fs"
    fs.mkdir(exist_ok=True)
    return subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "bash",
            "-c",
            HOST_SIMULATION,
            "host-simulation",
            str(fs),
            "bash",
            "-c",
            script,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.skipif(shutil.which("unshare") is None, reason="unshare (util-linux) missing")
def test_without_root_it_installs_on_this_machine(tmp_path: Path) -> None:
    # The code path a real Pi takes: users in /etc/passwd, units enabled with
    # systemctl (offline here: systemd is not running, so nothing is started).
    probe = run_as_if_on_this_host(tmp_path, "true")
    if probe.returncode != 0:
        pytest.skip(f"cannot make a private mount namespace here: {probe.stderr.strip()}")
    script = f"""
        {INSTALL} --no-apt --no-venv --token host.t0ken
        {INSTALL} --no-apt --no-venv > second-run.txt
        grep -q '0 change(s)' second-run.txt
        echo "groups: $(id -nG edgevoice)"
        stat -c '%a %U:%G %n' /etc/edgevoice/device.yaml /etc/edgevoice/device.token \
            /var/lib/edgevoice /etc/systemd/system/edgevoice.service
        systemctl is-enabled edgevoice.service edgevoice-reconfigure.path
        {UNINSTALL} --purge
        test ! -e /etc/edgevoice && test ! -e /etc/systemd/system/edgevoice.service
    """
    result = run_as_if_on_this_host(tmp_path, f"cd {tmp_path} && {script}")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert "640 root:edgevoice /etc/edgevoice/device.yaml" in lines
    assert "600 root:root /etc/edgevoice/device.token" in lines
    assert "750 edgevoice:edgevoice /var/lib/edgevoice" in lines
    assert "644 root:root /etc/systemd/system/edgevoice.service" in lines
    assert lines.count("enabled") == 2
    assert "audio" in next(line for line in lines if line.startswith("groups:")).split()
    assert "systemd is not running here" in result.stderr
