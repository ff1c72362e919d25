"""Render a settings dataclass as commented YAML: every option, its default and its doc.

The shipped ``config/device.yaml`` and ``config/relay.yaml`` are made by this module
(``scripts/gen-config``) and a test checks they are current, so the documentation of
an option cannot drift from its code.
"""

from __future__ import annotations

import dataclasses
import textwrap
import typing
from typing import Any

import yaml

from edgevoice.config.loader import field_docs


def _scalar(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def render(cls: type[Any], header: str = "", indent: int = 0) -> str:
    lines: list[str] = []
    if header:
        lines += [f"# {line}" if line else "#" for line in header.splitlines()]
        lines.append("")
    _render(cls, indent, lines)
    return "\n".join(lines).rstrip() + "\n"


def _render(cls: type[Any], indent: int, lines: list[str]) -> None:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    pad = " " * indent
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        doc = docs.get(f.name, "")
        if dataclasses.is_dataclass(tp):
            section_doc = " ".join((tp.__doc__ or "").split())
            if indent == 0 and lines and lines[-1] != "":
                lines.append("")
            for line in textwrap.wrap(section_doc or doc, 88 - indent):
                lines.append(f"{pad}# {line}")
            lines.append(f"{pad}{f.name}:")
            _render(typing.cast(type, tp), indent + 2, lines)
            continue
        default: object = (f.default if f.default is not dataclasses.MISSING
                           else f.default_factory())  # type: ignore[misc,operator]
        for line in textwrap.wrap(f"{doc} [default: {_scalar(default) or 'empty'}]",
                                  88 - indent):
            lines.append(f"{pad}# {line}")
        value = _scalar(default)
        lines.append(f"{pad}{f.name}:{' ' + value if value else ''}")
