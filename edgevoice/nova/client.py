"""The only module that imports the AWS SDK: open a Nova Sonic stream, explain its errors.

``aws-sdk-bedrock-runtime`` (the ``nova`` extra) needs Python >= 3.12 and changes
its API between minor versions, so it is pinned and imported lazily, here only:
the rest of edgevoice imports and runs without it. Everything above this module
sees two small protocols, :class:`StreamOpener` and :class:`NovaStream`, which a
test can also satisfy without any SDK.

Facts about SDK 0.12 this module relies on:

* the default aiohttp transport cannot do duplex streams; the CRT transport
  (``AWSCRTHTTPClient``) can, over HTTP/2 and TLS only;
* the TLS trust store is read when the transport is created (``SSL_CERT_FILE``);
* when the server resets or never answers the request, ``await_output()`` never
  returns: the caller must time it out;
* a dropped connection makes ``receive()`` return None, exactly like a clean end;
* exceptions Nova sends inside the stream are raised by ``receive()``, and an
  exception type the SDK does not model surfaces as a ``KeyError``;
* a failure before the request is sent (no credentials at all) leaves the SDK's
  own request task failed and unretrieved, and the stream's ``open`` waiting
  forever. So the credentials are resolved here first, through the same chain the
  client signs with (environment, profile, container or instance role): a missing
  or broken chain fails at once with ``nova_no_credentials``, and the expiry of
  temporary credentials is known, so a stream can be replaced before it.

Credentials come from the SDK's standard chain (environment, shared profile,
container or instance role) and are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from typing import Any, Protocol

from edgevoice.errors import UpstreamError
from edgevoice.nova.faults import NETWORK, NO_CREDENTIALS, OPEN_TIMEOUT, SDK_MISSING, Fault
from edgevoice.nova.settings import NovaSettings

logger = logging.getLogger(__name__)

#: Longest wait for the SDK to let go of a stream.
CLOSE_TIMEOUT_S = 1.0


class NovaStream(Protocol):
    """One bidirectional stream, as the runner uses it."""

    #: Seconds until the credentials it was signed with expire (None: not temporary).
    credentials_expire_in_s: float | None

    async def send(self, event_json: bytes) -> None:
        """Send one input event (its JSON)."""

    async def wait_open(self) -> None:
        """Wait for the HTTP response; raise if the service refused the stream."""

    async def receive(self) -> bytes | None:
        """The next output event's JSON; None when the output ended (cleanly or not)."""

    async def close_input(self) -> None:
        """Signal the end of our events (a signed empty frame, then end of body)."""

    async def close(self) -> None:
        """Release everything. Idempotent; never raises."""


class StreamOpener(Protocol):
    """Opens streams to one model and explains their failures."""

    async def open(self) -> NovaStream: ...

    def fault(self, exc: BaseException) -> Fault:
        """Translate whatever ``open``, ``send``, ``wait_open`` or ``receive`` raised."""
        ...

    async def aclose(self) -> None: ...


def sdk_available() -> bool:
    """Whether the ``nova`` extra is importable (Python >= 3.12 with the SDK)."""
    try:
        import aws_sdk_bedrock_runtime.client  # noqa: F401
        import smithy_http.aio.crt  # noqa: F401
    except ImportError:
        return False
    return True


def require_sdk() -> None:
    """Raise a clear, non-retryable error when the SDK is missing."""
    if not sdk_available():
        raise UpstreamError(
            "nova_sdk_missing",
            "The Nova Sonic upstream needs Python >= 3.12 and the 'nova' extra: "
            "pip install 'edgevoice[nova]' (aws-sdk-bedrock-runtime[awscrt]).",
            retryable=False,
        )


