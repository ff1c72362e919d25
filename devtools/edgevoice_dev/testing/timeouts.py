"""The one timeout factor of the test suite.

Slow or busy machines stretch every wait a test makes by the factor in the
environment variable ``EDGEVOICE_TIMEOUT_FACTOR`` (a number >= 1, default 1). Only
waits scale (how long to wait for something to happen); what a test asserts about
time never does: timing targets belong in the benchmarks.
"""

from __future__ import annotations

import os

#: The environment variable that scales every test timeout.
TIMEOUT_FACTOR_ENV = "EDGEVOICE_TIMEOUT_FACTOR"
#: The name the health, doctor and service tests once read; refused so that a machine
#: setting only it does not silently run with factor 1.
_RETIRED_ENV = "EDGEVOICE_TEST_TIMEOUT_FACTOR"


def timeout_factor(environ: dict[str, str] | None = None) -> float:
    """The factor from ``environ`` (default: this process's environment)."""
    env = os.environ if environ is None else environ
    raw = env.get(TIMEOUT_FACTOR_ENV)
    if raw is None:
        if env.get(_RETIRED_ENV) is not None:
            raise RuntimeError(f"{_RETIRED_ENV} is no longer read: set {TIMEOUT_FACTOR_ENV}")
        return 1.0
    try:
        factor = float(raw)
    except ValueError:
        raise RuntimeError(f"{TIMEOUT_FACTOR_ENV}={raw!r} is not a number") from None
    if not 1.0 <= factor <= 100.0:
        raise RuntimeError(f"{TIMEOUT_FACTOR_ENV}={raw!r} must be between 1 and 100")
    return factor


#: This run's factor.
TIMEOUT_FACTOR = timeout_factor()


def scaled(seconds: float) -> float:
    """``seconds`` stretched by this run's factor."""
    return seconds * TIMEOUT_FACTOR


__all__ = ["TIMEOUT_FACTOR", "TIMEOUT_FACTOR_ENV", "scaled", "timeout_factor"]
