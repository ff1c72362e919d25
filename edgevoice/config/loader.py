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
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import yaml

from edgevoice.decoding import CONFIG_POLICY, DecodeError, decode
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
    """Build the dataclass ``cls`` from parsed YAML ``data`` (errors name ``name``)."""
    try:
        return decode(cls, data, CONFIG_POLICY, prefix.rstrip("."))
    except DecodeError as exc:
        raise ConfigError(name, exc.path or "(top level)", exc.reason) from None


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
        default: object = f.default
        if default is dataclasses.MISSING and callable(f.default_factory):
            default = f.default_factory()
        yield f"{prefix}{f.name}", _type_name(tp), default, docs.get(f.name, "")


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")
