"""Settings of the device's feedback to the user: earcons and the status LED."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgevoice.config.base import require

#: Earcon names a WAV file can replace (values of ``feedback.earcons.Earcon``).
EARCON_NAMES = ("listen_start", "listen_end", "error", "offline", "follow_up", "thinking")


@dataclass(frozen=True)
class FeedbackSettings:
    """Short sounds and an optional LED that tell the user what the device is doing."""

    earcons_enabled: bool = True
    """Play short tones when listening starts and ends, on errors and when offline."""

    earcon_volume: float = 0.5
    """Peak amplitude of the earcons, 0..1 of full scale (0.5 is about -6 dBFS)."""

    earcon_files: dict[str, str] = field(default_factory=dict)
    """Your own sounds: earcon name (listen_start, listen_end, error, offline,
    follow_up, thinking) -> path of a WAV file (any rate, 16/24/32-bit or float,
    mono or stereo). It is scaled to earcon_volume at its peak."""

    thinking_sound: bool = False
    """Play a soft repeating sound while waiting for the reply."""

    output_volume: float = 1.0
    """Loudness of everything played (replies and earcons), 0..1 (a gain: 0.5 is
    -6 dB). Can be changed at run time through the local API (POST /volume)."""

    led_enabled: bool = False
    """Drive a status LED from a GPIO pin (needs the ``pi`` extra: gpiozero)."""

    led_pin: int = 27
    """BCM (GPIO) number of the LED pin, not the header position. GPIO27 is
    physical pin 13."""

    led_pwm: bool = True
    """Dim the LED smoothly (software PWM) so it can pulse while the assistant speaks;
    false switches it only on and off (pulsing becomes a slow blink)."""

    def __post_init__(self) -> None:
        require(0.0 <= self.earcon_volume <= 1.0, "earcon_volume", "must be in [0, 1]")
        require(0.0 <= self.output_volume <= 1.0, "output_volume", "must be in [0, 1]")
        for name, path in self.earcon_files.items():
            key = f"earcon_files.{name}"
            require(name in EARCON_NAMES, key,
                    f"is not an earcon (earcons: {', '.join(EARCON_NAMES)})")
            require(path.lower().endswith(".wav"), key, "must be the path of a .wav file")
            require(Path(path).is_file(), key, f"{path} does not exist")
        require(0 <= self.led_pin <= 27, "led_pin", "must be a BCM GPIO number in [0, 27]")
