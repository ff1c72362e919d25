"""The test suite's one timeout factor: one variable, checked, never silently ignored."""

from __future__ import annotations

from pathlib import Path

import pytest
from edgevoice_dev.testing.timeouts import TIMEOUT_FACTOR_ENV, timeout_factor


def test_default_and_value() -> None:
    assert timeout_factor({}) == 1.0
    assert timeout_factor({TIMEOUT_FACTOR_ENV: "3"}) == 3.0


@pytest.mark.parametrize("raw", ["fast", "0.5", "0", "-2", "1e9", "nan"])
def test_bad_values_are_refused(raw: str) -> None:
    with pytest.raises(RuntimeError, match=TIMEOUT_FACTOR_ENV):
        timeout_factor({TIMEOUT_FACTOR_ENV: raw})


def test_the_retired_name_alone_is_refused_not_ignored() -> None:
    with pytest.raises(RuntimeError, match=TIMEOUT_FACTOR_ENV):
        timeout_factor({"EDGEVOICE_TEST_TIMEOUT_FACTOR": "3"})
    assert timeout_factor({"EDGEVOICE_TEST_TIMEOUT_FACTOR": "3", TIMEOUT_FACTOR_ENV: "2"}) == 2.0


def test_no_test_reads_the_factor_itself() -> None:
    """One place: every test scales its waits through edgevoice_dev.testing.timeouts."""
    root = Path(__file__).resolve().parents[1]
    readers = [str(p.relative_to(root)) for p in [*root.glob("tests/**/*.py"),
                                                  *root.glob("devtools/**/*.py")]
               if "TIMEOUT_FACTOR\"" in p.read_text(encoding="utf-8")
               and p.name not in ("timeouts.py", "test_timeouts.py")]
    assert readers == []
