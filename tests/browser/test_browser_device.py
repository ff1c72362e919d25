"""The browser page as an edgevoice device, in real headless Chromium.

The page is served by the relay, connects with a ticket, captures the fake
microphone (a speech WAV), encodes Opus with WebCodecs, and plays the echo
upstream's reply through its jitter-buffer worklet; the test taps what the page's
output graph played.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from browser_support import (
    DOCS,
    best_envelope_correlation,
    browser_relay,
    chromium,
    connect,
    decode_tap,
    needs_chromium,
    open_page,
    read_wav,
    speech_fixture,
    wait_for_js,
)

from edgevoice.demo import bundled_speech

pytestmark = [needs_chromium, pytest.mark.browser]


def test_a_hands_free_turn_plays_back_the_speech(tmp_path: Path) -> None:
    async def scenario() -> None:
        speech = speech_fixture(tmp_path)
        async with browser_relay(tmp_path) as relay, chromium(tmp_path, speech) as browser:
            ticket = await relay.mint("laptop")
            errors: list[str] = []
            page = await open_page(browser, f"{relay.url}#ticket={ticket}", errors)
            assert await page.evaluate("location.hash") == ""  # the ticket left the URL
            await connect(page)
            await page.evaluate("edgevoice.startTap()")
            await page.check("#handsfree")
            await wait_for_js(
                page, "edgevoice.stats.replies >= 1 && !edgevoice.reply.active"
                " && !edgevoice.playing", 40)
            tap = await page.evaluate("edgevoice.stopTap()")
            await page.uncheck("#handsfree")
            played, rate = decode_tap(tap)
            ref, ref_rate = read_wav(bundled_speech())
            correlation = best_envelope_correlation(ref, ref_rate, played, rate)
            print(f"envelope correlation {correlation:.3f}")
            assert correlation >= 0.8

            # the same relay behaviour as for a daemon: fleet view and metrics
            status, devices = await asyncio.to_thread(relay.admin, "GET", "/devices")
            assert status == 200
            (laptop,) = [d for d in devices if d["device_id"] == "laptop"]
            assert laptop["connected"] and laptop["connections"] == 1
            status, metrics = await asyncio.to_thread(relay.admin, "GET", "/metrics")
            assert "edgevoice_relay_devices_connected 1.0" in metrics
            assert relay.server.counters.frames_in > 50 and relay.server.counters.frames_out > 50
            rtt = await page.text_content("#rtt")
            assert rtt is not None and rtt.startswith("RTT ") and "ms" in rtt
            transcripts = await page.text_content("#transcripts")
            assert transcripts is not None and "ms of audio" in transcripts
            shot = tmp_path / "browser-page.png"
            await page.screenshot(path=str(shot))
            if os.environ.get("EDGEVOICE_UPDATE_DOCS"):
                (DOCS / "browser-page.png").write_bytes(shot.read_bytes())
            assert not errors, errors

    asyncio.run(asyncio.wait_for(scenario(), 120))
