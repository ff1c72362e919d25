"""The one exception tree of edgevoice, and the single retry policy.

::

    EdgevoiceError
     ├── ConfigError                 a config file is wrong: names file, key and reason
     ├── ProtocolError               the wire protocol was violated
     │    ├── LocalProtocolError      ... by us (a bug: we misused the protocol core)
     │    └── RemoteProtocolError     ... by the peer (close that connection only)
     ├── LinkError                   the device <-> relay link failed (retryable)
     │    └── AuthenticationError     the relay refused our token (not retryable)
     ├── AudioDeviceError            a sound card vanished or cannot be opened (retryable)
     ├── UpstreamError               the speech upstream failed; carries code and retryable
     ├── ToolError                   a function-calling tool failed or timed out
     └── IllegalTransitionError      a state machine tried a move its table forbids (a bug)

Not retryable either, defined beside the code that raises them:
``audio.opus.CodecUnavailableError`` (no libopus), ``audio.wavio.AudioFileError``
(not a usable WAV), ``audio.sounddevice_io.PortAudioUnavailableError`` (no
PortAudio) and ``triggers.base.TriggerUnavailableError`` (a missing extra, model or
GPIO): the operator must install or configure something.

Every reconnect loop asks :func:`is_retryable` and nothing else, so the whole
daemon agrees on what is worth another try.
"""

from __future__ import annotations

import asyncio
import ssl


class EdgevoiceError(Exception):
    """Root of every error edgevoice raises on purpose."""


class ConfigError(EdgevoiceError):
    """A configuration file is malformed. ``str()`` is ``file: key: reason``."""

    def __init__(self, file: str, key: str, reason: str) -> None:
        self.file = file
        self.key = key
        self.reason = reason
        super().__init__(f"{file}: {key}: {reason}")


class ProtocolError(EdgevoiceError):
    """The edgevoice wire protocol was violated."""

    #: WebSocket close code to use when this error ends a connection.
    close_code: int = 1002


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol does not allow in the current state."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


class LinkError(EdgevoiceError):
    """The link to the relay failed or could not be established."""


class AuthenticationError(LinkError):
    """The relay refused the device token (HTTP 401). Retrying will not help."""


class AudioDeviceError(EdgevoiceError):
    """An audio device cannot be opened or stopped delivering audio."""


class UpstreamError(EdgevoiceError):
    """The speech upstream (Nova Sonic, echo, ...) failed.

    ``code`` is a stable machine-readable name sent to the device in an ``error``
    message; ``str()`` is a plain-language reason an operator can act on.
    """

    def __init__(self, code: str, message: str, *, retryable: bool) -> None:
        self.code = code
        self.retryable = retryable
        super().__init__(message)


class ToolError(EdgevoiceError):
    """A function-calling tool failed, timed out or was given bad arguments."""


class IllegalTransitionError(EdgevoiceError, RuntimeError):
    """A state machine tried a transition its table does not list: a bug, never input."""


def is_retryable(exc: BaseException) -> bool:
    """Whether a loop that hit ``exc`` should back off and try again.

    Configuration, authentication, TLS-verification and local protocol errors are
    final: retrying cannot fix them and would only hide them. Network failures,
    timeouts, the peer's protocol mistakes and vanished audio devices are transient.
    """
    if isinstance(exc, AuthenticationError | ConfigError | LocalProtocolError):
        return False
    if isinstance(exc, UpstreamError):
        return exc.retryable
    if isinstance(exc, ssl.SSLCertVerificationError):
        return False
    if isinstance(exc, LinkError | RemoteProtocolError | AudioDeviceError):
        return True
    if isinstance(exc, OSError | asyncio.TimeoutError | EOFError | ConnectionError):
        return True
    # websockets' own exceptions: imported lazily to keep this module dependency-free.
    try:
        from websockets.exceptions import InvalidStatus, WebSocketException
    except ImportError:  # pragma: no cover
        return False
    if isinstance(exc, InvalidStatus):
        status = exc.response.status_code
        return status not in (401, 403) and (status >= 500 or status in (408, 429))
    return isinstance(exc, WebSocketException)
