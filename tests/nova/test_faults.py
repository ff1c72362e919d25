"""AWS errors map to a recovery and a stable, actionable device-facing code."""

from __future__ import annotations

import pytest

from edgevoice.nova.faults import (
    NETWORK,
    NO_CREDENTIALS,
    OPEN_TIMEOUT,
    STREAM_LOST,
    Fault,
    Recovery,
    classify,
)

B, F, R = Recovery.BACKOFF, Recovery.FATAL, Recovery.RESUME


@pytest.mark.parametrize(
    ("fault", "recovery", "code"),
    [
        (Fault("AccessDeniedException", "User is not authorized", 403), F, "nova_access_denied"),
        (Fault("CallError", "Unknown error", 403), F, "nova_access_denied"),
        (
            Fault("UnrecognizedClientException", "The security token is invalid", 403),
            F,
            "nova_bad_credentials",
        ),
        (Fault(NO_CREDENTIALS), F, "nova_no_credentials"),
        (Fault("ThrottlingException", "Too many requests", 429), B, "nova_throttled"),
        (Fault("ServiceQuotaExceededException", "quota"), B, "nova_throttled"),
        (Fault("ModelTimeoutException", "Model has timed out"), R, "nova_model_timeout"),
        (
            Fault("ValidationException", "RequestId=1 : System instability detected. Retry."),
            R,
            "nova_unstable",
        ),
        (
            Fault("ValidationException", "The provided model identifier is invalid.", 400),
            F,
            "nova_unknown_model",
        ),
        (Fault("ValidationException", "Invalid input request", 400), F, "nova_invalid_request"),
        (Fault("ResourceNotFoundException", "Model not found", 404), F, "nova_model_unavailable"),
        (Fault("ServiceUnavailableException", "", 503), B, "nova_unavailable"),
        (Fault("InternalServerException", "", 500), B, "nova_unavailable"),
        (Fault("ModelStreamErrorException", "boom"), R, "nova_stream_lost"),
        (Fault(STREAM_LOST), R, "nova_stream_lost"),
        (Fault(OPEN_TIMEOUT), B, "nova_timeout"),
        (Fault("AWS_IO_DNS_INVALID_NAME", "host not found"), F, "nova_region"),
        (Fault(NETWORK, "ConnectionRefusedError"), B, "nova_unreachable"),
        (Fault("SomethingNew", "?"), B, "nova_error"),
    ],
)
def test_classification(fault: Fault, recovery: Recovery, code: str) -> None:
    diagnosis = classify(fault, region="eu-west-1", model_id="amazon.nova-2-sonic-v1:0")
    assert (diagnosis.recovery, diagnosis.code) == (recovery, code)
    assert diagnosis.retryable is (recovery is not F)
    assert diagnosis.message  # always something to tell the operator


def test_fatal_messages_say_what_to_do() -> None:
    denied = classify(Fault("AccessDeniedException", "", 403), region="eu-west-1", model_id="m")
    assert "bedrock:InvokeModelWithBidirectionalStream" in denied.message
    assert "eu-west-1" in denied.message
    model = classify(Fault("ValidationException", "model identifier is invalid"), model_id="x")
    assert "amazon.nova-2-sonic-v1:0" in model.message


@pytest.mark.parametrize(
    "fault",
    [
        Fault(code, message, status)
        for code in (
            "AccessDeniedException",
            "UnrecognizedClientException",
            "NoCredentials",
            "SdkMissing",
            "ModelTimeoutException",
            "ValidationException",
            "ResourceNotFoundException",
            "ThrottlingException",
            "ServiceQuotaExceededException",
            "StreamLost",
            "ModelStreamErrorException",
            "StreamEnded",
            "StreamStalled",
            "InternalServerException",
            "ServiceUnavailableException",
            "ModelNotReadyException",
            "OpenTimeout",
            "NetworkError",
            "AWS_IO_DNS_QUERY_FAILED",
            "SomethingNew",
        )
        for message in (
            "",
            "System instability",
            "The provided model identifier is invalid.",
            "The security token included in the request is expired",
        )
        for status in (None, 400, 403, 404, 408, 429, 500, 503)
    ],
)
def test_every_code_a_fault_can_become_is_in_the_device_vocabulary(fault: Fault) -> None:
    from edgevoice.nova.faults import DEVICE_CODES

    assert classify(fault).code in DEVICE_CODES
