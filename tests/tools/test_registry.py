"""The tool registry: specs for Nova, argument checks, timeouts, failures, discovery."""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import pytest

from edgevoice.errors import ToolError
from edgevoice.tools.registry import (
    Tool,
    ToolRegistry,
    ToolSettings,
    build_registry,
    check_arguments,
    load_entry_points,
    load_reference,
)
from edgevoice.upstream.base import DeviceContext

CTX = DeviceContext(device_id="kitchen", session_id="s1")

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "days": {"type": "integer"},
        "units": {"type": "string", "enum": ["metric", "imperial"]},
    },
    "required": ["city"],
}


async def _weather(args: dict[str, Any], ctx: DeviceContext) -> dict[str, Any]:
    return {"city": args["city"], "device": ctx.device_id, "forecast": "sunny"}


def weather_tool() -> Tool:
    return Tool("get_weather", "Weather for a city.", WEATHER_SCHEMA, _weather)


def run(registry: ToolRegistry, name: str, args: str, timeout_s: float = 1.0) -> tuple[bool, Any]:
    ok, text = asyncio.run(registry.run(name, args, CTX, timeout_s))
    return ok, json.loads(text)


def test_specs_carry_the_schema_as_a_json_string() -> None:
    registry = ToolRegistry([weather_tool()])
    (spec,) = registry.specs()
    assert spec["toolSpec"]["name"] == "get_weather"
    assert spec["toolSpec"]["description"] == "Weather for a city."
    schema_text = spec["toolSpec"]["inputSchema"]["json"]
    assert isinstance(schema_text, str)
    assert json.loads(schema_text) == WEATHER_SCHEMA


def test_run_returns_the_handlers_result_as_json() -> None:
    registry = ToolRegistry([weather_tool()])
    ok, result = run(registry, "get_weather", '{"city": "Oslo"}')
    assert ok
    assert result == {"city": "Oslo", "device": "kitchen", "forecast": "sunny"}


def test_string_results_are_wrapped() -> None:
    async def hello(args: dict[str, Any], ctx: DeviceContext) -> str:
        return 'say "hi"'

    registry = ToolRegistry([Tool("hello", "Greets.", {"type": "object"}, hello)])
    assert run(registry, "hello", "") == (True, {"result": 'say "hi"'})


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        ("{}", "missing required argument(s): city"),
        ('{"city": 3}', "argument 'city' must be of type string"),
        ('{"city": "Oslo", "days": true}', "argument 'days' must be of type integer"),
        ('{"city": "Oslo", "days": 1.5}', "argument 'days' must be of type integer"),
        ('{"city": "Oslo", "units": "kelvin"}', "argument 'units' must be one of"),
        ("[1, 2]", "the arguments must be a JSON object"),
        ("{not json", "the arguments are not valid JSON"),
    ],
)
def test_bad_arguments_become_error_results(args: str, problem: str) -> None:
    called = []

    async def handler(a: dict[str, Any], ctx: DeviceContext) -> dict[str, Any]:
        called.append(a)
        return {}

    registry = ToolRegistry([Tool("get_weather", "Weather.", WEATHER_SCHEMA, handler)])
    ok, result = run(registry, "get_weather", args)
    assert not ok
    assert result["error"].startswith(problem)
    assert called == []


def test_check_arguments_accepts_valid_input() -> None:
    assert check_arguments(WEATHER_SCHEMA, {"city": "Oslo", "days": 3, "units": "metric"}) is None
    number_schema = {"type": "object", "properties": {"x": {"type": "number"}}}
    assert check_arguments(number_schema, {"x": 2}) is None
    assert check_arguments({"type": "object"}, {"anything": [1]}) is None


def test_unknown_tool_is_an_error_result() -> None:
    ok, result = run(ToolRegistry(), "launch_rockets", "{}")
    assert not ok
    assert "launch_rockets" in result["error"]


def test_slow_tool_times_out_with_an_error_result() -> None:
    async def slow(args: dict[str, Any], ctx: DeviceContext) -> dict[str, Any]:
        await asyncio.sleep(30)
        return {}

    registry = ToolRegistry([Tool("slow", "Slow.", {"type": "object"}, slow)])
    ok, result = run(registry, "slow", "{}", timeout_s=0.05)
    assert not ok
    assert "did not answer within 0.05 s" in result["error"]


