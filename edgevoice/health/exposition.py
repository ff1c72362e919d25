"""Prometheus text rendering of metric families built from a snapshot.

The endpoints build metric families from a snapshot at scrape time and render them
through a private registry: nothing is ever registered in prometheus-client's global
default registry, so two endpoints (or two tests) in one process cannot collide.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from edgevoice.health.http import HttpApi, Response
from edgevoice.health.system import SystemStats

if TYPE_CHECKING:
    from prometheus_client.core import Metric

# prometheus-client (and the http.server, wsgiref, gzip ... its exposition module pulls
# in) is imported at the first scrape, not at start-up: 1.5 MB of a device's resident
# memory (issue 15) for an endpoint most devices never serve.

#: The classic text format: understood by every Prometheus version and scraper.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Families:
    """A collector that yields families computed beforehand."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def render(families: Iterable[Metric]) -> bytes:
    """The text exposition of ``families``."""
    from prometheus_client.core import CollectorRegistry
    from prometheus_client.exposition import generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return bytes(generate_latest(registry))


def metrics_response(families: Iterable[Metric]) -> Response:
    """A 200 carrying the text exposition of ``families``."""
    return Response(200, CONTENT_TYPE, render(families))


def gauge(name: str, documentation: str, value: float | None) -> list[Metric]:
    """A one-sample gauge, or nothing when the value is unknown (absent beats fake 0)."""
    if value is None:
        return []
    from prometheus_client.core import GaugeMetricFamily

    return [GaugeMetricFamily(name, documentation, value=value)]


def counter(name: str, documentation: str, value: float) -> Metric:
    """A one-sample counter; ``name`` without ``_total`` (the exposition adds it)."""
    from prometheus_client.core import CounterMetricFamily

    return CounterMetricFamily(name, documentation, value=value)


def labelled_counter(
    name: str, documentation: str, label: str, values: Mapping[str, float]
) -> Metric:
    """A counter with one sample per key of ``values``."""
    from prometheus_client.core import CounterMetricFamily

    family = CounterMetricFamily(name, documentation, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


def iso_utc(unix_s: float) -> str:
    """A wall-clock time as ISO 8601 in UTC with second precision, for JSON."""
    return datetime.fromtimestamp(unix_s, UTC).isoformat(timespec="seconds")


def system_metrics(system: SystemStats, *, prefix: str) -> list[Metric]:
    """Process and board families named ``{prefix}process_…``/``{prefix}soc_…``
    (absent where the sample has None)."""
    families: list[Metric] = [
        *gauge(
            f"{prefix}process_resident_memory_bytes",
            "Resident memory of the process.",
            system.rss_bytes,
        ),
        *gauge(f"{prefix}process_open_fds", "Open file descriptors.", system.open_fds),
        *gauge(f"{prefix}soc_temperature_celsius", "SoC temperature.", system.soc_temp_c),
    ]
    if system.cpu_seconds is not None:
        families.append(
            counter(
                f"{prefix}process_cpu_seconds", "CPU time used by the process.", system.cpu_seconds
            )
        )
    if system.thread_cpu_seconds:
        families.append(labelled_counter(
            f"{prefix}thread_cpu_seconds", "CPU time used by the process, by thread: the "
            "event loop, the microphone's and the speaker's audio callbacks, the sound "
            "server's client, other threads, and threads that ended unseen.", "thread",
            system.thread_cpu_seconds))
    if system.throttling is not None:
        from prometheus_client.core import GaugeMetricFamily

        for name, flags, documentation in (
            (f"{prefix}soc_throttled", system.throttling.active(), "Firmware flag active now."),
            (
                f"{prefix}soc_throttled_since_boot",
                system.throttling.occurred(),
                "Firmware flag seen since boot.",
            ),
        ):
            family = GaugeMetricFamily(name, documentation, labels=["flag"])
            for flag, on in flags.items():
                family.add_metric([flag], float(on))
            families.append(family)
    return families


def endpoint_metrics(api: HttpApi | None, prefix: str) -> list[Metric]:
    """What the endpoint itself refused: slow or idle clients closed to make room,
    connections answered 503 because every slot was busy, requests that timed out,
    and 401s (``prefix``: ``edgevoice_health`` or ``edgevoice_relay_admin``)."""
    if api is None:
        return []
    return [
        counter(f"{prefix}_connections_evicted",
                "Idle or slow connections closed to make room for a new one.", api.evicted),
        counter(f"{prefix}_connections_refused",
                "Connections answered 503 because every slot was being served.", api.refused),
        counter(f"{prefix}_requests_timed_out",
                "Requests whose head or body did not arrive in time (408).", api.timed_out),
        counter(f"{prefix}_auth_failures", "Requests refused with 401.", api.auth_failures),
    ]