class BedrockStream:
    """:class:`NovaStream` over the SDK's ``DuplexEventStream``."""

    def __init__(self, duplex: Any, credentials_expire_in_s: float | None = None) -> None:
        from aws_sdk_bedrock_runtime.models import (
            BidirectionalInputPayloadPart,
            InvokeModelWithBidirectionalStreamInputChunk,
            InvokeModelWithBidirectionalStreamOutputChunk,
        )

        self._duplex = duplex
        self.credentials_expire_in_s = credentials_expire_in_s
        self._chunk = InvokeModelWithBidirectionalStreamInputChunk
        self._part = BidirectionalInputPayloadPart
        self._output_chunk = InvokeModelWithBidirectionalStreamOutputChunk
        self._receiver: Any = None
        self._open_task: asyncio.Task[Any] | None = None
        self._closed = False

    async def send(self, event_json: bytes) -> None:
        await self._duplex.input_stream.send(self._chunk(value=self._part(bytes_=event_json)))

    async def wait_open(self) -> None:
        # Our own task, so close() can cancel it: the SDK's future may never resolve.
        self._open_task = asyncio.ensure_future(self._duplex.await_output())
        _, self._receiver = await self._open_task

    async def receive(self) -> bytes | None:
        while True:
            item = await self._receiver.receive()
            if item is None:
                return None
            if isinstance(item, self._output_chunk):
                return bytes(item.value.bytes_ or b"")
            # An output variant newer than this SDK: nothing we could act on.
            logger.debug("ignoring unknown output stream member %r", item)

    async def close_input(self) -> None:
        await self._duplex.input_stream.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._open_task is not None and not self._open_task.done():
            self._open_task.cancel()
        # DuplexEventStream.close() would wait for an output that may never come, and
        # ending the input of a request that never went out waits forever too.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._duplex.input_stream.close(), CLOSE_TIMEOUT_S)
        if self._receiver is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._receiver.close(), CLOSE_TIMEOUT_S)


class BedrockStreamOpener:
    """:class:`StreamOpener` for Amazon Bedrock through the official SDK."""

    def __init__(self, settings: NovaSettings) -> None:
        require_sdk()
        self.settings = settings
        self._client: Any = None
        self._credentials: Any = None
        self._lock = asyncio.Lock()

    async def _get_client(self) -> Any:
        async with self._lock:
            if self._client is None:
                install_sdk_task_filter(asyncio.get_running_loop())
                from aws_sdk_bedrock_runtime.client import AsyncBedrockRuntimeClient
                from aws_sdk_bedrock_runtime.config import AsyncBedrockRuntimeConfig
                from smithy_aws_core.identity import AWSCredentialsIdentity, IdentityChain
                from smithy_http.aio.crt import AWSCRTHTTPClient

                transport = AWSCRTHTTPClient()
                # The chain the client would build for itself, built here so the
                # relay can ask it first (see the module docstring).
                self._credentials = await IdentityChain.create(
                    AWSCredentialsIdentity,
                    region_override=self.settings.region,
                    http_client=transport,
                )
                overrides: dict[str, Any] = {}
                if self.settings.endpoint_url:
                    overrides["endpoint_uri"] = self.settings.endpoint_url
                config = await AsyncBedrockRuntimeConfig.resolve(
                    region=self.settings.region,
                    # The session core retries with its own policy and history replay.
                    max_attempts=1,
                    transport=transport,
                    aws_credentials_identity_resolver=self._credentials,
                    **overrides,
                )
                logger.info(
                    "nova: Bedrock client for region %s, model %s%s",
                    self.settings.region,
                    self.settings.model_id,
                    f", endpoint {config.endpoint_uri}" if config.endpoint_uri else "",
                )
                self._client = AsyncBedrockRuntimeClient(config=config)
            return self._client

    async def open(self) -> NovaStream:
        from aws_sdk_bedrock_runtime.models import (
            InvokeModelWithBidirectionalStreamOperationInput,
        )

        client = await self._get_client()
        expire_in_s = await self.check_credentials()
        duplex = await client.invoke_model_with_bidirectional_stream(
            InvokeModelWithBidirectionalStreamOperationInput(model_id=self.settings.model_id)
        )
        return BedrockStream(duplex, expire_in_s)

    async def check_credentials(self) -> float | None:
        """Resolve the credentials; seconds until they expire (None: they do not).

        Raises the chain's error (``nova_no_credentials``) when there are none.
        """
        if self._credentials is None:
            await self._get_client()
        identity = await self._credentials.get_identity(properties={})
        expiration = getattr(identity, "expiration", None)
        if expiration is None:
            return None
        remaining = expiration - datetime.datetime.now(datetime.UTC)
        return float(remaining.total_seconds())

    def fault(self, exc: BaseException) -> Fault:
        return fault_from_exception(exc)

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()


