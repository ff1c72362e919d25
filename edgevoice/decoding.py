"""One typed decoder: parsed YAML or JSON (dicts, lists, scalars) → frozen dataclasses.

It walks the dataclass's type hints, so a new config setting or message field needs
only a typed field. Supported types: bool, int, float, str, Any, ``Literal[...]``,
``X | None`` and other unions, ``tuple[X, ...]``, ``dict[K, V]`` and nested
dataclasses. The two callers differ only in policy (:class:`DecodePolicy`): the
config loader rejects unknown keys and non-finite numbers and says "mapping"; the
wire protocol ignores unknown fields (a newer peer may add optional ones), bounds
integers to what JSON peers can represent, and says "object". Every problem is one
:class:`DecodeError` naming the dotted path and the reason; callers turn it into
their own error (``ConfigError``, ``RemoteProtocolError``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, Union

from edgevoice.config.base import SettingError
from edgevoice.errors import EdgevoiceError

T = TypeVar("T")


class DecodeError(EdgevoiceError):
    """``path`` (dotted; empty: the top level) cannot be decoded: ``reason``."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path or '(top level)'}: {reason}")


@dataclass(frozen=True)
class DecodePolicy:
    """How strict a decoder is, and the words its messages use."""

    unknown_keys: Literal["reject", "ignore"] = "reject"
    #: reject NaN and infinities
    finite_floats: bool = True
    #: largest magnitude an integer may have (None: any)
    max_abs_int: int | None = None
    #: what a dict is called in messages ("a mapping" in YAML, "an object" in JSON)
    mapping_word: str = "a mapping"
    #: what an int is called in messages
    integer_word: str = "a whole number"
    #: what a missing value is called ("empty" in YAML, "null" in JSON)
    null_word: str = "empty"


#: The config files' policy (edgevoice.config.loader).
CONFIG_POLICY = DecodePolicy()
#: The wire protocol's policy (edgevoice.protocol.messages).
PROTOCOL_POLICY = DecodePolicy(unknown_keys="ignore", finite_floats=False,
                               max_abs_int=2**53, mapping_word="an object",
                               integer_word="an integer", null_word="null")


def kind_of(value: object) -> str:
    """What a parsed value is, in words."""
    if value is None:
        return "nothing (null)"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)


@functools.cache
def dataclass_shape(cls: type) -> tuple[dict[str, Any], dict[str, dataclasses.Field[Any]]]:
    """A dataclass's resolved field types and fields by name (in declaration order),
    worked out once per class: the relay decodes and encodes every text message with
    it (a heartbeat from each idle device), and resolving the hints each time was most
    of a ping's cost (cProfile)."""
    hints = typing.get_type_hints(cls)
    return hints, {f.name: f for f in dataclasses.fields(cls)}


def decode(cls: type[T], data: object, policy: DecodePolicy, path: str = "") -> T:
    """Build the dataclass ``cls`` from ``data``; raise :class:`DecodeError`."""
    if not isinstance(data, Mapping):
        raise DecodeError(path, f"expected {policy.mapping_word}, got {kind_of(data)}")
    hints, fields = dataclass_shape(typing.cast(type, cls))
    prefix = f"{path}." if path else ""
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str) or key not in fields:
            if policy.unknown_keys == "ignore":
                continue
            known = ", ".join(sorted(fields))
            raise DecodeError(f"{prefix}{key}", f"unknown key (known keys: {known})")
        kwargs[key] = _coerce(hints[key], value, policy, f"{prefix}{key}")
    for name, f in fields.items():
        if name not in kwargs and f.init and f.default is dataclasses.MISSING \
                and f.default_factory is dataclasses.MISSING:
            raise DecodeError(path, f"missing field {name!r}")
    try:
        return cls(**kwargs)
    except SettingError as exc:
        raise DecodeError(f"{prefix}{exc.key}", exc.reason) from None
    except (TypeError, ValueError) as exc:
        raise DecodeError(path, str(exc)) from None


def _coerce(tp: Any, value: Any, policy: DecodePolicy, path: str) -> Any:
    if tp is int and type(value) is int and (policy.max_abs_int is None
                                             or -policy.max_abs_int <= value <= policy.max_abs_int):
        return value  # the common case (every field of a heartbeat), before get_origin
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        options = [o for o in args if o is not type(None)]
        if value is None:
            if len(options) < len(args):
                return None
            raise DecodeError(path, f"must not be {policy.null_word}")
        last: DecodeError | None = None
        for option in options:
            try:
                return _coerce(option, value, policy, path)
            except DecodeError as exc:
                last = exc
        assert last is not None
        raise last
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
            choices = ", ".join(repr(a) for a in allowed)
            raise DecodeError(path, f"{value!r} is not one of {choices}")
        return value
    if origin is tuple:
        (item_type, *_rest) = typing.get_args(tp)
        if not isinstance(value, list):
            raise DecodeError(path, f"expected a list, got {kind_of(value)}")
        return tuple(_coerce(item_type, v, policy, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        if not isinstance(value, Mapping):
            raise DecodeError(path, f"expected {policy.mapping_word}, got {kind_of(value)}")
        return {_coerce(key_type, k, policy, f"{path}.{k}"):
                _coerce(value_type, v, policy, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return decode(typing.cast(type, tp), value, policy, path)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise DecodeError(path, f"expected true or false, got {kind_of(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise DecodeError(path, f"expected {policy.integer_word}, got {kind_of(value)}")
        if policy.max_abs_int is not None and abs(value) > policy.max_abs_int:
            raise DecodeError(path, "integer out of range")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise DecodeError(path, f"expected a number, got {kind_of(value)}")
        if policy.finite_floats and not math.isfinite(value):
            raise DecodeError(path, "must be a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise DecodeError(path, f"expected a string, got {kind_of(value)}")
        return value
    raise TypeError(f"type {tp!r} at {path} is not supported")  # a bug, not bad input


__all__ = ["CONFIG_POLICY", "PROTOCOL_POLICY", "DecodeError", "DecodePolicy", "decode",
           "kind_of"]
