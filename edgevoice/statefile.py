"""Small state files that two users share: the relay's token store and ticket store.

`edgevoice token add` and `edgevoice token ticket` usually run as root while the relay
runs as its own user, and both read-modify-write the same file. Two rules keep that
safe, and live here once:

- :func:`locked_directory` takes an exclusive ``flock`` on the file's *directory*
  around the read-modify-write. The directory, not a lock file, is locked, so root and
  the relay's user can both take the lock and no lock file is left with the wrong owner.
- :func:`write_json_atomic` writes a temporary file (mode 0600, owned by whoever owns
  the directory when root writes it, fsynced) and renames it over the old one, so a
  reader never sees half a file and the relay can always read what root wrote.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def locked_directory(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` (created if missing); raises ``OSError``."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def write_json_atomic(path: Path, data: object, *, indent: int = 2) -> None:
    """Replace ``path`` with ``data`` as JSON, atomically, 0600; raises ``OSError``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-")
    try:
        os.fchmod(fd, 0o600)
        directory = path.parent.stat()
        if os.geteuid() == 0 and (directory.st_uid, directory.st_gid) != (0, 0):
            os.fchown(fd, directory.st_uid, directory.st_gid)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=indent, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