def test_raising_tool_is_an_error_result() -> None:
    async def broken(args: dict[str, Any], ctx: DeviceContext) -> dict[str, Any]:
        raise RuntimeError("database on fire")

    registry = ToolRegistry([Tool("broken", "Broken.", {"type": "object"}, broken)])
    ok, result = run(registry, "broken", "{}")
    assert not ok
    assert result == {"error": "the tool broken failed: RuntimeError"}


def test_unserialisable_result_is_an_error_result() -> None:
    async def weird(args: dict[str, Any], ctx: DeviceContext) -> Any:
        return 42  # neither a mapping nor a string

    registry = ToolRegistry([Tool("weird", "Weird.", {"type": "object"}, weird)])
    ok, result = run(registry, "weird", "{}")
    assert not ok
    assert "unusable result" in result["error"]


def test_registry_rejects_duplicates_and_bad_tools() -> None:
    registry = ToolRegistry([weather_tool()])
    with pytest.raises(ToolError, match="two tools"):
        registry.register(weather_tool())
    with pytest.raises(ToolError, match="name"):
        Tool("has space", "x", {"type": "object"}, _weather)
    with pytest.raises(ToolError, match="description"):
        Tool("ok_name", " ", {"type": "object"}, _weather)
    with pytest.raises(ToolError, match="object"):
        Tool("ok_name", "x", {"type": "string"}, _weather)
    assert registry.get("get_weather") is not None
    assert registry.get("nope") is None
    assert "get_weather" in registry and len(registry) == 1


@pytest.fixture
def plugin_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A throwaway importable module defining tools in three shapes."""
    (tmp_path / "edgevoice_test_plugin.py").write_text(
        textwrap.dedent(
            """
            from edgevoice.tools.registry import Tool

            async def _echo(args, ctx):
                return {"echo": args.get("text", "")}

            ECHO = Tool("echo", "Echo text back.", {"type": "object"}, _echo)

            def make_tools():
                return [Tool("shout", "Shout.", {"type": "object"}, _echo)]

            NOT_A_TOOL = 42
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "edgevoice_test_plugin"
    sys.modules.pop("edgevoice_test_plugin", None)


def test_config_declared_references_load(plugin_module: str) -> None:
    assert [t.name for t in load_reference(f"{plugin_module}:ECHO")] == ["echo"]
    assert [t.name for t in load_reference(f"{plugin_module}:make_tools")] == ["shout"]
    with pytest.raises(ToolError, match="not a Tool"):
        load_reference(f"{plugin_module}:NOT_A_TOOL")
    with pytest.raises(ToolError, match="cannot load"):
        load_reference(f"{plugin_module}:MISSING")
    with pytest.raises(ToolError, match="form"):
        load_reference("no_colon_here")


def test_entry_points_load_and_broken_ones_are_skipped(
    plugin_module: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    points = [
        EntryPoint("echo", f"{plugin_module}:ECHO", "edgevoice.tools"),
        EntryPoint("broken", f"{plugin_module}:NOT_A_TOOL", "edgevoice.tools"),
        EntryPoint("gone", "no_such_module_xyz:TOOL", "edgevoice.tools"),
    ]

    def fake_entry_points(*, group: str) -> list[EntryPoint]:
        return points if group == "edgevoice.tools" else []

    monkeypatch.setattr("importlib.metadata.entry_points", fake_entry_points)
    assert [t.name for t in load_entry_points()] == ["echo"]
    assert "broken" in caplog.text and "gone" in caplog.text


def test_build_registry_combines_sources_and_honours_disabled(
    plugin_module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("importlib.metadata.entry_points", lambda *, group: [])
    registry = build_registry(
        ToolSettings(declared=(f"{plugin_module}:ECHO",), disabled=("device_status",))
    )
    assert registry.names() == ["current_time", "echo"]
    assert build_registry(ToolSettings(builtin=False, entry_points=False)).names() == []


def test_tool_settings_reject_malformed_references() -> None:
    from edgevoice.config.base import SettingError

    with pytest.raises(SettingError, match=r"declared\[0\]"):
        ToolSettings(declared=("not a reference",))
