"""`pip install .` installs the product only: no test rig, no bench.

The wheel is built offline from a copy of the checkout (so no build/ or egg-info is
left in the tree), its file list is checked, and it is installed into a scratch venv
where `edgevoice bench` must explain that the dev package is missing. The scratch
venv borrows the dev venv's third-party packages through a plain path entry (not a
site dir), so the dev venv's editable edgevoice and edgevoice_dev are not visible.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RIG = ("edgevoice/testing/", "edgevoice/bench/", "edgevoice_dev/", "edgevoice/nova/eventstream.py")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "edgevoice", src / "edgevoice",
                    ignore=shutil.ignore_patterns("__pycache__"))
    # devtools/ sits in the checkout next to the product: it must not leak in
    shutil.copytree(ROOT / "devtools", src / "devtools",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(out), str(src)],
        check=True, timeout=300)
    (found,) = out.glob("edgevoice-*.whl")
    return found


def test_wheel_carries_no_test_rig_or_bench(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n == "edgevoice/device/daemon.py" for n in names)
    assert any(n.startswith("edgevoice/relay/") for n in names)
    leaked = [n for n in names if n.startswith(RIG)]
    assert leaked == []
    # nor anything that only the rig needs
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    requires = [line for line in text.splitlines() if line.startswith("Requires-Dist:")]
    for dev_only in ("h2", "cryptography", "wyoming"):
        assert not any(line.split()[1].startswith(dev_only) for line in requires), requires


def test_installed_bench_says_the_dev_package_is_missing(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True).stdout.strip())
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
         "--no-deps", "--no-index", str(wheel)],
        check=True, timeout=300)
    # third-party dependencies from the dev venv, appended after the scratch site
    (site / "zz_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    probe = subprocess.run(
        [str(python), "-c",
         "import importlib.util as u, edgevoice;"
         "print(edgevoice.__file__);"
         "print([m for m in ('edgevoice_dev', 'edgevoice.testing', 'edgevoice.bench')"
         " if u.find_spec(m) is not None])"],
        check=True, capture_output=True, text=True, cwd=tmp_path)
    where, present = probe.stdout.splitlines()
    assert where.startswith(str(env_dir))
    assert present == "[]"

    bench = subprocess.run([str(env_dir / "bin" / "edgevoice"), "bench", "--quick"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert bench.returncode == 2, bench.stderr
    assert "edgevoice-dev" in bench.stderr and "./scripts/setup --test" in bench.stderr
    assert "Traceback" not in bench.stderr
