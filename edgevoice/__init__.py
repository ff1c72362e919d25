"""edgevoice: a headless voice terminal for Raspberry Pi-class boards, and its relay."""

__version__ = "0.1.0"
