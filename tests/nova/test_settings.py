"""The nova: settings: voices per model, per-device conversations, v1 warnings."""

from __future__ import annotations

import pytest

from edgevoice.config.loader import load_text
from edgevoice.config.relay import RelayConfig
from edgevoice.errors import ConfigError
from edgevoice.nova.settings import VOICES, NovaSettings, voices_for

DEVICES_YAML = """
upstream:
  kind: nova
  nova:
    voice_id: matthew
    devices:
      kitchen: {system_prompt: "You are the kitchen helper.", voice_id: tiffany,
                tools: [current_time]}
      office: {voice_id: kiara}
"""


def test_per_device_conversations_load_and_apply() -> None:
    nova = load_text(DEVICES_YAML, RelayConfig, "relay.yaml").upstream.nova
    kitchen = nova.for_device("kitchen")
    assert (kitchen.system_prompt, kitchen.voice_id) == ("You are the kitchen helper.", "tiffany")
    assert nova.tools_for("kitchen") == ("current_time",)
    office = nova.for_device("office")
    assert (office.system_prompt, office.voice_id) == (nova.system_prompt, "kiara")
    assert nova.tools_for("office") is None
    assert nova.for_device("garage") is nova  # everyone else: the defaults


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("upstream: {nova: {voice_id: greta}}", "upstream.nova.voice_id"),  # v1 only
        ("upstream: {nova: {voice_id: nobody}}", "upstream.nova.voice_id"),
        (
            "upstream: {nova: {devices: {kitchen: {voice_id: Matthew}}}}",
            "upstream.nova.devices.kitchen.voice_id",
        ),
        (
            "upstream: {nova: {devices: {kitchen: {voise_id: amy}}}}",
            "upstream.nova.devices.kitchen.voise_id",
        ),
    ],
)
def test_an_unknown_voice_is_refused_at_config_time(yaml_text: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_text(yaml_text, RelayConfig, "relay.yaml")
    assert caught.value.key == key
    assert str(caught.value).startswith(f"relay.yaml: {key}: ")


def test_voices_depend_on_the_model() -> None:
    assert "greta" in voices_for("amazon.nova-sonic-v1:0")
    assert "greta" not in voices_for("amazon.nova-2-sonic-v1:0")
    assert "tina" in voices_for(
        "arn:aws:bedrock:us-east-1::foundation-model/amazon.nova-2-sonic-v1:0"
    )
    assert len(VOICES["amazon.nova-2-sonic-v1:0"]) == 16
    NovaSettings(model_id="amazon.nova-sonic-v1:0", voice_id="greta")  # fine on v1


def test_nova_sonic_v1_is_accepted_with_a_warning() -> None:
    assert NovaSettings().warnings() == []
    (warning,) = NovaSettings(model_id="amazon.nova-sonic-v1:0").warnings()
    assert "end of life" in warning and "amazon.nova-2-sonic-v1:0" in warning


def test_the_first_output_deadline_follows_the_endpointing_setting() -> None:
    assert (
        NovaSettings(endpointing_sensitivity="HIGH", reply_margin_s=1.0).first_output_timeout_s
        == 2.5
    )
    assert (
        NovaSettings(endpointing_sensitivity=None, reply_margin_s=3.0).first_output_timeout_s == 5.0
    )
