"""Settings of the device's feedback to the user: earcons and the status LED."""

from __future__ import annotations

from dataclasses import dataclass

from edgevoice.config.base import require


@dataclass(frozen=True)
class FeedbackSettings:
    """Short sounds and an optional LED that tell the user what the device is doing."""

    earcons_enabled: bool = True
    """Play short tones when listening starts and ends, on errors and when offline."""

    earcon_volume: float = 0.5
    """Peak amplitude of the earcons, 0..1 of full scale (0.5 is about -6 dBFS)."""

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
        require(0 <= self.led_pin <= 27, "led_pin", "must be a BCM GPIO number in [0, 27]")
