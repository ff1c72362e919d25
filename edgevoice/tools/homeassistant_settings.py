"""Settings of the Home Assistant tools (kept apart so the tool registry's settings can
hold them without importing the tools)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from edgevoice.config.base import require

#: An entity id as Home Assistant writes it: ``domain.object_id``.
ENTITY_ID = re.compile(r"^[a-z0-9_]+\.[a-z0-9_]+$")
#: An area name or id: no quotes or braces (it goes into a template literal).
AREA_NAME = re.compile(r"^\w[\w .-]{0,63}$")


@dataclass(frozen=True)
class HomeAssistantSettings:
    """Home Assistant tools for the model (docs/home-assistant.md)."""

    enabled: bool = False
    """Offer the Home Assistant tools (home_list_entities, home_get_state,
    home_call_service, home_assist)."""
    url: str = "http://homeassistant.local:8123"
    """Base URL of Home Assistant (http:// or https://; TLS is always verified)."""
    token_file: str | None = None
    """File holding a long-lived access token (Home Assistant: profile → Security)."""
    ca_file: str | None = None
    """PEM CA bundle to verify an https:// Home Assistant with a private CA."""
    entities: tuple[str, ...] = ()
    """Entity ids the model may read and drive, e.g. light.kitchen."""
    areas: tuple[str, ...] = ()
    """Areas (name or id) whose entities the model may read and drive."""
    conversation: bool = True
    """Offer home_assist: pass a sentence to Home Assistant's conversation agent (it acts
    on what Home Assistant's own Assist exposure allows, not on this allow-list)."""
    language: str = "en"
    """Language of the sentences passed to the conversation agent."""
    request_timeout_ms: int = 5_000
    """Give up on one request to Home Assistant after this long."""

    def __post_init__(self) -> None:
        require(self.url.startswith(("http://", "https://")), "url",
                "must start with http:// or https://")
        for i, entity in enumerate(self.entities):
            require(bool(ENTITY_ID.match(entity)), f"entities[{i}]",
                    f"{entity!r} is not an entity id like light.kitchen")
        for i, area in enumerate(self.areas):
            require(bool(AREA_NAME.match(area)), f"areas[{i}]",
                    f"{area!r} is not an area name or id (letters, digits, space, . or -; "
                    "for a name with quotes use the area's id)")
        require(100 <= self.request_timeout_ms <= 60_000, "request_timeout_ms",
                "must be 100..60000")
        if self.enabled:
            require(self.token_file is not None, "token_file",
                    "is needed when enabled (a long-lived access token)")
            require(bool(self.entities or self.areas), "entities",
                    "list at least one entity or area to expose when enabled")
