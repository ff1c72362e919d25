"""systemd/edgevoice-relay@.service: one relay per core, as hardened as the single unit.

The same checks as tests/service/test_units.py (whose helpers are reused), run on an
instance of the template, plus what the template promises for a rolling restart.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "systemd" / "edgevoice-relay@.service"
SINGLE = REPO / "systemd" / "edgevoice-relay.service"


def service_checks() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "service_unit_checks", REPO / "tests" / "service" / "test_units.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


units = service_checks()
needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze is not installed")


@needs_analyze
def test_an_instance_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    root = units.make_verify_root(tmp_path / "root",
                                  {"edgevoice-relay@.service": TEMPLATE.read_text()})
    for instance in ("edgevoice-relay@1.service", "edgevoice-relay@2.service"):
        result = units.verify(root, instance)
        assert (result.returncode, result.stdout + result.stderr) == (0, ""), instance


@needs_analyze
def test_verify_catches_a_broken_template(tmp_path: Path) -> None:
    broken = TEMPLATE.read_text().replace("ProtectSystem=strict", "ProtectSystem=strickt")
    root = units.make_verify_root(tmp_path / "root", {"edgevoice-relay@.service": broken})
    result = units.verify(root, "edgevoice-relay@1.service")
    assert "strickt" in result.stdout + result.stderr


@needs_analyze
def test_the_template_is_rated_as_safe_as_the_single_relay(tmp_path: Path) -> None:
    instance = tmp_path / "edgevoice-relay@1.service"
    instance.write_text(TEMPLATE.read_text())
    score, verdict = units.exposure(instance)
    assert score <= units.MAX_EXPOSURE, f"exposure {score} {verdict}"
    assert score <= units.exposure(SINGLE)[0]


def test_the_template_keeps_the_single_units_contract_but_waits_for_the_drain() -> None:
    template, single = units.parse_unit(TEMPLATE), units.parse_unit(SINGLE)
    assert units.one(template, "Service", "ExecStart") == (
        "/opt/edgevoice/venv/bin/edgevoice relay --config /etc/edgevoice/relay@%i.yaml")
    for key in ("Type", "NotifyAccess", "WatchdogSec", "Restart", "User", "KillSignal",
                "CapabilityBoundingSet", "NoNewPrivileges", "ProtectSystem",
                "MemoryDenyWriteExecute", "SystemCallFilter", "RestrictAddressFamilies"):
        assert units.values(template, "Service", key) == units.values(single, "Service", key), key
    # SIGTERM drains (cluster.drain_timeout_ms, default 8 s): systemd must wait for it
    from edgevoice.relay.shared import ClusterSettings
    stop_s = int(units.one(template, "Service", "TimeoutStopSec"))
    assert stop_s * 1000 > ClusterSettings().drain_timeout_ms + 5000
    # drain, the last hand-overs (3 s), then close (limits.shutdown_timeout_ms)
    from edgevoice.relay.settings import LimitsSettings
    assert int(units.one(single, "Service", "TimeoutStopSec")) * 1000 > \
        ClusterSettings().drain_timeout_ms + 3000 + LimitsSettings().shutdown_timeout_ms
