"""The one typed decoder, under both policies (config files and the wire protocol)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

from edgevoice.config.base import require
from edgevoice.decoding import CONFIG_POLICY, PROTOCOL_POLICY, DecodeError, decode


@dataclass(frozen=True)
class Inner:
    level_db: float = 0.0
    mode: Literal["a", "b"] = "a"

    def __post_init__(self) -> None:
        require(self.level_db <= 0, "level_db", "must be <= 0")


@dataclass(frozen=True)
class Outer:
    count: int
    name: str | None = None
    inner: Inner = field(default_factory=Inner)
    tags: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)
    key: int | str = 0


def test_nested_values_are_built_and_typed() -> None:
    got = decode(Outer, {"count": 2, "inner": {"level_db": -3, "mode": "b"},
                         "tags": ["x", "y"], "extra": {"k": [1]}}, CONFIG_POLICY)
    assert got == Outer(2, None, Inner(-3.0, "b"), ("x", "y"), {"k": [1]})
    assert isinstance(got.inner.level_db, float)


@pytest.mark.parametrize(("data", "path", "reason"), [
    ({}, "", "missing field 'count'"),
    ({"count": True}, "count", "expected a whole number, got a boolean"),
    ({"count": 1, "inner": []}, "inner", "expected a mapping, got a list"),
    ({"count": 1, "inner": {"mode": "c"}}, "inner.mode", "'c' is not one of 'a', 'b'"),
    ({"count": 1, "inner": {"level_db": 3}}, "inner.level_db", "must be <= 0"),
    ({"count": 1, "inner": {"level_db": float("nan")}}, "inner.level_db", "finite"),
    ({"count": 1, "tags": ["x", 2]}, "tags[1]", "expected a string"),
    ({"count": 1, "colour": "red"}, "colour", "unknown key"),
    ({"count": None}, "count", "expected a whole number, got nothing (null)"),
    ({"count": 1, "key": None}, "key", "must not be empty"),
])
def test_config_policy_names_the_path_and_the_reason(data: dict[str, Any], path: str,
                                                     reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode(Outer, data, CONFIG_POLICY)
    assert info.value.path == path and reason in info.value.reason


def test_protocol_policy_ignores_unknown_fields_and_bounds_integers() -> None:
    assert decode(Outer, {"count": 1, "type": "x", "future": 1}, PROTOCOL_POLICY) == Outer(1)
    with pytest.raises(DecodeError, match="integer out of range"):
        decode(Outer, {"count": 2**60}, PROTOCOL_POLICY)
    with pytest.raises(DecodeError, match="expected an integer"):
        decode(Outer, {"count": "1"}, PROTOCOL_POLICY, "msg")
    with pytest.raises(DecodeError, match="expected an object"):
        decode(Outer, {"count": 1, "inner": 5}, PROTOCOL_POLICY)
    with pytest.raises(DecodeError, match="must not be null"):
        decode(Outer, {"count": 1, "key": None}, PROTOCOL_POLICY)
