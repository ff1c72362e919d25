"""edgevoice's dev-only tools: the test rig and the benchmarks.

- :mod:`edgevoice_dev.testing`: the fake Bedrock endpoint (and the AWS event-stream
  framing it speaks), network faults (namespaces, a fault proxy), the virtual sound
  card, speech fixtures, throwaway TLS CAs and the in-process relay harness.
- :mod:`edgevoice_dev.bench`: ``edgevoice bench``.

This is a separate distribution (``devtools/pyproject.toml``) so a device install
carries only the product. It runs from a checkout: the sound card and the bench find
the repository's scripts and output folders through :func:`repository_root`.
"""

from __future__ import annotations

from pathlib import Path


def repository_root() -> Path:
    """The edgevoice checkout this package runs from, else the current directory."""
    here = Path(__file__).resolve().parents[2]
    return here if (here / "pyproject.toml").is_file() and (here / "edgevoice").is_dir() \
        else Path.cwd()


__all__ = ["repository_root"]
