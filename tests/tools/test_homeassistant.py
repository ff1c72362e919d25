"""Home Assistant tools against a fake written from HA's REST API documentation.

Each tool runs through the real registry and the real urllib client over
127.0.0.1; the allow-list is checked from both sides (what the model gets back and
what reached Home Assistant).
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from edgevoice_dev.testing.fake_homeassistant import FakeHomeAssistant

from edgevoice.config.base import SettingError
from edgevoice.tools.homeassistant import homeassistant_tools
from edgevoice.tools.homeassistant_settings import HomeAssistantSettings
from edgevoice.tools.registry import ToolRegistry, ToolSettings, build_registry
from edgevoice.upstream.base import DeviceContext

TOKEN = "long-lived-test-token"
CTX = DeviceContext("kitchen-pi", "s1")


@pytest.fixture
def ha() -> Iterator[FakeHomeAssistant]:
    with FakeHomeAssistant(TOKEN) as fake:
        yield fake


def settings(tmp_path: Path, url: str, token: str = TOKEN, **kw: Any) -> HomeAssistantSettings:
    tmp_path.mkdir(parents=True, exist_ok=True)
    token_file = tmp_path / "ha.token"
    token_file.write_text(token + "\n")
    kw.setdefault("entities", ("light.bedroom", "cover.living_room", "climate.hall",
                               "scene.movie_night", "script.good_night", "light.garage"))
    kw.setdefault("areas", ("kitchen",))
    kw.setdefault("request_timeout_ms", 2_000)
    return HomeAssistantSettings(enabled=True, url=url, token_file=str(token_file), **kw)


def registry(ha_settings: HomeAssistantSettings) -> ToolRegistry:
    return ToolRegistry(homeassistant_tools(ToolSettings(homeassistant=ha_settings)))


def run(reg: ToolRegistry, name: str, *, must_run: bool = True, **args: Any) -> dict[str, Any]:
    ok, text = asyncio.run(reg.run(name, json.dumps(args), CTX, 10.0))
    assert ok or not must_run, text
    result = json.loads(text)
    assert isinstance(result, dict)
    return result


def test_the_entry_point_offers_the_tools_only_when_enabled(tmp_path: Path) -> None:
    assert "home_call_service" not in build_registry(ToolSettings()).names()
    on = ToolSettings(homeassistant=settings(tmp_path, "http://127.0.0.1:9"))
    assert {"home_list_entities", "home_get_state", "home_call_service", "home_assist"} <= set(
        build_registry(on).names())
    quiet = settings(tmp_path, "http://127.0.0.1:9", conversation=False)
    assert "home_assist" not in build_registry(ToolSettings(homeassistant=quiet)).names()


@pytest.mark.parametrize(("kw", "key"), [
    ({"entities": ("Kitchen Light",)}, "entities[0]"),
    ({"areas": ("kid's room",)}, "areas[0]"),
    ({"url": "homeassistant.local:8123"}, "url"),
    ({"entities": (), "areas": ()}, "entities"),
])
def test_bad_settings_are_refused_naming_the_key(
    tmp_path: Path, kw: dict[str, Any], key: str
) -> None:
    with pytest.raises(SettingError) as caught:
        settings(tmp_path, kw.pop("url", "http://127.0.0.1:9"), **kw)
    assert caught.value.key == key


def test_enabled_without_a_token_file_is_refused() -> None:
    with pytest.raises(SettingError, match="token_file"):
        HomeAssistantSettings(enabled=True, entities=("light.kitchen",))


def test_list_shows_exposed_entities_only(tmp_path: Path, ha: FakeHomeAssistant) -> None:
    reg = registry(settings(tmp_path, ha.url))
    listed = run(reg, "home_list_entities")
    ids = [e["entity_id"] for e in listed["entities"]]
    # the kitchen area brings its three; the front door lock is never exposed
    assert ids == sorted(["light.bedroom", "cover.living_room", "climate.hall",
                          "scene.movie_night", "script.good_night", "light.kitchen",
                          "switch.kettle", "sensor.kitchen_temperature"])
    kitchen = run(reg, "home_list_entities", area="kitchen")
    assert {e["entity_id"] for e in kitchen["entities"]} == {
        "light.kitchen", "switch.kettle", "sensor.kitchen_temperature"}
    # an area not on the allow-list shows only its individually exposed entities
    hall = run(reg, "home_list_entities", area="hall")
    assert [e["entity_id"] for e in hall["entities"]] == ["climate.hall"]
    lights = run(reg, "home_list_entities", domain="light")
    assert [e["entity_id"] for e in lights["entities"]] == ["light.bedroom", "light.kitchen"]


def test_get_state(tmp_path: Path, ha: FakeHomeAssistant) -> None:
    reg = registry(settings(tmp_path, ha.url))
    temp = run(reg, "home_get_state", entity_id="sensor.kitchen_temperature")
    assert temp == {"entity_id": "sensor.kitchen_temperature", "state": "21.5",
                    "name": "Kitchen temperature", "unit_of_measurement": "°C"}
    refused = run(reg, "home_get_state", entity_id="lock.front_door")
    assert "not exposed" in refused["error"]
    assert not any(p == "/api/states/lock.front_door" for _, p, _ in ha.calls)
    # exposed in the config, but Home Assistant has no such entity: HA's 404
    missing = run(reg, "home_get_state", entity_id="light.garage")
    assert missing == {"error": "Home Assistant has no entity 'light.garage'"}


@pytest.mark.parametrize(("domain", "service", "entity", "data", "state", "attr"), [
    ("light", "turn_on", "light.kitchen", {"brightness_pct": 50}, "on", ("brightness", 128)),
    ("light", "turn_off", "light.bedroom", {}, "off", None),
    ("switch", "toggle", "switch.kettle", {}, "on", None),
    ("cover", "set_cover_position", "cover.living_room", {"position": 40}, "open",
     ("current_position", 40)),
    ("climate", "set_temperature", "climate.hall", {"temperature": 21}, "heat",
     ("temperature", 21)),
    ("scene", "turn_on", "scene.movie_night", {}, "unknown", None),
    ("script", "turn_on", "script.good_night", {}, "off", None),
])
def test_call_service_drives_each_domain(
    tmp_path: Path, ha: FakeHomeAssistant, domain: str, service: str, entity: str,
    data: dict[str, Any], state: str, attr: tuple[str, Any] | None,
) -> None:
    reg = registry(settings(tmp_path, ha.url))
    done = run(reg, "home_call_service", domain=domain, service=service, entity_id=entity,
               data=data)
    assert done["done"] == f"{domain}.{service}", done
    assert ha.service_calls() == [(f"/api/services/{domain}/{service}",
                                   {**data, "entity_id": entity})]
    assert ha.states[entity]["state"] == state
    assert done["changed"][0]["state"] == state
    if attr is not None:
        assert ha.states[entity]["attributes"][attr[0]] == attr[1]


@pytest.mark.parametrize(("args", "says"), [
    ({"domain": "lock", "service": "unlock", "entity_id": "lock.front_door"}, "must be one of"),
    ({"domain": "light", "service": "turn_on", "entity_id": "light.hallway"}, "not exposed"),
    ({"domain": "light", "service": "explode", "entity_id": "light.kitchen"}, "no service"),
    ({"domain": "switch", "service": "turn_on", "entity_id": "light.kitchen"}, "not a switch"),
    ({"domain": "light", "service": "turn_on", "entity_id": "light.kitchen",
      "data": {"entity_id": "lock.front_door"}}, "does not take entity_id"),
])
def test_call_service_refuses_before_calling_home_assistant(
    tmp_path: Path, ha: FakeHomeAssistant, args: dict[str, Any], says: str
) -> None:
    reg = registry(settings(tmp_path, ha.url))
    assert says in run(reg, "home_call_service", must_run=False, **args)["error"]
    assert ha.service_calls() == []


def test_assist_passes_the_sentence_to_the_conversation_api(
    tmp_path: Path, ha: FakeHomeAssistant
) -> None:
    reg = registry(settings(tmp_path, ha.url, language="en"))
    answer = run(reg, "home_assist", text="Turn on the kettle")
    assert answer == {"response_type": "action_done", "speech": "Turned on Kettle"}
    assert ha.states["switch.kettle"]["state"] == "on"
    assert ("POST", "/api/conversation/process",
            {"text": "Turn on the kettle", "language": "en"}) in ha.calls
    puzzled = run(reg, "home_assist", text="sing a song")
    assert puzzled["response_type"] == "error"


def test_a_bad_token_is_reported_as_such(tmp_path: Path, ha: FakeHomeAssistant) -> None:
    reg = registry(settings(tmp_path, ha.url, token="expired"))
    for name, args in [("home_list_entities", {}),
                       ("home_call_service", {"domain": "light", "service": "turn_on",
                                              "entity_id": "light.bedroom"}),
                       ("home_assist", {"text": "turn on the kettle"})]:
        error = run(reg, name, **args)["error"]
        assert "401" in error and "token" in error, error
        assert "expired" not in error
    assert ha.states["light.bedroom"]["state"] == "on"


def test_an_unreadable_token_file_is_reported(tmp_path: Path, ha: FakeHomeAssistant) -> None:
    ha_settings = settings(tmp_path, ha.url)
    Path(str(ha_settings.token_file)).unlink()
    error = run(registry(ha_settings), "home_get_state", entity_id="light.bedroom")["error"]
    assert "token file cannot be read" in error
    assert ha.calls == []


def test_unreachable_home_assistant(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    reg = registry(settings(tmp_path, f"http://127.0.0.1:{port}"))
    error = run(reg, "home_list_entities")["error"]
    assert "unreachable" in error and str(port) in error


def test_a_home_assistant_that_never_answers_times_out(tmp_path: Path) -> None:
    with socket.socket() as listener:  # accepts, never replies
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        reg = registry(settings(tmp_path, f"http://127.0.0.1:{port}",
                                request_timeout_ms=300))
        error = run(reg, "home_get_state", entity_id="light.bedroom")["error"]
    assert "unreachable" in error and "timed out" in error


def test_the_documented_relay_yaml_loads(tmp_path: Path) -> None:
    from edgevoice.config.loader import load_text
    from edgevoice.config.relay import RelayConfig

    doc = (Path(__file__).parents[2] / "docs" / "home-assistant.md").read_text()
    snippet = doc.split("```yaml\n", 1)[1].split("```", 1)[0]
    config = load_text(snippet, RelayConfig, "relay.yaml")
    ha = config.upstream.nova.tools.homeassistant
    assert ha.enabled and ha.areas == ("kitchen",) and "climate.hall" in ha.entities


@pytest.mark.slow
@pytest.mark.timeout(1500)  # the first use installs Home Assistant (minutes; pip's own limit 900 s)
def test_every_tool_against_a_real_home_assistant(tmp_path: Path) -> None:
    """Home Assistant 2025.4.4 itself (installed into .venv-ha on first use)."""
    from edgevoice_dev.testing.real_homeassistant import (
        HomeAssistantUnavailable,
        python313,
        start_home_assistant,
    )

    if python313() is None:
        pytest.skip("Home Assistant needs Python >= 3.13")
    try:
        with start_home_assistant(tmp_path / "ha") as real:
            ha_settings = settings(tmp_path, real.url, token=real.token,
                                   entities=("light.bedroom",), areas=("kitchen",),
                                   request_timeout_ms=10_000)
            reg = registry(ha_settings)
            listed = run(reg, "home_list_entities", area="Kitchen")
            everything = run(reg, "home_list_entities")
            temp = run(reg, "home_get_state", entity_id="sensor.kitchen_temperature")
            on = run(reg, "home_call_service", domain="light", service="turn_on",
                     entity_id="light.kitchen_light")
            light = run(reg, "home_get_state", entity_id="light.kitchen_light")
            hidden = run(reg, "home_get_state", entity_id="input_boolean.kettle_state")
            missing = run(reg, "home_get_state", entity_id="light.bedroom")
            assist = run(reg, "home_assist", text="turn on the kettle")
            kettle = run(reg, "home_get_state", entity_id="switch.kettle")
            bad = run(registry(settings(tmp_path / "bad", real.url, token="not-a-token",
                                        areas=("kitchen",))), "home_list_entities")
    except HomeAssistantUnavailable as exc:
        pytest.fail(str(exc))
    kitchen = {"light.kitchen_light", "switch.kettle", "sensor.kitchen_temperature"}
    assert {e["entity_id"] for e in listed["entities"]} == kitchen
    assert {e["entity_id"] for e in everything["entities"]} == kitchen  # no input_boolean
    assert temp["state"] == "21.5" and temp["unit_of_measurement"] == "°C"
    assert on["changed"][0]["state"] == "on" and light["state"] == "on"
    assert "not exposed" in hidden["error"]
    assert missing == {"error": "Home Assistant has no entity 'light.bedroom'"}
    assert assist["response_type"] == "action_done" and kettle["state"] == "on"
    assert "401" in bad["error"]
