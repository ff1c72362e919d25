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


def _join_docs(field_doc: str, section_doc: str) -> str:
    """The field's doc (what this use is for), then the section's, without repeats."""
    if not field_doc or section_doc.startswith(field_doc.rstrip(".")):
        return section_doc or field_doc
    if not section_doc or field_doc.startswith(section_doc.rstrip(".")):
        return field_doc
    return f"{field_doc} {section_doc}"


def render(cls: type[Any], header: str = "", indent: int = 0) -> str:
    lines: list[str] = []
    if header:
        lines += [f"# {line}" if line else "#" for line in header.splitlines()]
        lines.append("")
    _render(cls(), indent, lines)
    return "\n".join(lines).rstrip() + "\n"


def _render(instance: Any, indent: int, lines: list[str]) -> None:
    """Every field of ``instance`` (a default-built settings object) with its doc."""
    cls = type(instance)
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    pad = " " * indent
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        doc = docs.get(f.name, "")
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(tp):
            # the field's own doc says what this use of the section is for
            own = " ".join((tp.__doc__ or "").split())
            section_doc = _join_docs(doc, own)
            if indent == 0 and lines and lines[-1] != "":
                lines.append("")
            for line in textwrap.wrap(section_doc, 88 - indent):
                lines.append(f"{pad}# {line}")
            lines.append(f"{pad}{f.name}:")
            _render(value, indent + 2, lines)
            continue
        for line in textwrap.wrap(f"{doc} [default: {_scalar(value) or 'empty'}]",
                                  88 - indent):
            lines.append(f"{pad}# {line}")
        text = _scalar(value)
        lines.append(f"{pad}{f.name}:{' ' + text if text else ''}")
