"""A small fake Home Assistant written from its REST API documentation.

Serves, on 127.0.0.1, what the edgevoice Home Assistant tools use, with the
documented shapes and status codes (developers.home-assistant.io, "REST API" and
"Conversation API"):

* ``GET /api/states`` → list of state objects; ``GET /api/states/<id>`` → one, 404
  if unknown;
* ``POST /api/services/<domain>/<service>`` with ``entity_id`` → the changed states
  (turn_on/turn_off/toggle, open/close/set_cover_position, set_temperature,
  scene/script turn_on); 400 for an unknown service;
* ``POST /api/template`` → the rendering, as text; only ``area_entities('<area>')``
  followed by ``| tojson`` is understood;
* ``POST /api/conversation/process`` → a conversation response with
  ``response.speech.plain.speech``; it understands "turn on/off <friendly name>";
* 401 with the body ``401: Unauthorized`` for a missing or wrong bearer token.

Every request is recorded in :attr:`FakeHomeAssistant.calls`.
"""

from __future__ import annotations

import copy
import datetime
import http.server
import json
import re
import threading
from typing import Any

_TEMPLATE = re.compile(r"^\{\{\s*area_entities\('([^']*)'\)\s*\|\s*tojson\s*\}\}$")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat()


def state(entity_id: str, value: str, area: str, **attributes: Any) -> dict[str, Any]:
    """A state object as HA returns it (area kept apart, as HA's registry does)."""
    return {
        "entity_id": entity_id, "state": value, "attributes": attributes,
        "last_changed": _now(), "last_updated": _now(), "_area": area,
    }


def demo_states() -> list[dict[str, Any]]:
    return [
        state("light.kitchen", "off", "kitchen", friendly_name="Kitchen light"),
        state("light.bedroom", "on", "bedroom", friendly_name="Bedroom light", brightness=200),
        state("switch.kettle", "off", "kitchen", friendly_name="Kettle"),
        state("cover.living_room", "closed", "living_room", friendly_name="Living room blind",
              current_position=0),
        state("climate.hall", "heat", "hall", friendly_name="Hall thermostat",
              temperature=19.0, current_temperature=18.5, hvac_modes=["off", "heat"]),
        state("sensor.kitchen_temperature", "21.5", "kitchen",
              friendly_name="Kitchen temperature", unit_of_measurement="°C"),
        state("scene.movie_night", "unknown", "living_room", friendly_name="Movie night"),
        state("script.good_night", "off", "", friendly_name="Good night"),
        state("lock.front_door", "locked", "hall", friendly_name="Front door"),
    ]


class FakeHomeAssistant:
    """Run with ``with FakeHomeAssistant(token) as ha: ha.url ...``."""

    def __init__(self, token: str, states: list[dict[str, Any]] | None = None) -> None:
        self.token = token
        self.states = {s["entity_id"]: s for s in (states or demo_states())}
        self.calls: list[tuple[str, str, Any]] = []
        self._lock = threading.Lock()
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _reply(self, status: int, body: Any) -> None:
                raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(status)
                ctype = "text/plain" if isinstance(body, str) else "application/json"
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def _handle(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                with fake._lock:
                    fake.calls.append((method, self.path, body))
                    if self.headers.get("Authorization") != f"Bearer {fake.token}":
                        self._reply(401, "401: Unauthorized")
                        return
                    status, answer = fake.route(method, self.path, body)
                self._reply(status, answer)

            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeHomeAssistant:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def service_calls(self) -> list[tuple[str, Any]]:
        return [(p, b) for m, p, b in self.calls if p.startswith("/api/services/")]

    @staticmethod
    def _public(s: dict[str, Any]) -> dict[str, Any]:
        return {k: copy.deepcopy(v) for k, v in s.items() if not k.startswith("_")}

    def route(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        if method == "GET" and path == "/api/":
            return 200, {"message": "API running."}
        if method == "GET" and path == "/api/states":
            return 200, [self._public(s) for s in self.states.values()]
        if method == "GET" and path.startswith("/api/states/"):
            found = self.states.get(path.removeprefix("/api/states/"))
            return (200, self._public(found)) if found else (404, {"message": "Entity not found."})
        if method == "POST" and path == "/api/template":
            match = _TEMPLATE.match(str((body or {}).get("template", "")).strip())
            if not match:
                return 400, {"message": "Error rendering template"}
            area = match.group(1).casefold().replace(" ", "_")
            return 200, json.dumps([e for e, s in self.states.items() if s["_area"] == area])
        if method == "POST" and path.startswith("/api/services/"):
            domain, _, service = path.removeprefix("/api/services/").partition("/")
            return self._service(domain, service, body or {})
        if method == "POST" and path == "/api/conversation/process":
            return 200, self._converse(str((body or {}).get("text", "")))
        return 404, {"message": "Not found"}

    def _service(self, domain: str, service: str, data: dict[str, Any]) -> tuple[int, Any]:
        target = self.states.get(str(data.get("entity_id", "")))
        effects = {
            "turn_on": "on", "turn_off": "off", "open_cover": "open", "close_cover": "closed",
        }
        if service not in (*effects, "toggle", "set_temperature", "set_cover_position",
                           "set_hvac_mode", "stop_cover"):
            return 400, {"message": f"Service {domain}.{service} not found."}
        if target is None or not target["entity_id"].startswith(domain + "."):
            return 200, []  # HA runs a service on no entity without complaint
        if service in effects and domain not in ("scene", "script"):
            target["state"] = effects[service]
        elif service == "toggle":
            target["state"] = "off" if target["state"] == "on" else "on"
        elif service == "set_temperature":
            target["attributes"]["temperature"] = data.get("temperature")
        elif service == "set_hvac_mode":
            target["state"] = data.get("hvac_mode")
        elif service == "set_cover_position":
            target["attributes"]["current_position"] = data.get("position")
            target["state"] = "open" if data.get("position") else "closed"
        if "brightness_pct" in data:
            target["attributes"]["brightness"] = round(int(data["brightness_pct"]) * 255 / 100)
        target["last_changed"] = target["last_updated"] = _now()
        return 200, [self._public(target)]

    def _converse(self, text: str) -> dict[str, Any]:
        match = re.match(r"turn (on|off) (?:the )?(.+)", text.strip().lower())
        found = None
        if match:
            for s in self.states.values():
                if str(s["attributes"].get("friendly_name", "")).lower() == match.group(2):
                    found = s
        if match is None or found is None:
            response = {
                "response_type": "error", "language": "en",
                "data": {"code": "no_intent_match"},
                "speech": {"plain": {"speech": "Sorry, I couldn't understand that"}},
            }
        else:
            found["state"] = match.group(1)
            name = found["attributes"]["friendly_name"]
            response = {
                "response_type": "action_done", "language": "en",
                "data": {"targets": [], "success": [
                    {"type": "entity", "name": name, "id": found["entity_id"]}], "failed": []},
                "speech": {"plain": {"speech": f"Turned {match.group(1)} {name}"}},
            }
        return {"response": response, "conversation_id": None}
