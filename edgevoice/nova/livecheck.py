"""``edgevoice relay --check-config --live``: one real Nova stream, opened and closed.

It answers the four questions an operator has before the first device talks:
are there credentials, does the region's endpoint answer, may this identity use
the model there, and how long does a stream take to open. Each answer that is not
"yes" names the code of docs/nova-sonic.md's troubleshooting table and its fix.

The stream it opens is the real thing (the same events the relay sends, then a
polite goodbye), so it costs a fraction of a second of audio.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from edgevoice.nova import events as nova
from edgevoice.nova.client import BedrockStreamOpener, NovaStream, StreamOpener
from edgevoice.nova.faults import OPEN_TIMEOUT, Diagnosis, Fault, classify
from edgevoice.nova.session import FRAME_S, SILENCE_FRAME, CloseStream, OpenStream, SessionCore
from edgevoice.nova.settings import NovaSettings

logger = logging.getLogger(__name__)

#: Silence sent before saying goodbye, so the stream carried some audio.
PROBE_AUDIO_S = 0.2
#: Regions AWS's Nova 2 user guide named when this was written; others may exist.
DOCUMENTED_REGIONS = ("us-east-1", "us-west-2", "eu-north-1", "ap-northeast-1")


@dataclass(frozen=True)
class Finding:
    """One line of the report."""

    what: str  # credentials, region, model access, latency
    ok: bool
    detail: str
    fix: str = ""
    code: str = ""

    def line(self) -> str:
        status = "ok" if self.ok else f"FAILED ({self.code})" if self.code else "FAILED"
        text = f"{self.what}: {status}: {self.detail}"
        return f"{text}\n    fix: {self.fix}" if self.fix else text


def _failed(what: str, diagnosis: Diagnosis) -> Finding:
    return Finding(what, False, diagnosis.message, _fix_of(diagnosis.code), diagnosis.code)


def _fix_of(code: str) -> str:
    return {
        "nova_no_credentials": "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, an AWS_PROFILE, "
        "or give the relay's host an instance role",
        "nova_bad_credentials": "refresh the access key, profile or role the relay uses",
        "nova_access_denied": "allow bedrock:InvokeModelWithBidirectionalStream on the model "
        "and enable model access in the Bedrock console of the region",
        "nova_unknown_model": "use amazon.nova-2-sonic-v1:0 in a region that offers it",
        "nova_model_unavailable": "choose a region that offers the model (nova.region)",
        "nova_region": "check nova.region, nova.endpoint_url and the relay's DNS",
        "nova_throttled": "ask for a higher concurrent-stream quota, or retry later",
        "nova_timeout": "check the network path to AWS (proxy, firewall)",
        "nova_unreachable": "check the network path to AWS (proxy, firewall)",
        "nova_unavailable": "wait, or try another region",
        "nova_sdk_missing": "Python >= 3.12 and pip install 'edgevoice[nova]'",
    }.get(code, "see docs/nova-sonic.md, Troubleshooting")


async def live_check(
    settings: NovaSettings,
    opener: StreamOpener | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> list[Finding]:
    """Open one stream with ``settings`` and close it; what went right and wrong."""
    findings: list[Finding] = []
    region = settings.region
    if opener is None:
        try:
            opener = BedrockStreamOpener(settings)
        except Exception as exc:  # the SDK is missing
            return [
                Finding("sdk", False, str(exc), _fix_of("nova_sdk_missing"), "nova_sdk_missing")
            ]
    the_opener: StreamOpener = opener

    def diagnose(exc: BaseException) -> Diagnosis:
        return classify(the_opener.fault(exc), region=region, model_id=settings.model_id)

    try:
        # credentials first: the chain the relay signs with
        check: Callable[[], Awaitable[float | None]] | None = getattr(
            opener, "check_credentials", None
        )
        if check is not None:
            try:
                expires_in_s = await asyncio.wait_for(check(), settings.open_timeout_s)
            except Exception as exc:
                return [_failed("credentials", diagnose(exc))]
            lasting = (
                "static (no expiry)"
                if expires_in_s is None
                else f"temporary, valid {expires_in_s / 60:.0f} more minutes"
            )
            findings.append(Finding("credentials", True, f"found, {lasting}"))
        started = clock()
        stream: NovaStream | None = None
        try:
            async with asyncio.timeout(settings.open_timeout_s):
                stream = await opener.open()
                await _open_and_close(stream, settings, started, clock, findings, region)
        except TimeoutError:
            diagnosis = classify(Fault(OPEN_TIMEOUT, "no response"), region=region)
            findings.append(_failed("region", diagnosis))
        except Exception as exc:
            diagnosis = diagnose(exc)
            what = {
                "nova_region": "region",
                "nova_unreachable": "region",
                "nova_timeout": "region",
                "nova_bad_credentials": "credentials",
                "nova_no_credentials": "credentials",
            }.get(diagnosis.code, "model access")
            if what == "model access":
                findings.append(Finding("region", True, f"{region}: the endpoint answered"))
            findings.append(_failed(what, diagnosis))
        finally:
            if stream is not None:
                await stream.close()
    finally:
        await opener.aclose()
    return findings


async def _open_and_close(
    stream: NovaStream,
    settings: NovaSettings,
    started: float,
    clock: Callable[[], float],
    findings: list[Finding],
    region: str,
) -> None:
    core = SessionCore(settings, debug_name="live-check")
    (opening,) = [a for a in core.start_turn(0.0) if isinstance(a, OpenStream)]
    for event in opening.events:
        await stream.send(nova.encode_event(event))
    await stream.wait_open()
    latency_ms = (clock() - started) * 1000
    note = "" if region in DOCUMENTED_REGIONS else " (not in the regions the Nova 2 guide lists)"
    findings.append(Finding("region", True, f"{region}: the endpoint answered{note}"))
    findings.append(Finding("model access", True, f"{settings.model_id} accepted the stream"))
    findings.append(Finding("latency", True, f"stream open in {latency_ms:.0f} ms"))
    core.stream_opened(opening.stream_id, 0.0)
    prompt = opening.events[1]["event"]["promptStart"]["promptName"]
    audio = opening.events[-1]["event"]["contentStart"]["contentName"]
    for _ in range(round(PROBE_AUDIO_S / FRAME_S)):
        await stream.send(nova.encode_event(nova.audio_input(prompt, audio, SILENCE_FRAME)))
    for action in core.close(0.0):
        if isinstance(action, CloseStream):
            for event in action.events:
                await stream.send(nova.encode_event(event))
    await stream.close_input()
    # Read to the end (Nova's last usage events), as the relay does.
    async with asyncio.timeout(settings.drain_timeout_s):
        while await stream.receive() is not None:
            pass


def run_live_check(settings: NovaSettings) -> int:
    """Print the report; 0 when every check passed, 69 (unavailable) otherwise."""
    for warning in settings.warnings():
        print(f"warning: {warning}")
    findings = asyncio.run(live_check(settings))
    for finding in findings:
        print(finding.line())
    return 0 if findings and all(f.ok for f in findings) else 69
