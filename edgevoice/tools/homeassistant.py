"""Home Assistant tools: the model reads and drives the entities an operator exposes.

Four tools talk to Home Assistant's REST API with a long-lived access token read
from a file (never logged, re-read on each call so a rotated token takes effect):

* ``home_list_entities`` — the exposed entities with their state (``GET /api/states``),
  optionally of one area or domain;
* ``home_get_state`` — one exposed entity's state and useful attributes
  (``GET /api/states/<entity_id>``);
* ``home_call_service`` — a light, switch, cover, climate, scene or script service
  on one exposed entity (``POST /api/services/<domain>/<service>``);
* ``home_assist`` — a sentence handed to Home Assistant's own conversation agent
  (``POST /api/conversation/process``), the fallback for what the others cannot say.

What is exposed is an allow-list by entity id and by area (an area's entities are
asked of Home Assistant through ``POST /api/template`` with ``area_entities()``).
Anything else is refused before a request is made, and every failure — Home
Assistant unreachable, a refused token (401), an unknown entity — comes back as an
``{"error": ...}`` result the model can say in plain words.

The decisions (what is allowed, which service and data) are pure functions below;
the only I/O is :class:`UrllibHomeAssistant`, behind the :class:`HomeAssistantApi`
seam. It uses the standard library (``urllib`` in a worker thread): a voice turn
makes one or two requests, so an async HTTP client would be a new dependency for
nothing (aiohttp is in the tree only with the ``nova`` extra).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any, Protocol

from edgevoice.errors import ToolError
from edgevoice.tools.homeassistant_settings import AREA_NAME, ENTITY_ID, HomeAssistantSettings
from edgevoice.tools.registry import Tool, ToolSettings
from edgevoice.upstream.base import DeviceContext

logger = logging.getLogger(__name__)

_ENTITY_ID = ENTITY_ID
_AREA = AREA_NAME

#: What the model may do per domain, and the service data keys each service takes.
SERVICES: Mapping[str, Mapping[str, frozenset[str]]] = {
    "light": {
        "turn_on": frozenset({"brightness_pct", "color_name", "color_temp_kelvin", "transition"}),
        "turn_off": frozenset({"transition"}),
        "toggle": frozenset(),
    },
    "switch": {"turn_on": frozenset(), "turn_off": frozenset(), "toggle": frozenset()},
    "cover": {
        "open_cover": frozenset(),
        "close_cover": frozenset(),
        "stop_cover": frozenset(),
        "set_cover_position": frozenset({"position"}),
    },
    "climate": {
        "set_temperature": frozenset({"temperature", "hvac_mode"}),
        "set_hvac_mode": frozenset({"hvac_mode"}),
        "turn_on": frozenset(),
        "turn_off": frozenset(),
    },
    "scene": {"turn_on": frozenset({"transition"})},
    "script": {"turn_on": frozenset()},
}

#: Attributes worth telling the model (the rest is noise for a voice answer).
_USEFUL_ATTRIBUTES = (
    "friendly_name", "unit_of_measurement", "device_class", "brightness", "color_mode",
    "current_position", "current_temperature", "temperature", "hvac_action", "hvac_modes",
)


class HomeAssistantError(ToolError):
    """Home Assistant could not do what a tool asked; ``str()`` is for the model."""


class HomeAssistantApi(Protocol):
    """The two calls the tools need of Home Assistant's REST API."""

    async def get(self, path: str) -> Any:
        """``GET /api/...``; the decoded JSON, or :class:`HomeAssistantError`."""
        ...

    async def post(self, path: str, body: Mapping[str, Any]) -> Any:
        """``POST /api/...`` with a JSON body; the decoded JSON or text."""
        ...


