"""What a Nova Sonic failure means, and what the device is told about it. Pure.

The runner turns whatever the AWS SDK raised into a :class:`Fault` (the error's
type name, its message, the HTTP status when there was one); :func:`classify`
decides how the session reacts:

``RESUME``   the stream broke but Nova works: reopen at once with the history
             (ModelTimeoutException, "System instability", a dropped connection);
``BACKOFF``  Nova is busy or briefly unavailable: reopen after a growing delay
             (throttling, 5xx, timeouts, network errors);
``FATAL``    retrying cannot help until an operator acts (access denied, unknown
             model, no credentials, wrong region): tell the device and stop.

Every outcome carries the stable ``code`` and the plain-language ``message`` that
``UpstreamFailed`` sends to the device; the messages say what to do.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Recovery(enum.Enum):
    """How the session recovers from a fault."""

    RESUME = "resume"
    BACKOFF = "backoff"
    FATAL = "fatal"


@dataclass(frozen=True)
class Fault:
    """A failure as the runner saw it, free of SDK types."""

    #: The AWS error code or exception type name, e.g. "ThrottlingException".
    code: str
    message: str = ""
    #: HTTP status of the response that carried the error, if any.
    http_status: int | None = None


@dataclass(frozen=True)
class Diagnosis:
    """What to do about a fault and what to tell the device."""

    recovery: Recovery
    code: str
    message: str

    @property
    def retryable(self) -> bool:
        return self.recovery is not Recovery.FATAL


# Fault codes the runner itself produces (no AWS error behind them).
STREAM_LOST = "StreamLost"
"""The output stream ended without ``completionEnd``: the connection dropped."""
STREAM_ENDED = "StreamEnded"
"""Nova ended the stream cleanly (after completionEnd) while the device still needed it."""
STREAM_STALLED = "StreamStalled"
"""Nova stopped answering in the middle of a reply."""
OPEN_TIMEOUT = "OpenTimeout"
"""No HTTP response to the stream request in time."""
NO_CREDENTIALS = "NoCredentials"
"""The AWS credential chain found nothing."""
SDK_MISSING = "SdkMissing"
"""The ``nova`` extra (aws-sdk-bedrock-runtime) is not installed."""
NETWORK = "NetworkError"
"""Connecting or talking to the endpoint failed below HTTP."""

#: Every ``error`` code a Nova session can send to a device (docs/protocol.md lists them).
DEVICE_CODES: frozenset[str] = frozenset(
    {
        "nova_access_denied",
        "nova_bad_credentials",
        "nova_no_credentials",
        "nova_unknown_model",
        "nova_model_unavailable",
        "nova_invalid_request",
        "nova_region",
        "nova_sdk_missing",
        "nova_throttled",
        "nova_unavailable",
        "nova_timeout",
        "nova_unreachable",
        "nova_stream_lost",
        "nova_stream_ended",
        "nova_stalled",
        "nova_model_timeout",
        "nova_unstable",
        "nova_error",
    }
)


def _v1_hint(model_id: str) -> str:
    if model_id.endswith("amazon.nova-sonic-v1:0"):
        return " (Nova Sonic v1 is past its end of life: use amazon.nova-2-sonic-v1:0)"
    return ""


def _has(text: str, *needles: str) -> bool:
    lowered = text.lower()
    return any(n in lowered for n in needles)


def classify(fault: Fault, *, region: str = "", model_id: str = "") -> Diagnosis:
    """Decide how to recover from ``fault`` and how to explain it."""
    code, message, status = fault.code, fault.message, fault.http_status
    where = f" (region {region}, model {model_id})" if region or model_id else ""

    if code in ("AccessDeniedException", "UnrecognizedClientException") or status in (401, 403):
        if _has(message, "security token", "signature", "invalid token", "expired"):
            return Diagnosis(
                Recovery.FATAL,
                "nova_bad_credentials",
                "AWS rejected the relay's credentials: they are invalid or expired. "
                "Refresh the access key, profile or instance role the relay uses.",
            )
        return Diagnosis(
            Recovery.FATAL,
            "nova_access_denied",
            "AWS denied access to Nova Sonic" + where + ". Allow the action "
            "bedrock:InvokeModelWithBidirectionalStream on the model for the relay's "
            "IAM identity, and enable access to the model in the Bedrock console.",
        )
    if code == NO_CREDENTIALS:
        return Diagnosis(
            Recovery.FATAL,
            "nova_no_credentials",
            "The relay found no AWS credentials. Set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, an AWS_PROFILE, or run it with an instance role"
            + (f" ({message})" if message else "")
            + ".",
        )
    if code == SDK_MISSING:
        return Diagnosis(
            Recovery.FATAL,
            "nova_sdk_missing",
            "The Nova Sonic upstream needs Python >= 3.12 and the 'nova' extra: "
            "pip install 'edgevoice[nova]'.",
        )
    if code == "ModelTimeoutException":
        return Diagnosis(
            Recovery.RESUME, "nova_model_timeout", "Nova Sonic timed out; the session resumed."
        )
    if code == "ValidationException":
        if _has(message, "system instability", "unstable"):
            return Diagnosis(
                Recovery.RESUME,
                "nova_unstable",
                "Nova Sonic reported a transient instability; the session resumed.",
            )
        if _has(message, "model identifier", "model id", "modelid", "model is not supported"):
            return Diagnosis(
                Recovery.FATAL,
                "nova_unknown_model",
                "Nova Sonic does not know the model" + where + ". Use "
                "amazon.nova-2-sonic-v1:0 in a region that offers it (for example "
                "us-east-1)" + _v1_hint(model_id) + ".",
            )
        return Diagnosis(
            Recovery.FATAL,
            "nova_invalid_request",
            f"Nova Sonic rejected the request: {message or 'validation failed'}. "
            "Check the nova settings (voice, inference values, tools).",
        )
    if code == "ResourceNotFoundException" or status == 404:
        return Diagnosis(
            Recovery.FATAL,
            "nova_model_unavailable",
            "Nova Sonic is not available" + where + ". Choose a region where the "
            "model is offered and enable model access there" + _v1_hint(model_id) + ".",
        )
    if code in ("ThrottlingException", "ServiceQuotaExceededException") or status == 429:
        return Diagnosis(
            Recovery.BACKOFF,
            "nova_throttled",
            "AWS is throttling Nova Sonic requests; retrying with backoff. If this "
            "persists, request a higher quota for concurrent streams.",
        )
    if code in (STREAM_LOST, "ModelStreamErrorException"):
        return Diagnosis(
            Recovery.RESUME, "nova_stream_lost", "The Nova Sonic stream was lost; resuming."
        )
    if code == STREAM_ENDED:
        return Diagnosis(
            Recovery.RESUME, "nova_stream_ended", "Nova Sonic ended the stream; resuming."
        )
    if code == STREAM_STALLED:
        return Diagnosis(Recovery.RESUME, "nova_stalled", "Nova Sonic stopped answering; resuming.")
    if code in ("InternalServerException", "ServiceUnavailableException", "ModelNotReadyException"):
        return Diagnosis(
            Recovery.BACKOFF,
            "nova_unavailable",
            "Nova Sonic is temporarily unavailable; retrying.",
        )
    if code == OPEN_TIMEOUT or _has(code, "timeout") or status in (408, 504):
        return Diagnosis(
            Recovery.BACKOFF,
            "nova_timeout",
            "Nova Sonic did not answer in time; retrying. Check the relay's network path to AWS.",
        )
    if _has(code + " " + message, "dns", "resolve host", "endpoint", "region"):
        return Diagnosis(
            Recovery.FATAL,
            "nova_region",
            "Could not reach Nova Sonic" + where + ". Check nova.region (for example "
            "us-east-1) and any endpoint override, and the relay's DNS.",
        )
    if code == NETWORK:
        return Diagnosis(
            Recovery.BACKOFF,
            "nova_unreachable",
            f"Could not talk to Nova Sonic: {message or 'network error'}. Retrying.",
        )
    if status is not None and status >= 500:
        return Diagnosis(
            Recovery.BACKOFF, "nova_unavailable", "Nova Sonic is temporarily unavailable; retrying."
        )
    return Diagnosis(
        Recovery.BACKOFF,
        "nova_error",
        f"Nova Sonic failed ({code}{': ' + message if message else ''}); retrying.",
    )
