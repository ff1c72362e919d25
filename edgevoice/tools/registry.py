"""Function-calling tools: what they are, where they come from, and how one is run.

A :class:`Tool` is a name, a description and a JSON schema the model reads, plus
an async handler ``handler(args, ctx)`` returning a JSON-able dict or a string.
The :class:`ToolRegistry` offers the tools to the model (:meth:`ToolRegistry.specs`)
and runs them when asked (:meth:`ToolRegistry.run`): arguments are checked against
the schema's basics, the handler is given a deadline, and any failure becomes an
error *result* the model can talk about. A tool can never break a conversation.

Tools come from three places (:func:`build_registry`):

* the built-ins of :mod:`edgevoice.tools.builtin` (date and time, device status);
* installed packages that declare an entry point in the ``edgevoice.tools`` group;
* ``package.module:attribute`` strings in the relay's config.

An entry point or config string may name a :class:`Tool`, an iterable of tools, or
a callable that returns either.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
import inspect
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from edgevoice.config.base import require
from edgevoice.errors import ToolError
from edgevoice.tools.homeassistant_settings import HomeAssistantSettings
from edgevoice.upstream.base import DeviceContext

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "edgevoice.tools"
#: Nova (like Bedrock's Converse API) accepts these tool names.
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")

ToolResult = Mapping[str, Any] | str
ToolHandler = Callable[[dict[str, Any], DeviceContext], Awaitable[ToolResult]]


@dataclass(frozen=True)
class Tool:
    """A function the model may call."""

    name: str
    description: str
    input_schema: Mapping[str, Any]
    handler: ToolHandler = field(compare=False)

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ToolError(
                f"tool name {self.name!r} must be 1-64 letters, digits, '_' or '-', "
                "starting with a letter"
            )
        if not self.description.strip():
            raise ToolError(f"tool {self.name!r} needs a description: the model reads it")
        if self.input_schema.get("type", "object") != "object":
            raise ToolError(f"tool {self.name!r}: input_schema must describe an object")


@dataclass(frozen=True)
class ToolSettings:
    """Which function-calling tools the model is offered."""

    builtin: bool = True
    """Offer the built-in tools (current date and time, device status)."""
    entry_points: bool = True
    """Offer tools that installed packages declare in the 'edgevoice.tools' entry point group."""
    declared: tuple[str, ...] = ()
    """More tools as 'package.module:attribute' strings."""
    disabled: tuple[str, ...] = ()
    """Names of tools not to offer, whatever their source."""
    homeassistant: HomeAssistantSettings = field(default_factory=HomeAssistantSettings)
    """Home Assistant tools (an entry point of this package; docs/home-assistant.md)."""

    def __post_init__(self) -> None:
        for i, ref in enumerate(self.declared):
            require(
                _is_reference(ref),
                f"declared[{i}]",
                f"{ref!r} is not of the form 'package.module:attribute'",
            )


def _is_reference(ref: str) -> bool:
    module, sep, attribute = ref.partition(":")
    return bool(sep and module and attribute) and all(
        part.isidentifier() for part in module.split(".") + attribute.split(".")
    )


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
    "null": (type(None),),
}


def check_arguments(schema: Mapping[str, Any], args: Mapping[str, Any]) -> str | None:
    """Check ``args`` against the basics of ``schema``; return the problem, or None.

    Only what models get wrong in practice: required properties, the JSON type of
    each known property, and ``enum``. A full JSON-schema validator is not needed
    to protect a handler from a missing or mistyped argument.
    """
    required = schema.get("required", [])
    if isinstance(required, list):
        missing = [name for name in required if name not in args]
        if missing:
            return f"missing required argument(s): {', '.join(map(str, missing))}"
    properties = schema.get("properties", {})
    if not isinstance(properties, Mapping):
        return None
    for name, value in args.items():
        spec = properties.get(name)
        if not isinstance(spec, Mapping):
            continue
        wanted = spec.get("type")
        names = [wanted] if isinstance(wanted, str) else wanted
        if isinstance(names, list):
            types = tuple(t for n in names if isinstance(n, str) for t in _JSON_TYPES.get(n, ()))
            # bool is an int in Python, but not a JSON integer or number.
            is_bool = isinstance(value, bool)
            if types and (not isinstance(value, types) or (is_bool and bool not in types)):
                return f"argument {name!r} must be of type {' or '.join(map(str, names))}"
        choices = spec.get("enum")
        if isinstance(choices, list) and value not in choices:
            return f"argument {name!r} must be one of {choices}"
    return None


def _error(message: str) -> str:
    return json.dumps({"error": message})


class ToolRegistry:
    """The tools offered to the model, by name."""

    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for tool in tools:
            self.register(tool)

    def register(self, tool: Tool) -> None:
        """Add ``tool``; a second tool of the same name is an error."""
        if tool.name in self._tools:
            raise ToolError(f"two tools are named {tool.name!r}")
        self._tools[tool.name] = tool
        logger.debug("tool registered: %s", tool.name)

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __len__(self) -> int:
        return len(self._tools)

    def __iter__(self) -> Iterator[Tool]:
        return iter(self._tools.values())

    def names(self) -> list[str]:
        return list(self._tools)

    def specs(self) -> list[dict[str, Any]]:
        """``toolSpec`` entries for Nova's ``promptStart``."""
        from edgevoice.nova.events import tool_spec

        return [tool_spec(t.name, t.description, t.input_schema) for t in self._tools.values()]

    async def run(
        self, name: str, json_args: str, ctx: DeviceContext, timeout_s: float
    ) -> tuple[bool, str]:
        """Run tool ``name``; return ``(ok, result_json)``. Never raises.

        ``result_json`` is the handler's dict as JSON, a string result as
        ``{"result": ...}``, or ``{"error": ...}`` when the tool is unknown, the
        arguments are wrong, the handler raised, or it ran past ``timeout_s``.
        """
        started = time.monotonic()
        tool = self._tools.get(name)
        if tool is None:
            logger.warning("model asked for unknown tool %r", name)
            return False, _error(f"there is no tool named {name!r}")
        try:
            args = json.loads(json_args) if json_args.strip() else {}
        except ValueError:
            return False, _error("the arguments are not valid JSON")
        if not isinstance(args, dict):
            return False, _error("the arguments must be a JSON object")
        problem = check_arguments(tool.input_schema, args)
        if problem is not None:
            logger.info("tool %s: bad arguments: %s", name, problem)
            return False, _error(problem)
        try:
            async with asyncio.timeout(timeout_s):
                result = await tool.handler(args, ctx)
        except TimeoutError:
            logger.warning("tool %s timed out after %.1f s", name, timeout_s)
            return False, _error(f"the tool {name} did not answer within {timeout_s:g} s")
        except Exception as exc:
            # A broken tool is the tool's problem: the conversation goes on.
            logger.warning("tool %s failed: %s", name, exc, exc_info=True)
            return False, _error(f"the tool {name} failed: {type(exc).__name__}")
        try:
            text = (
                json.dumps({"result": result})
                if isinstance(result, str)
                else json.dumps(dict(result), default=str)
            )
        except (TypeError, ValueError) as exc:
            logger.warning("tool %s returned something that is not JSON: %s", name, exc)
            return False, _error(f"the tool {name} returned an unusable result")
        logger.debug("tool %s ok in %.1f ms", name, (time.monotonic() - started) * 1000)
        return True, text


