"""Running under systemd: readiness, status and watchdog notifications.

The unit files, installer and their documentation live outside the package
(``systemd/``, ``scripts/install``, ``docs/install.md``).
"""

from edgevoice.service.notify import (
    LoopLagProbe,
    Probe,
    SystemdNotifier,
    WatchdogPolicy,
    WatchdogSettings,
    WatchdogVerdict,
    capture_probe,
    sanitize_status,
    watchdog_usec_from_env,
)

__all__ = [
    "LoopLagProbe",
    "Probe",
    "SystemdNotifier",
    "WatchdogPolicy",
    "WatchdogSettings",
    "WatchdogVerdict",
    "capture_probe",
    "sanitize_status",
    "watchdog_usec_from_env",
]
