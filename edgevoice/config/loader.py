"""Load a YAML file into frozen settings dataclasses, or fail with ``file: key: reason``.

The loader knows nothing about edgevoice's options: it walks the dataclass type
hints, so a new setting needs only a field with a default and a docstring. Every
error names the file, the dotted key and the reason, and nothing starts until the
whole file has been checked.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import textwrap
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from edgevoice.config.base import SettingError
from edgevoice.errors import ConfigError

T = TypeVar("T")

#: exit status for a configuration error (sysexits.h EX_CONFIG)
EXIT_CONFIG = 78


def load_file(path: str | Path, cls: type[T]) -> T:
    """Read ``path`` and build ``cls`` from it; raise ConfigError on any problem."""
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(name, "(file)", f"cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(name, "(file)", "is not UTF-8 text") from None
    return load_text(text, cls, name)


def load_text(text: str, cls: type[T], name: str = "<config>") -> T:
    """Build ``cls`` from YAML text; ``name`` is used in error messages."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "(yaml)"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(name, where, f"invalid YAML: {problem}") from None
    except (ValueError, RecursionError) as exc:  # e.g. absurd nesting, bad timestamps
        raise ConfigError(name, "(yaml)", f"invalid YAML: {exc}") from None
    if data is None:
        data = {}
    return build(cls, data, name)


def build(cls: type[T], data: object, name: str, prefix: str = "") -> T:
    """Build the dataclass ``cls`` from parsed YAML ``data``."""
    if not isinstance(data, Mapping):
        where = prefix.rstrip(".") or "(top level)"
        raise ConfigError(name, where, f"expected a mapping, got {_kind(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if not isinstance(key, str) or key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(name, str(dotted), f"unknown key (known keys: {known})")
        kwargs[key] = _coerce(hints[key], value, name, dotted)
    try:
        return cls(**kwargs)
    except SettingError as exc:
        raise ConfigError(name, f"{prefix}{exc.key}", exc.reason) from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(name, prefix.rstrip(".") or "(top level)", str(exc)) from None


def _kind(value: object) -> str:
    if value is None:
        return "nothing (null)"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)


def _coerce(tp: Any, value: Any, name: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = [o for o in typing.get_args(tp) if o is not type(None)]
        if value is None:
            if len(options) < len(typing.get_args(tp)):
                return None
            raise ConfigError(name, key, "must not be empty")
        last: ConfigError | None = None
        for option in options:
            try:
                return _coerce(option, value, name, key)
            except ConfigError as exc:
                last = exc
        assert last is not None
        raise last
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
            choices = ", ".join(repr(a) for a in allowed)
            raise ConfigError(name, key, f"{value!r} is not one of {choices}")
        return value
    if origin is tuple:
        (item_type, *_rest) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(name, key, f"expected a list, got {_kind(value)}")
        return tuple(_coerce(item_type, v, name, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        if not isinstance(value, Mapping):
            raise ConfigError(name, key, f"expected a mapping, got {_kind(value)}")
        return {
            _coerce(key_type, k, name, f"{key}.{k}"): _coerce(value_type, v, name, f"{key}.{k}")
            for k, v in value.items()
        }
    if dataclasses.is_dataclass(tp):
        return build(typing.cast(type, tp), value, name, f"{key}.")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(name, key, f"expected true or false, got {_kind(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(name, key, f"expected a whole number, got {_kind(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(name, key, f"expected a number, got {_kind(value)}")
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(name, key, "must be a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(name, key, f"expected a string, got {_kind(value)}")
        return value
    raise TypeError(f"settings type {tp!r} at {key} is not supported")  # a bug, not bad input


def field_docs(cls: type[Any]) -> dict[str, str]:
    """The string literal written after each field of a settings dataclass."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    tree = ast.parse(source)
    docs: dict[str, str] = {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for node, following in itertools.pairwise(body):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def describe(cls: type[Any], prefix: str = "") -> Iterator[tuple[str, str, object, str]]:
    """(dotted key, type, default, doc) for every option, for ``--help-config``."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from describe(typing.cast(type, tp), f"{prefix}{f.name}.")
            continue
        default: object = (f.default if f.default is not dataclasses.MISSING
                           else f.default_factory())  # type: ignore[misc,operator]
        yield f"{prefix}{f.name}", _type_name(tp), default, docs.get(f.name, "")


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")
