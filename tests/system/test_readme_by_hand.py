"""README's "Running a relay and a device by hand", run verbatim in a fresh clone.

The shell block is taken from README.md as it stands, run by bash in a clone of the
checkout (the working tree as it is, committed into a new repository), without root
privileges when the test has them to drop, and in a network namespace of its own
so that its fixed ports (8780, 8765, 8766) meet nobody else's. It must finish on its
own, produce a reply, and leave ``git status`` as it found it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import wave
from pathlib import Path

import pytest
from edgevoice_dev.testing.timeouts import scaled

REPO = Path(__file__).resolve().parents[2]


def readme_block(title: str) -> str:
    text = (REPO / "README.md").read_text()
    section = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    found = re.search(r"```sh\n(.*?)```", section, re.S)
    assert found, f"no shell block under '## {title}'"
    return found.group(1)


def fresh_clone(dest: Path) -> Path:
    """The working tree's tracked files (as they are now) committed into a new repo."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = REPO / name
        if not src.exists():
            continue  # deleted in the working tree
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target, follow_symlinks=False)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    subprocess.run([*git, "init", "-q"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "clone"], cwd=dest, check=True)
    return dest


def nobody_can_run(python: Path) -> bool:
    """Whether an unprivileged user can run this interpreter (not so for one under
    /root, e.g. pyenv's): then the block runs as nobody, else as it is."""
    if shutil.which("setpriv") is None:
        return False
    probe = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                            "--", str(python), "-c", "import edgevoice"],
                           capture_output=True, timeout=60)
    return probe.returncode == 0


def git_status(clone: Path) -> str:
    return subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=clone,
                          capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(shutil.which("curl") is None, reason="the README uses curl")
def test_the_by_hand_section_works_verbatim_and_leaves_nothing(tmp_path: Path) -> None:
    script = readme_block("Running a relay and a device by hand")
    clone = fresh_clone(tmp_path / "clone")
    # "after ./scripts/setup": this checkout's venv stands in for the clone's own
    (clone / ".venv").mkdir()
    (clone / ".venv" / "bin").symlink_to(REPO / ".venv" / "bin")
    before = git_status(clone)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGEVOICE_", "NOTIFY_"))}
    env["TMPDIR"] = str(tmp)
    # as typed into a shell: stop at the first failing command, nothing stricter
    cmd = ["bash", "-e", "-c", script]
    if os.geteuid() == 0 and shutil.which("unshare"):
        if nobody_can_run(REPO / ".venv" / "bin" / "python"):
            # no root, as a developer would run it
            for path in (tmp_path, clone, tmp):
                path.chmod(0o777)
            subprocess.run(["chown", "-R", "nobody:nogroup", str(clone), str(tmp)], check=True)
            cmd = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--", *cmd]
        # its own loopback: the block's fixed ports meet no other test's
        cmd = ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *cmd]
    try:
        result = subprocess.run(cmd, cwd=clone, env=env, capture_output=True, text=True,
                                timeout=scaled(120))
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the block did not finish:\n{exc.stdout!r}\n{exc.stderr!r}"
                             ) from None
    assert result.returncode == 0, result.stdout + result.stderr
    assert '"outcome":"completed"' in result.stdout, result.stdout
    replies = list(tmp.glob("*/reply.wav"))
    assert len(replies) == 1, list(tmp.rglob("*"))
    with wave.open(str(replies[0])) as w:
        assert w.getnframes() > w.getframerate(), "less than a second of reply"
    assert git_status(clone) == before, "the README left files in the checkout"
    assert "Traceback" not in result.stderr, result.stderr
    # each fact once: where the endpoints listen, that the device is ready
    log = result.stderr.splitlines()
    for fact in ("127.0.0.1:8765", "127.0.0.1:8766", " ready: ", "turn=1 outcome=completed"):
        assert sum(fact in line for line in log) == 1, (fact, result.stderr)
    assert not any(" said: " in line for line in log), "transcripts belong at debug level"