class UrllibHomeAssistant:
    """:class:`HomeAssistantApi` over ``urllib`` in a worker thread."""

    def __init__(self, settings: HomeAssistantSettings) -> None:
        self._settings = settings
        self._base = settings.url.rstrip("/")
        self._timeout_s = settings.request_timeout_ms / 1000
        self._ssl = ssl.create_default_context(cafile=settings.ca_file)

    def _token(self) -> str:
        path = self._settings.token_file
        try:
            with open(path or "", encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as exc:
            raise HomeAssistantError(
                f"the Home Assistant token file cannot be read ({exc.strerror}): "
                "the relay's operator must fix homeassistant.token_file"
            ) from None
        if not token:
            raise HomeAssistantError("the Home Assistant token file is empty")
        return token

    def _request(self, method: str, path: str, body: Mapping[str, Any] | None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self._base + path, data=data, method=method,
            headers={"Authorization": f"Bearer {self._token()}",
                     "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(
                request, timeout=self._timeout_s,
                context=self._ssl if self._base.startswith("https:") else None,
            ) as response:
                raw = response.read(1 << 20)
        except urllib.error.HTTPError as exc:
            raise _http_error(exc.code, path) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise HomeAssistantError(
                f"Home Assistant at {self._base} is unreachable ({reason}); "
                "it may be restarting, try again in a minute"
            ) from None
        text = raw.decode("utf-8", "replace")
        try:
            return json.loads(text)
        except ValueError:
            return text

    async def get(self, path: str) -> Any:
        return await asyncio.to_thread(self._request, "GET", path, None)

    async def post(self, path: str, body: Mapping[str, Any]) -> Any:
        return await asyncio.to_thread(self._request, "POST", path, body)


def _http_error(status: int, path: str) -> HomeAssistantError:
    if status == 401:
        return HomeAssistantError(
            "Home Assistant refused the access token (401 Unauthorized): the relay's "
            "operator must put a valid long-lived token in homeassistant.token_file"
        )
    if status == 403:
        return HomeAssistantError("Home Assistant forbids this to the token's user (403)")
    if status == 404:
        return HomeAssistantError(f"Home Assistant does not know {path!r} (404)")
    if status == 400:
        return HomeAssistantError("Home Assistant refused the request as invalid (400)")
    return HomeAssistantError(f"Home Assistant answered {status} to {path!r}")


# --- decisions (pure) -----------------------------------------------------------


def area_template(area: str) -> str:
    """The template whose rendering lists ``area``'s entity ids as JSON."""
    # _AREA forbids quotes and braces, so the name cannot break out of the literal.
    return "{{ area_entities('" + area + "') | tojson }}"


def parse_entity_list(rendered: object) -> list[str]:
    """Entity ids from a rendered ``area_entities`` template (JSON list or text)."""
    value = rendered
    if isinstance(rendered, str):
        try:
            value = json.loads(rendered)
        except ValueError:
            return []
    if not isinstance(value, list):
        return []
    return [v for v in value if isinstance(v, str) and _ENTITY_ID.match(v)]


def summarize(state: Mapping[str, Any]) -> dict[str, Any]:
    """What a voice answer needs of one HA state object."""
    attributes = state.get("attributes") or {}
    out: dict[str, Any] = {"entity_id": state.get("entity_id"), "state": state.get("state")}
    if isinstance(attributes, Mapping):
        for key in _USEFUL_ATTRIBUTES:
            if key in attributes:
                out[key if key != "friendly_name" else "name"] = attributes[key]
    return out


def check_service_call(
    domain: str, service: str, entity_id: str, data: Mapping[str, Any], allowed: frozenset[str]
) -> str | None:
    """Why this call is refused, or None. ``allowed`` is the resolved allow-list."""
    services = SERVICES.get(domain)
    if services is None:
        return f"the domain {domain!r} cannot be driven; use one of {sorted(SERVICES)}"
    keys = services.get(service)
    if keys is None:
        return f"{domain} has no service {service!r}; use one of {sorted(services)}"
    if entity_id not in allowed:
        return f"the entity {entity_id!r} is not exposed to this assistant"
    if entity_id.partition(".")[0] != domain:
        return f"{entity_id} is not a {domain}; call a {entity_id.partition('.')[0]} service"
    extra = sorted(set(data) - keys)
    if extra:
        return f"{domain}.{service} does not take {', '.join(extra)}"
    return None


# --- the tools ------------------------------------------------------------------


class HomeAssistantTools:
    """The four tools over one :class:`HomeAssistantApi` and the allow-list."""

    def __init__(self, settings: HomeAssistantSettings, api: HomeAssistantApi) -> None:
        self.settings = settings
        self.api = api

    async def _area_entities(self, area: str) -> list[str]:
        rendered = await self.api.post("/api/template", {"template": area_template(area)})
        return parse_entity_list(rendered)

    async def allowed(self, area: str | None = None) -> frozenset[str]:
        """The exposed entity ids (of ``area`` only, when given)."""
        if area is not None:
            if not any(area.casefold() == a.casefold() for a in self.settings.areas):
                return frozenset(
                    e for e in await self._area_entities(area) if e in self.settings.entities
                )
            return frozenset(await self._area_entities(area))
        ids = set(self.settings.entities)
        for name in self.settings.areas:
            ids.update(await self._area_entities(name))
        return frozenset(ids)

    async def list_entities(self, args: dict[str, Any], ctx: DeviceContext) -> dict[str, Any]:
        area = args.get("area") or None
        domain = args.get("domain") or None
        try:
            if area is not None and not _AREA.match(area):
                return {"error": f"{area!r} is not an area name"}
            allowed = await self.allowed(area)
            states = await self.api.get("/api/states")
        except HomeAssistantError as exc:
            return {"error": str(exc)}
        if not isinstance(states, list):
            return {"error": "Home Assistant sent an unexpected answer to /api/states"}
        found = [
            summarize(s) for s in states
            if isinstance(s, Mapping) and s.get("entity_id") in allowed
            and (domain is None or str(s.get("entity_id", "")).startswith(domain + "."))
        ]
        found.sort(key=lambda s: str(s["entity_id"]))
        return {"entities": found, "count": len(found)}

    async def get_state(self, args: dict[str, Any], ctx: DeviceContext) -> dict[str, Any]:
        entity_id = str(args["entity_id"]).strip().lower()
        if not _ENTITY_ID.match(entity_id):
            return {"error": f"{entity_id!r} is not an entity id like light.kitchen"}
        try:
            if entity_id not in await self.allowed():
                return {"error": f"the entity {entity_id!r} is not exposed to this assistant"}
            state = await self.api.get("/api/states/" + urllib.parse.quote(entity_id))
        except HomeAssistantError as exc:
            if "(404)" in str(exc):
                return {"error": f"Home Assistant has no entity {entity_id!r}"}
            return {"error": str(exc)}
        if not isinstance(state, Mapping):
            return {"error": f"Home Assistant sent an unexpected answer for {entity_id}"}
        return summarize(state)

    async def call_service(self, args: dict[str, Any], ctx: DeviceContext) -> dict[str, Any]:
        domain, service = str(args["domain"]), str(args["service"])
        entity_id = str(args["entity_id"]).strip().lower()
        data = args.get("data") or {}
        if not isinstance(data, Mapping):
            return {"error": "data must be an object"}
        try:
            allowed = await self.allowed()
            problem = check_service_call(domain, service, entity_id, data, allowed)
            if problem is not None:
                return {"error": problem}
            body = {**data, "entity_id": entity_id}
            changed = await self.api.post(f"/api/services/{domain}/{service}", body)
        except HomeAssistantError as exc:
            return {"error": str(exc)}
        logger.info("home assistant: %s.%s on %s for %s", domain, service, entity_id,
                    ctx.device_id)
        states = [
            summarize(s) for s in (changed if isinstance(changed, list) else [])
            if isinstance(s, Mapping) and s.get("entity_id") in allowed
        ]
        return {"done": f"{domain}.{service}", "entity_id": entity_id, "changed": states}

    async def assist(self, args: dict[str, Any], ctx: DeviceContext) -> dict[str, Any]:
        text = str(args["text"]).strip()
        if not text:
            return {"error": "say what Home Assistant should do"}
        try:
            answer = await self.api.post(
                "/api/conversation/process",
                {"text": text[:500], "language": self.settings.language},
            )
        except HomeAssistantError as exc:
            return {"error": str(exc)}
        response = answer.get("response") if isinstance(answer, Mapping) else None
        if not isinstance(response, Mapping):
            return {"error": "Home Assistant's conversation agent sent no response"}
        speech = response.get("speech", {}).get("plain", {}).get("speech", "")
        return {"response_type": response.get("response_type"), "speech": speech}

    def tools(self) -> list[Tool]:
        domains = sorted(SERVICES)
        out = [
            Tool(
                name="home_list_entities",
                description=(
                    "List the smart-home devices (lights, switches, covers, thermostats, "
                    "sensors, scenes, scripts) this assistant may use, with their current "
                    "state; optionally only those of one area (room) or domain."
                ),
                input_schema={"type": "object", "properties": {
                    "area": {"type": "string", "description": "a room, e.g. kitchen"},
                    "domain": {"type": "string", "description": "e.g. light or sensor"},
                }, "required": []},
                handler=self.list_entities,
            ),
            Tool(
                name="home_get_state",
                description=(
                    "Read the state of one smart-home entity (is the light on, the "
                    "temperature, the cover's position). Use an entity_id from "
                    "home_list_entities."
                ),
                input_schema={"type": "object", "properties": {
                    "entity_id": {"type": "string", "description": "e.g. sensor.kitchen_temp"},
                }, "required": ["entity_id"]},
                handler=self.get_state,
            ),
            Tool(
                name="home_call_service",
                description=(
                    "Control one smart-home entity: lights and switches (turn_on, turn_off, "
                    "toggle; lights take brightness_pct and color_name), covers (open_cover, "
                    "close_cover, stop_cover, set_cover_position with position 0-100), "
                    "climate (set_temperature with temperature, set_hvac_mode), scenes and "
                    "scripts (turn_on). The domain is the part of entity_id before the dot."
                ),
                input_schema={"type": "object", "properties": {
                    "domain": {"type": "string", "enum": domains},
                    "service": {"type": "string"},
                    "entity_id": {"type": "string"},
                    "data": {"type": "object", "description": "extra service data"},
                }, "required": ["domain", "service", "entity_id"]},
                handler=self.call_service,
            ),
        ]
        if self.settings.conversation:
            out.append(Tool(
                name="home_assist",
                description=(
                    "Pass the user's smart-home request, as a sentence, to Home Assistant's "
                    "own assistant when the other home tools cannot do it (e.g. 'turn off "
                    "all the lights downstairs'). Returns what Home Assistant answered."
                ),
                input_schema={"type": "object", "properties": {
                    "text": {"type": "string", "description": "the request as a sentence"},
                }, "required": ["text"]},
                handler=self.assist,
            ))
        return out


def homeassistant_tools(settings: ToolSettings) -> list[Tool]:
    """Entry point of the ``edgevoice.tools`` group: the tools, when enabled."""
    ha = settings.homeassistant
    if not ha.enabled:
        return []
    return HomeAssistantTools(ha, UrllibHomeAssistant(ha)).tools()