#: The SDK's and the CRT's own tasks, whose failures nobody awaits.
_SDK_MODULES = ("smithy_", "aws_sdk_", "awscrt", "smithy_http", "smithy_aws")


def install_sdk_task_filter(loop: asyncio.AbstractEventLoop) -> None:
    """Turn "Task exception was never retrieved" tracebacks from SDK tasks into one line.

    The CRT transport keeps writing the request body after the service ended a
    stream and fails an internal task with AWS_ERROR_HTTP_STREAM_HAS_COMPLETED,
    which no one awaits: expected, logged at debug level. Any other unretrieved
    failure of an SDK task is logged as one warning naming it; the session has
    already seen (and classified) the failure through the stream. Idempotent.
    """
    previous = loop.get_exception_handler()
    if getattr(previous, "_edgevoice_sdk_filter", False):
        return

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        task = context.get("future") or context.get("task")
        coro = getattr(task, "get_coro", lambda: None)()
        module = getattr(getattr(coro, "cr_code", None), "co_filename", "") or ""
        if exc is not None and any(f"/{m}" in module for m in _SDK_MODULES):
            if "AWS_ERROR_HTTP_STREAM_HAS_COMPLETED" in str(exc):
                logger.debug("nova: the transport wrote after the stream ended (harmless)")
            else:
                logger.warning(
                    "nova: an AWS SDK task failed unobserved: %s: %s", type(exc).__name__, exc
                )
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    handler._edgevoice_sdk_filter = True  # type: ignore[attr-defined]
    loop.set_exception_handler(handler)


def fault_from_exception(exc: BaseException) -> Fault:
    """Describe an SDK, CRT or network exception as a :class:`Fault`."""
    if isinstance(exc, ImportError):
        return Fault(SDK_MISSING, str(exc))
    if isinstance(exc, TimeoutError):
        return Fault(OPEN_TIMEOUT, "no answer from the endpoint in time")
    try:
        from smithy_aws_event_stream.exceptions import UnmodeledEventError
        from smithy_core.exceptions import CallError, SmithyIdentityError
    except ImportError:  # pragma: no cover - fault() is only reached with the SDK
        return Fault(type(exc).__name__, str(exc))
    if isinstance(exc, SmithyIdentityError):
        # The chain's message lists what it tried; it never contains a secret.
        detail = " ".join(str(exc).split())[:300]
        return Fault(NO_CREDENTIALS, f"no usable AWS credentials ({detail})")
    if isinstance(exc, CallError):
        metadata = getattr(exc, "response_metadata", None)
        status = getattr(metadata, "http_status_code", None)
        return Fault(type(exc).__name__, exc.message, status if isinstance(status, int) else None)
    if isinstance(exc, UnmodeledEventError):
        return Fault(str(exc.args[0]) if exc.args else "UnmodeledEventError", str(exc))
    if isinstance(exc, KeyError):
        # The SDK's deserializer met an exception type it does not model.
        name = str(exc.args[0]) if exc.args else "unknown"
        return Fault(name[:1].upper() + name[1:], "an exception this SDK version does not know")
    crt_name = getattr(exc, "name", None)
    if isinstance(crt_name, str) and crt_name.startswith("AWS_"):
        return Fault(NETWORK if "DNS" not in crt_name else crt_name, crt_name)
    if isinstance(exc, OSError):
        cause = exc.__cause__ or exc
        return Fault(NETWORK, f"{type(cause).__name__}: {cause}")
    return Fault(type(exc).__name__, str(exc))
