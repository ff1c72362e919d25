"""Health, statistics and admin endpoints of the device and the relay.

* :mod:`edgevoice.health.http`: a tiny asyncio HTTP/1.1 server, its limits and the
  exposure rule (open on loopback, token required anywhere else);
* :mod:`edgevoice.health.device`: ``/healthz``, ``/stats``, ``/metrics``, ``/trigger``,
  ``/interrupt`` over the daemon's :class:`~edgevoice.health.device.DeviceHealthSource`;
* :mod:`edgevoice.health.relay`: ``/healthz``, ``/metrics``, ``/devices`` over the
  relay's :class:`~edgevoice.health.relay.RelayHealthSource`;
* :mod:`edgevoice.health.system`: process and board numbers from procfs, sysfs and
  ``vcgencmd``;
* :mod:`edgevoice.health.exposition`: Prometheus text through a private registry.

Nothing is imported here, so importing one module does not pull in the others.
"""
