"""microWakeWord models run on TensorFlow Lite's C library through ctypes.

The library, the built-in models and their settings come from the pymicro-wakeword
wheel (the ``wake`` extra) and the audio features from pymicro-features, as before;
this module replaces only pymicro-wakeword's Python wrapper. That wrapper imports
``statistics`` for one mean per inference, and with it ``decimal`` and ``fractions``:
about 1 MB resident in an idle device with the wake word on (bench row 12), for
arithmetic that ``math.fsum`` does exactly here (see :meth:`MicroWakeWordModel.probability`).
Every step is the wrapper's, in the same order and with the same numpy arithmetic;
``tests/triggers/test_microwake.py`` compares every probability of every built-in model
with pymicro-wakeword's on recorded speech.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import math
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

#: 10 ms of 16 kHz 16-bit mono: what the feature frontend takes per call
_BYTES_PER_CHUNK = 160 * 2
#: TfLiteType -> numpy dtype, for the quantized tensors microWakeWord models use
_TFLITE_TYPES: dict[int, Any] = {3: np.uint8, 9: np.int8}


class _QuantizationParams(ctypes.Structure):
    _fields_ = [("scale", ctypes.c_float), ("zero_point", ctypes.c_int32)]


def wheel_dir() -> Path | None:
    """pymicro-wakeword's package directory, found without running its ``__init__``
    (which imports its wrapper); None when it is not installed."""
    spec = importlib.util.find_spec("pymicro_wakeword")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def library_path(wheel: Path) -> Path | None:
    """The TensorFlow Lite C library shipped in the wheel, if there is one here."""
    return next(iter(sorted((wheel / "lib").glob("*tensorflowlite_c.*"))), None)


_libraries: dict[Path, ctypes.CDLL] = {}


def _library(path: Path) -> ctypes.CDLL:
    """The library at ``path``, loaded once per process, its functions typed."""
    path = path.resolve()
    if path in _libraries:
        return _libraries[path]
    lib = ctypes.CDLL(str(path))
    p, i32, size = ctypes.c_void_p, ctypes.c_int32, ctypes.c_size_t
    signatures: dict[str, tuple[list[Any], Any]] = {
        "TfLiteModelCreateFromFile": ([ctypes.c_char_p], p),
        "TfLiteModelDelete": ([p], None),
        "TfLiteInterpreterCreate": ([p, p], p),
        "TfLiteInterpreterDelete": ([p], None),
        "TfLiteInterpreterAllocateTensors": ([p], ctypes.c_int),
        "TfLiteInterpreterInvoke": ([p], ctypes.c_int),
        "TfLiteInterpreterGetInputTensor": ([p, i32], p),
        "TfLiteInterpreterGetOutputTensor": ([p, i32], p),
        "TfLiteTensorByteSize": ([p], size),
        "TfLiteTensorDim": ([p, i32], i32),
        "TfLiteTensorType": ([p], i32),
        "TfLiteTensorQuantizationParams": ([p], _QuantizationParams),
        "TfLiteTensorCopyFromBuffer": ([p, p, size], ctypes.c_int),
        "TfLiteTensorCopyToBuffer": ([p, p, size], ctypes.c_int),
    }
    for name, (argtypes, restype) in signatures.items():
        function = getattr(lib, name)
        function.argtypes = argtypes
        function.restype = restype
    _libraries[path] = lib
    return lib


class MicroWakeWordModel:
    """One microWakeWord model: quantized features in, a smoothed probability out.

    Raises :class:`OSError` (library), :class:`RuntimeError` (a file TensorFlow Lite
    cannot load) or :class:`ValueError` (tensor types it was not made for).
    """

    def __init__(self, name: str, *, wake_word: str, tflite_model: Path,
                 probability_cutoff: float, sliding_window_size: int,
                 library: Path) -> None:
        self.name = name
        self.wake_word = wake_word
        self.tflite_model = tflite_model
        self.probability_cutoff = probability_cutoff
        self.sliding_window_size = sliding_window_size
        self._model: int | None = None
        self._interpreter: int | None = None
        self._lib = _library(library)
        #: feature windows per invocation (the input tensor's second dimension)
        self.stride = 3
        self._load()
        self._features: list[np.ndarray] = []
        #: the model's raw outputs, the last ``sliding_window_size`` of them
        self.raw_probabilities: deque[float] = deque(maxlen=sliding_window_size)

    @classmethod
    def from_config(cls, config_path: Path, library: Path) -> MicroWakeWordModel:
        """A model described by a microWakeWord ``.json`` (the model file beside it)."""
        config = json.loads(config_path.read_text(encoding="utf-8"))
        micro = config["micro"]
        return cls(Path(config["model"]).stem, wake_word=config["wake_word"],
                   tflite_model=config_path.parent / config["model"],
                   probability_cutoff=float(micro["probability_cutoff"]),
                   sliding_window_size=int(micro["sliding_window_size"]), library=library)

    def _load(self) -> None:
        lib = self._lib
        if self._model is None:
            self._model = lib.TfLiteModelCreateFromFile(
                str(Path(self.tflite_model).resolve()).encode("utf-8"))
            if not self._model:
                raise RuntimeError(f"TensorFlow Lite cannot load {self.tflite_model}")
        self._interpreter = lib.TfLiteInterpreterCreate(self._model, None)
        if not self._interpreter or lib.TfLiteInterpreterAllocateTensors(self._interpreter):
            raise RuntimeError(f"TensorFlow Lite cannot run {self.tflite_model}")
        self._input = lib.TfLiteInterpreterGetInputTensor(self._interpreter, 0)
        self._output = lib.TfLiteInterpreterGetOutputTensor(self._interpreter, 0)
        if not self._input or not self._output:
            raise RuntimeError(f"{self.tflite_model} has no input or output tensor")
        self.stride = int(lib.TfLiteTensorDim(self._input, 1))
        quant_in = lib.TfLiteTensorQuantizationParams(self._input)
        quant_out = lib.TfLiteTensorQuantizationParams(self._output)
        self._input_scale, self._input_zero_point = quant_in.scale, quant_in.zero_point
        self._output_scale, self._output_zero_point = quant_out.scale, quant_out.zero_point
        types = lib.TfLiteTensorType(self._input), lib.TfLiteTensorType(self._output)
        if types[0] not in _TFLITE_TYPES or types[1] not in _TFLITE_TYPES:
            raise ValueError(f"{self.tflite_model}: tensor types {types}, expected "
                             "quantized int8 or uint8")
        self._input_dtype = _TFLITE_TYPES[types[0]]
        self._output_dtype = _TFLITE_TYPES[types[1]]
        self._output_bytes = int(lib.TfLiteTensorByteSize(self._output))

    def probability(self, features: np.ndarray) -> float:
        """Feed one feature window; the mean of the last ``sliding_window_size`` raw
        outputs (0.0 until the model has run that many times).

        The mean is ``math.fsum(...) / n``, which equals ``statistics.mean``: each raw
        output is a float32 (a quantized byte times a float32 scale) and a handful of
        them sum exactly in a double, so both round the exact mean once.
        """
        if self._interpreter is None:
            raise RuntimeError("the wake-word model was closed")
        self._features.append(features)
        if len(self._features) < self.stride:
            return 0.0
        quantized = np.round(np.concatenate(self._features, axis=1) / self._input_scale
                             + self._input_zero_point).astype(self._input_dtype)
        self._features.clear()
        lib = self._lib
        lib.TfLiteTensorCopyFromBuffer(self._input, quantized.ctypes.data_as(ctypes.c_void_p),
                                       quantized.nbytes)
        lib.TfLiteInterpreterInvoke(self._interpreter)
        output = np.empty(self._output_bytes // np.dtype(self._output_dtype).itemsize,
                          dtype=self._output_dtype)
        lib.TfLiteTensorCopyToBuffer(self._output, output.ctypes.data_as(ctypes.c_void_p),
                                     self._output_bytes)
        raw = (output.astype(np.float32) - self._output_zero_point) * self._output_scale
        self.raw_probabilities.append(float(raw.item()))
        if len(self.raw_probabilities) < self.sliding_window_size:
            return 0.0
        return math.fsum(self.raw_probabilities) / len(self.raw_probabilities)

    def reset(self) -> None:
        """Start from scratch: a new interpreter (its streaming state is in variables
        that only a fresh one clears), no pending windows, no outputs."""
        self._features.clear()
        self.raw_probabilities.clear()
        self._delete_interpreter()
        self._load()

    def _delete_interpreter(self) -> None:
        if self._interpreter:
            self._lib.TfLiteInterpreterDelete(self._interpreter)
        self._interpreter = None

    def close(self) -> None:
        """Free the interpreter and the model (the object is unusable after)."""
        self._delete_interpreter()
        if self._model:
            self._lib.TfLiteModelDelete(self._model)
        self._model = None

    def __del__(self) -> None:
        self.close()


class MicroFeatures:
    """10 ms feature windows (40 values each) from 16 kHz 16-bit mono audio, through
    pymicro-features' frontend, as pymicro-wakeword computes them."""

    def __init__(self, frontend_class: Any) -> None:
        self._frontend = frontend_class()
        self._buffer = b""

    def windows(self, audio: bytes) -> Iterator[np.ndarray]:
        """The windows completed by ``audio``, each shaped (1, 1, n)."""
        self._buffer += audio
        at = 0
        while at + _BYTES_PER_CHUNK <= len(self._buffer):
            result = self._frontend.process_samples(self._buffer[at:at + _BYTES_PER_CHUNK])
            at += result.samples_read * 2
            if result.features:
                yield np.array(result.features).reshape((1, 1, len(result.features)))
        self._buffer = self._buffer[at:]

    def reset(self) -> None:
        self._frontend.reset()
        self._buffer = b""
