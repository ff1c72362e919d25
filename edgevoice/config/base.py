"""The convention every settings dataclass follows, and the error it raises.

Settings are frozen dataclasses owned by the module they configure (the silence
detector owns ``SilenceSettings``, and so on); ``edgevoice.config.model`` composes
them into ``DeviceConfig`` and ``RelayConfig``. Rules:

* every field has a default, a type the loader understands (``bool``, ``int``,
  ``float``, ``str``, ``Literal[...]``, ``X | None``, ``tuple[str, ...]``,
  ``dict[str, str]``, or another settings dataclass) and the unit in its name
  (``hangover_ms``, ``bitrate_bps``, ``rate_hz``);
* a string literal right after a field documents it (shown by ``--help-config``);
* ``__post_init__`` checks ranges and raises :class:`SettingError` naming the field.
"""

from __future__ import annotations


class SettingError(ValueError):
    """A settings value is out of range. The loader prefixes file and section path."""

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"{key}: {reason}")


def require(condition: bool, key: str, reason: str) -> None:
    """Raise :class:`SettingError` for ``key`` unless ``condition`` holds."""
    if not condition:
        raise SettingError(key, reason)
