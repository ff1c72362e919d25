"""Output volume over the local API: GET and POST /volume on a real daemon's endpoint."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from edgevoice.audio.wavio import WavSink, WavSource, write_wav
from edgevoice.config.model import DeviceConfig
from edgevoice.device.daemon import DeviceDaemon
from edgevoice.device.health_source import DaemonHealth
from edgevoice.health.device import device_health_api
from edgevoice.health.http import HealthSettings


def call(port: int, method: str, body: bytes | None, token: str) -> tuple[int, object]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/volume", method=method,
                                     data=body)
    request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_volume_is_read_and_set_over_the_local_api(tmp_path: Path) -> None:
    mic = tmp_path / "mic.wav"
    write_wav(mic, np.zeros(1600, dtype="<i2").tobytes(), 16000)
    config = replace(DeviceConfig(), feedback=replace(DeviceConfig().feedback,
                                                      output_volume=0.8))
    daemon = DeviceDaemon(config, "kitchen.x", WavSource(mic),
                          WavSink(tmp_path / "out.wav", realtime=False))
    assert daemon.volume == 0.8 and daemon.downlink.playback.gain == 0.8

    async def scenario() -> list[tuple[int, object]]:
        settings = HealthSettings(port=0)
        api = device_health_api(DaemonHealth(daemon, settings), settings, "s3cret")
        await api.start()
        try:
            steps = [("GET", None), ("POST", b'{"volume": 0.25}'), ("GET", None),
                     ("POST", b'{"volume": 1.5}'), ("POST", b'{"volume": true}'),
                     ("POST", b"not json"), ("POST", b'{"level": 0.5}')]
            return [await asyncio.to_thread(call, api.port, m, b, "s3cret") for m, b in steps]
        finally:
            await api.stop()

    answers = asyncio.run(scenario())
    assert answers[:3] == [(200, {"volume": 0.8}), (200, {"volume": 0.25}),
                           (200, {"volume": 0.25})]
    assert [status for status, _ in answers[3:]] == [400, 400, 400, 400]
    assert daemon.downlink.playback.gain == 0.25  # the bad requests changed nothing


def test_set_volume_refuses_out_of_range(tmp_path: Path) -> None:
    mic = tmp_path / "mic.wav"
    write_wav(mic, np.zeros(1600, dtype="<i2").tobytes(), 16000)
    daemon = DeviceDaemon(DeviceConfig(), "kitchen.x", WavSource(mic),
                          WavSink(tmp_path / "out.wav", realtime=False))
    for bad in (-0.1, 1.01):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            daemon.set_volume(bad)
    assert daemon.volume == 1.0
