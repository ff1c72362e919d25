"""edgevoice's microWakeWord runner against pymicro-wakeword's own wrapper: the same
probabilities, bit for bit, on speech synthesised while the tests run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import speech_synth as synth

from edgevoice.triggers.base import TriggerUnavailableError
from edgevoice.triggers.microwake import (
    MicroFeatures,
    MicroWakeWordModel,
    library_path,
    wheel_dir,
)
from edgevoice.triggers.wake import BUILTIN_MODELS, WakeSettings, WakeWordTrigger

mww = pytest.importorskip("pymicro_wakeword")
features_module = pytest.importorskip("pymicro_features")

needs_flite = pytest.mark.skipif(not synth.flite_available(), reason="flite is not installed")

PHRASES = {"hey_jarvis": "hey jarvis", "okay_nabu": "okay nabu", "alexa": "alexa",
           "hey_mycroft": "hey mycroft"}


def _ours(model: str) -> MicroWakeWordModel:
    wheel = wheel_dir()
    assert wheel is not None
    library = library_path(wheel)
    assert library is not None
    return MicroWakeWordModel.from_config(wheel / "models" / f"{model}.json", library)


def _both_runs(model: str, pcm: bytes, reset_at: int) -> tuple[list[float], list[float]]:
    """Every probability (and raw output) each runner gives for ``pcm`` fed in 20 ms
    frames, both reset at frame ``reset_at``."""
    theirs = mww.MicroWakeWord.from_builtin(mww.Model(model))
    their_features = mww.MicroWakeWordFeatures()
    ours = _ours(model)
    our_features = MicroFeatures(features_module.MicroFrontend)
    a: list[float] = []
    b: list[float] = []
    for i, frame in enumerate(pcm[k:k + 640] for k in range(0, len(pcm) - 639, 640)):
        if i == reset_at:
            theirs.reset()
            their_features.reset()
            ours.reset()
            our_features.reset()
        for window in their_features.process_streaming(frame):
            a.append(theirs.process_streaming_prob(window))
            a.append(theirs._probabilities[-1] if theirs._probabilities else -1.0)
        for window in our_features.windows(frame):
            b.append(ours.probability(window))
            b.append(ours.raw_probabilities[-1] if ours.raw_probabilities else -1.0)
    theirs.close()
    ours.close()
    return a, b


@needs_flite
@pytest.mark.parametrize("model", BUILTIN_MODELS)
def test_every_probability_equals_pymicro_wakewords(model: str, tmp_path: Path) -> None:
    quiet = np.zeros(synth.RATE_HZ // 2)
    spoken = [synth.flite(f"{PHRASES[model]}, what time is it", voice, tmp_path)
              for voice in ("slt", "rms", "awb")]
    signal = np.concatenate([part for s in spoken for part in (quiet, s)] + [quiet])
    signal = signal + synth.noise(len(signal) / synth.RATE_HZ, -60.0)
    pcm = synth.to_pcm(signal)
    theirs, ours = _both_runs(model, pcm, reset_at=len(pcm) // 640 // 2)
    assert len(ours) == len(theirs) > 300
    assert max(theirs) > 0.5  # the phrase was heard: the comparison covers detections
    assert ours == theirs


def test_a_model_file_tensorflow_lite_cannot_load_is_an_error_naming_it(
        tmp_path: Path) -> None:
    broken = tmp_path / "mine.tflite"
    broken.write_bytes(b"not a flatbuffer" * 64)
    with pytest.raises(TriggerUnavailableError, match=r"mine\.tflite"):
        WakeWordTrigger(WakeSettings(models=(str(broken),)))


def test_a_closed_model_refuses_to_run() -> None:
    model = _ours("hey_jarvis")
    model.close()
    with pytest.raises(RuntimeError, match="closed"):
        model.probability(np.zeros((1, 1, 40)))
    model.close()  # twice is harmless


def test_the_trigger_does_not_import_pymicro_wakewords_wrapper() -> None:
    import subprocess
    import sys

    code = ("import sys\n"
            "from edgevoice.triggers.wake import WakeSettings, WakeWordTrigger\n"
            "t = WakeWordTrigger(WakeSettings(models=('hey_jarvis', 'okay_nabu')))\n"
            "print(sorted(m for m in sys.modules if m.startswith(\n"
            "    ('pymicro_wakeword', 'statistics', 'decimal', 'fractions'))))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"