def _tools_from(obj: object, origin: str, settings: ToolSettings | None = None) -> list[Tool]:
    """Interpret what an entry point or config string names.

    A factory that takes one parameter is given the :class:`ToolSettings` (that is
    how a tool set finds its own section, e.g. ``homeassistant``).
    """
    if isinstance(obj, Tool):
        return [obj]
    if callable(obj) and not isinstance(obj, type):
        takes_settings = len(inspect.signature(obj).parameters) == 1
        made = obj(settings or ToolSettings()) if takes_settings else obj()
        return _tools_from(made, origin)
    if isinstance(obj, Iterable) and not isinstance(obj, str | bytes | Mapping):
        tools = list(obj)
        if all(isinstance(t, Tool) for t in tools):
            return tools
    raise ToolError(f"{origin} is not a Tool, an iterable of Tools or a factory of them")


def load_reference(ref: str) -> list[Tool]:
    """Import ``package.module:attribute`` and return the tools it names."""
    if not _is_reference(ref):
        raise ToolError(f"{ref!r} is not of the form 'package.module:attribute'")
    module_name, _, attribute = ref.partition(":")
    try:
        obj: object = importlib.import_module(module_name)
        for part in attribute.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ToolError(f"cannot load tool {ref!r}: {exc}") from exc
    return _tools_from(obj, ref)


def load_entry_points(
    group: str = ENTRY_POINT_GROUP, settings: ToolSettings | None = None
) -> list[Tool]:
    """Tools of every installed ``group`` entry point; a broken one is logged and skipped."""
    tools: list[Tool] = []
    for entry_point in importlib.metadata.entry_points(group=group):
        try:
            tools += _tools_from(
                entry_point.load(), f"entry point {entry_point.name!r}", settings
            )
        except Exception as exc:
            # One broken plugin must not take every other tool (or the relay) down.
            logger.error("skipping tool entry point %r: %s", entry_point.name, exc)
    return tools


def build_registry(settings: ToolSettings | None = None) -> ToolRegistry:
    """The registry ``settings`` describe: built-ins, entry points, then declared.

    A declared tool that cannot be loaded is an error (the operator asked for it);
    a broken entry point is skipped with an error in the log.
    """
    from edgevoice.tools.builtin import builtin_tools

    settings = settings or ToolSettings()
    candidates: list[Tool] = []
    if settings.builtin:
        candidates += builtin_tools()
    if settings.entry_points:
        candidates += load_entry_points(settings=settings)
    for ref in settings.declared:
        candidates += load_reference(ref)
    registry = ToolRegistry()
    for tool in candidates:
        if tool.name in settings.disabled:
            continue
        registry.register(tool)
    return registry
