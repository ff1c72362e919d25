"""A local, scriptable stand-in for Amazon Bedrock's Nova Sonic bidirectional stream.

It speaks what the real AWS SDK client speaks: HTTP/2 over TLS on 127.0.0.1,
``POST /model/{modelId}/invoke-with-bidirectional-stream``, AWS event-stream frames
in both directions (signed outer frames wrapping ``chunk`` events from the client;
``chunk`` events or ``exception`` messages back). It listens to the client's audio
with a crude energy detector and, at the end of each utterance, answers with a
scripted reply: a user transcript, optional tool use, speculative text, audio
chunks and the final transcript. Scripts can also make it refuse, fail with an AWS
exception, stall, drop the connection or send malformed events, and it records
every input event of every stream for assertions.

Use it from tests::

    with FakeBedrock() as fake:
        os.environ.update(fake.env)          # endpoint, CA, static credentials
        fake.script.push(StreamPlan(replies=[Reply(tool_name="current_time")]))
        ...
        fake.wait_for(lambda: len(fake.received) == 1)

or as a process for system tests and demos::

    python -m edgevoice_dev.testing.fake_bedrock --port 8443 --ca-dir /tmp/fakeca

It runs its own event loop in a background thread, so blocking tests and asyncio
tests can both use it. Nothing here checks SigV4 signatures beyond their presence.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import base64
import binascii
import collections
import contextlib
import json
import logging
import signal
import socket
import ssl
import sys
import tempfile
import threading
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edgevoice_dev.testing.eventstream import (
    EventStreamError,
    Message,
    MessageDecoder,
    decode_message,
    encode_message,
)
from edgevoice_dev.testing.tls import make_test_ca

logger = logging.getLogger(__name__)

KNOWN_MODELS = ("amazon.nova-2-sonic-v1:0", "amazon.nova-sonic-v1:0")
_PATH_PREFIX = "/model/"
_PATH_SUFFIX = "/invoke-with-bidirectional-stream"
#: An input frame counts as speech when any sample exceeds this magnitude.
SPEECH_THRESHOLD = 500
#: One 20 ms frame of the 16 kHz s16le input: the unit the fake's speech detector decides on.
FRAME_BYTES = 640

#: The error type Bedrock names for an HTTP status when a plan gives none.
_ERROR_TYPES = {
    400: "ValidationException",
    403: "AccessDeniedException",
    404: "ResourceNotFoundException",
    408: "ModelTimeoutException",
    429: "ThrottlingException",
    500: "InternalServerException",
    503: "ServiceUnavailableException",
}

After = Literal["model_timeout", "exception", "drop", "stall", "end"]


@dataclass
class Reply:
    """What the fake says when the user stops speaking."""

    user_text: str = "hello fake nova"
    assistant_text: str = "Hello from the fake Nova."
    audio_chunks: int = 3
    #: Samples per audio chunk (24 kHz): 2400 is 100 ms.
    chunk_samples: int = 2400
    #: Pause between audio chunks; > 0 leaves room for a barge-in.
    chunk_interval_s: float = 0.0
    #: Ask for this tool before speaking, and wait for its toolResult.
    tool_name: str | None = None
    tool_args: dict[str, Any] = field(default_factory=dict)
    #: After ``after_chunks`` audio chunks, do this instead of finishing the reply
    #: (``after_chunks=-1``: at once, before saying anything; ``after_chunks`` >=
    #: ``audio_chunks``: once the reply is complete).
    after: After | None = None
    after_chunks: int = 1
    #: Take the toolResult and never go on (a result Nova does not acknowledge).
    ignore_tool_result: bool = False
    #: For ``after="exception"``: the AWS exception type and message to send.
    exception_type: str = "ModelTimeoutException"
    exception_message: str = "Model has timed out in processing the request"
    #: How a barge-in is signalled: the JSON text marker, the stop reason, or both.
    barge_in_signal: Literal["both", "text", "stop_reason"] = "both"
    #: Send a burst of malformed and unknown events before the reply.
    malformed_first: bool = False
    #: Token counts this reply adds to the usage totals.
    input_tokens: int = 120
    output_tokens: int = 80


@dataclass
class StreamPlan:
    """How the fake treats one stream (one ``invoke`` call)."""

    #: Answer the request with this HTTP status and AWS error type instead of a stream.
    http_status: int = 200
    error_type: str | None = None
    error_message: str = ""
    #: Reset the HTTP/2 stream at once (REFUSED_STREAM), as an overloaded front end might.
    refuse: bool = False
    #: Wait this long before answering the request (a slow stream start).
    open_delay_s: float = 0.0
    #: Send this exception (type, message) right after the first input event.
    exception_on_start: tuple[str, str] | None = None
    #: Replies for successive utterances; then ``default_reply`` (None: stay silent).
    replies: list[Reply] = field(default_factory=list)
    default_reply: Reply | None = field(default_factory=Reply)
    #: Send completionStart/completionEnd around every reply (else once per stream).
    completion_per_reply: bool = True
    #: Silent input frames (20 ms each) that end an utterance. 300 ms: longer than the
    #: pauses between words (the bundled phrase has a 100 ms one), which a speech model's
    #: endpointing never takes for the end of a turn (Nova 2 waits 1.5-2 s); shorter
    #: than the device's hangover, so tests stay quick.
    end_of_speech_frames: int = 15


class Script:
    """The queue of stream plans; each new stream takes the next, else the default."""

    def __init__(self, default: StreamPlan | None = None) -> None:
        self.default = default or StreamPlan()
        self._plans: collections.deque[StreamPlan] = collections.deque()
        self._lock = threading.Lock()

    def push(self, *plans: StreamPlan) -> None:
        with self._lock:
            self._plans.extend(plans)

    def next_plan(self) -> StreamPlan:
        with self._lock:
            return self._plans.popleft() if self._plans else self.default


@dataclass
class ReceivedStream:
    """Everything one stream received, for assertions."""

    index: int
    model_id: str
    headers: dict[str, str]
    events: list[dict[str, Any]] = field(default_factory=list)
    #: Input that could not be decoded (framing, base64, JSON), described.
    errors: list[str] = field(default_factory=list)
    #: The client sent its signed empty frame (end of input events).
    end_frame: bool = False
    #: The HTTP/2 request body ended (the client closed its input stream).
    input_closed: bool = False
    #: Utterances the fake detected and answered.
    utterances: int = 0

    def names(self) -> list[str]:
        """The input event names in arrival order."""
        return [next(iter(e["event"])) for e in self.events if isinstance(e.get("event"), dict)]

    def bodies(self, name: str) -> list[dict[str, Any]]:
        return [e["event"][name] for e in self.events if name in e.get("event", {})]

    def audio(self) -> bytes:
        """All audioInput PCM, concatenated."""
        return b"".join(base64.b64decode(b["content"]) for b in self.bodies("audioInput"))

    def text_inputs(self) -> list[tuple[str, str]]:
        """(role, text) of every textInput, with the role of its contentStart."""
        roles: dict[str, str] = {}
        out: list[tuple[str, str]] = []
        for event in self.events:
            name, body = next(iter(event["event"].items()))
            if name == "contentStart":
                roles[body.get("contentName", "")] = body.get("role", "")
            elif name == "textInput":
                out.append((roles.get(body.get("contentName", ""), ""), body.get("content", "")))
        return out


def _is_speech(pcm: bytes) -> bool:
    if len(pcm) < 2:
        return False
    samples = array.array("h")
    samples.frombytes(pcm[: len(pcm) // 2 * 2])
    if sys.byteorder == "big":  # pragma: no cover - the wire is little-endian
        samples.byteswap()
    return max(abs(s) for s in samples) > SPEECH_THRESHOLD


def reply_chunk_pcm(index: int, samples: int) -> bytes:
    """The PCM of audio chunk ``index``: a constant level, so tests can tell chunks apart."""
    value = ((index % 60) + 1) * 500
    return value.to_bytes(2, "little", signed=True) * samples


class _Connection(asyncio.Protocol):
    """One client's HTTP/2 connection."""

    def __init__(self, server: FakeBedrock) -> None:
        import h2.config
        import h2.connection

        self.server = server
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        self.transport: asyncio.Transport | None = None
        self.handlers: dict[int, _StreamHandler] = {}
        self.window_open = asyncio.Event()
        self.closed = False

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server._connections.add(self)
        self._tune_socket()
        self.h2.initiate_connection()
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server._connections.discard(self)
        for handler in list(self.handlers.values()):
            handler.connection_lost()
        self.window_open.set()

    def data_received(self, data: bytes) -> None:
        import h2.events
        import h2.exceptions

        # QUICKACK is not sticky on Linux: re-arm it, or the CRT client's Nagle
        # plus our delayed ACKs add ~40 ms to every exchange.
        self._tune_socket(quickack_only=True)
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            logger.warning("fake bedrock: HTTP/2 protocol error: %s", exc)
            self.flush()
            self.abort()
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self._request(event.stream_id, event.headers or [])
            elif isinstance(event, h2.events.DataReceived):
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                handler = self.handlers.get(event.stream_id)
                if handler is not None and event.data:
                    handler.feed(event.data)
            elif isinstance(event, h2.events.StreamEnded):
                handler = self.handlers.get(event.stream_id)
                if handler is not None:
                    handler.input_ended()
            elif isinstance(event, h2.events.StreamReset):
                handler = self.handlers.pop(event.stream_id, None)
                if handler is not None:
                    handler.connection_lost()
            elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                self.window_open.set()
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.abort()
        self.flush()

    # -- helpers
    def _tune_socket(self, *, quickack_only: bool = False) -> None:
        sock = self.transport.get_extra_info("socket") if self.transport else None
        if sock is None:
            return
        with contextlib.suppress(OSError, AttributeError):
            if not quickack_only:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.closed:
            self.transport.write(data)

    def abort(self) -> None:
        """Drop the TCP connection without any goodbye (a network failure)."""
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def _request(self, stream_id: int, raw_headers: Iterable[tuple[Any, Any]]) -> None:
        headers = {str(k).lower(): str(v) for k, v in raw_headers}
        handler = _StreamHandler(self, stream_id, headers)
        self.handlers[stream_id] = handler
        handler.task = asyncio.get_running_loop().create_task(handler.run())

    async def send_data(self, stream_id: int, data: bytes, *, end_stream: bool = False) -> None:
        """Send ``data`` on ``stream_id``, waiting for HTTP/2 flow-control credit."""
        import h2.exceptions

        view = memoryview(data)
        while True:
            if self.closed:
                raise ConnectionError("connection closed")
            try:
                window = self.h2.local_flow_control_window(stream_id)
            except h2.exceptions.StreamClosedError as exc:
                raise ConnectionError("stream closed") from exc
            size = min(window, self.h2.max_outbound_frame_size, len(view))
            if size <= 0 and len(view) > 0:
                self.window_open.clear()
                await self.window_open.wait()
                continue
            last = size == len(view)
            self.h2.send_data(stream_id, bytes(view[:size]), end_stream=end_stream and last)
            self.flush()
            view = view[size:]
            if last:
                return


class _StreamHandler:
    """One bidirectional stream: decode input, run the conversation script."""

    def __init__(self, conn: _Connection, stream_id: int, headers: dict[str, str]) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.headers = headers
        self.server = conn.server
        self.plan = self.server.script.next_plan()
        path = urllib.parse.unquote(headers.get(":path", "").split("?")[0])
        logger.debug("fake bedrock: request %s", path)
        model_id = ""
        if path.startswith(_PATH_PREFIX) and path.endswith(_PATH_SUFFIX):
            model_id = path[len(_PATH_PREFIX) : -len(_PATH_SUFFIX)]
        self.record = self.server._new_record(model_id, headers)
        self.decoder = MessageDecoder()
        self.inbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None
        self.reply_task: asyncio.Task[None] | None = None
        self.barged_in = asyncio.Event()
        self.tool_results: dict[str, asyncio.Future[str]] = {}
        self.prompt_name = ""
        self.session_id = str(uuid.uuid4())
        self.completion_id = ""
        self.ended = False
        self.usage = [0, 0]
        self.replies = collections.deque(self.plan.replies)

    # -- input side (called from the protocol)
    def feed(self, data: bytes) -> None:
        try:
            messages = list(self.decoder.feed(data))
        except EventStreamError as exc:
            self._error(f"framing: {exc}")
            return
        for outer in messages:
            if not outer.payload:
                self.record.end_frame = True
                continue
            try:
                inner = decode_message(outer.payload)
                chunk = json.loads(inner.payload)
                raw = base64.b64decode(chunk["bytes"], validate=True)
                event = json.loads(raw)
            except (EventStreamError, ValueError, KeyError, TypeError, binascii.Error) as exc:
                self._error(f"chunk: {exc!r}")
                continue
            if not isinstance(event, dict) or not isinstance(event.get("event"), dict):
                self._error("event is not {'event': {...}}")
                continue
            self.record.events.append(event)
            self.server._notify()
            self.inbox.put_nowait(event)

    def input_ended(self) -> None:
        self.record.input_closed = True
        self.server._notify()
        self.inbox.put_nowait(None)

    def connection_lost(self) -> None:
        self.ended = True
        self.inbox.put_nowait(None)
        for future in self.tool_results.values():
            if not future.done():
                future.cancel()

    def _error(self, what: str) -> None:
        logger.debug("fake bedrock: stream %d: %s", self.record.index, what)
        self.record.errors.append(what)
        self.server._notify()

    # -- output side
    async def _send_headers(self, status: int, extra: dict[str, str] | None = None) -> None:
        headers = [(":status", str(status)), ("x-amzn-requestid", str(uuid.uuid4()))]
        headers += list((extra or {}).items())
        self.conn.h2.send_headers(self.stream_id, headers)
        self.conn.flush()

    async def emit(self, name: str, body: dict[str, Any]) -> None:
        """Send one Nova output event as a ``chunk``."""
        payload = json.dumps({"event": {name: body}}).encode()
        await self.emit_raw(payload)

    async def emit_raw(self, event_json: bytes, *, event_type: str = "chunk") -> None:
        chunk = json.dumps({"bytes": base64.b64encode(event_json).decode()}).encode()
        message = Message(
            headers={
                ":message-type": "event",
                ":event-type": event_type,
                ":content-type": "application/json",
            },
            payload=chunk,
        )
        await self.conn.send_data(self.stream_id, encode_message(message))

    async def emit_exception(self, exception_type: str, text: str) -> None:
        """Send an AWS exception message and end the stream, as Bedrock does."""
        # The header names the member of the output union: "modelTimeoutException".
        member = exception_type[:1].lower() + exception_type[1:]
        message = Message(
            headers={
                ":message-type": "exception",
                ":exception-type": member,
                ":content-type": "application/json",
            },
            payload=json.dumps({"message": text}).encode(),
        )
        await self.conn.send_data(self.stream_id, encode_message(message), end_stream=True)
        self.ended = True

    async def end_stream(self) -> None:
        if not self.ended:
            self.ended = True
            await self.conn.send_data(self.stream_id, b"", end_stream=True)

    # -- the conversation
    async def run(self) -> None:
        try:
            await self._run()
        except ConnectionError:
            pass
        except Exception:
            logger.exception("fake bedrock: stream handler failed")
            self.conn.abort()
        finally:
            if self.reply_task is not None:
                self.reply_task.cancel()

    async def _run(self) -> None:
        import h2.errors

        plan = self.plan
        if plan.refuse:
            self.conn.h2.reset_stream(self.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            self.conn.flush()
            return
        if plan.open_delay_s > 0:
            await asyncio.sleep(plan.open_delay_s)
        if plan.http_status != 200 or plan.error_type:
            await self._send_error(plan.http_status, plan.error_type, plan.error_message)
            return
        if self.record.model_id not in self.server.known_models:
            await self._send_error(
                400, "ValidationException", "The provided model identifier is invalid."
            )
            return
        if self.server.require_auth and "authorization" not in self.headers:
            await self._send_error(403, "AccessDeniedException", "Missing Authentication Token")
            return
        await self._send_headers(200, {"content-type": "application/vnd.amazon.eventstream"})

        first = True
        in_speech = False
        silent_frames = 0
        while True:
            event = await self.inbox.get()
            if event is None:
                break
            name, body = next(iter(event["event"].items()))
            if first and plan.exception_on_start is not None:
                await self.emit_exception(*plan.exception_on_start)
                return
            first = False
            if name == "promptStart":
                self.prompt_name = str(body.get("promptName", ""))
            elif name == "audioInput":
                try:
                    pcm = base64.b64decode(body.get("content", ""), validate=True)
                except (binascii.Error, ValueError):
                    self._error("audioInput is not base64")
                    continue
                # Nova hears a stream of audio: an event may carry one 20 ms frame or
                # several (speech and then silence), so decide frame by frame.
                for start in range(0, len(pcm), FRAME_BYTES):
                    if _is_speech(pcm[start:start + FRAME_BYTES]):
                        in_speech, silent_frames = True, 0
                        if self._replying():
                            self.barged_in.set()
                    elif in_speech:
                        silent_frames += 1
                        if silent_frames >= plan.end_of_speech_frames:
                            in_speech = False
                            self._utterance_ended()
            elif name == "toolResult":
                self._tool_result(body)
            elif name == "sessionEnd":
                # Ending the response before the request body would make the CRT
                # client fail its own final write: wait for the client's end.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2.0):
                        while await self.inbox.get() is not None:
                            pass
                break
        # The client ended the session (or its input): finish like Bedrock does.
        if self.reply_task is not None and not self.reply_task.done():
            self.reply_task.cancel()
        if not self.ended and not self.conn.closed:
            if self.completion_id:
                await self._completion_end("END_TURN")
            await self.end_stream()

    async def _send_error(self, status: int, error_type: str | None, text: str) -> None:
        error_type = error_type or _ERROR_TYPES.get(status, "InternalServerException")
        extra = {"content-type": "application/json", "x-amzn-errortype": error_type}
        await self._send_headers(status, extra)
        body = json.dumps({"message": text or error_type or "error"}).encode()
        await self.conn.send_data(self.stream_id, body, end_stream=True)
        self.ended = True

    def _replying(self) -> bool:
        return self.reply_task is not None and not self.reply_task.done()

    def _utterance_ended(self) -> None:
        if self._replying():
            return
        reply = self.replies.popleft() if self.replies else self.plan.default_reply
        if reply is None:
            return
        self.record.utterances += 1
        self.server._notify()
        self.barged_in.clear()
        self.reply_task = asyncio.get_running_loop().create_task(self._reply_guarded(reply))

    def _tool_result(self, body: dict[str, Any]) -> None:
        # The toolUseId sits on the contentStart that opened this content.
        content_name = body.get("contentName")
        tool_use_id = ""
        for event in reversed(self.record.events):
            start = event["event"].get("contentStart")
            if start and start.get("contentName") == content_name:
                tool_use_id = start.get("toolResultInputConfiguration", {}).get("toolUseId", "")
                break
        future = self.tool_results.get(tool_use_id)
        if future is not None and not future.done():
            future.set_result(str(body.get("content", "")))
        else:
            self._error(f"toolResult for unknown toolUseId {tool_use_id!r}")

    async def _reply_guarded(self, reply: Reply) -> None:
        with contextlib.suppress(ConnectionError):
            await self._reply(reply)

    def _ids(self, content_id: str) -> dict[str, str]:
        return {
            "sessionId": self.session_id,
            "promptName": self.prompt_name,
            "completionId": self.completion_id,
            "contentId": content_id,
        }

    async def _content(
        self,
        kind: str,
        role: str,
        stage: str | None,
        events: list[tuple[str, dict[str, Any]]],
        stop_reason: str,
        extra: dict[str, Any] | None = None,
    ) -> str:
        content_id = str(uuid.uuid4())
        start = {**self._ids(content_id), "type": kind, "role": role, **(extra or {})}
        if stage is not None:
            start["additionalModelFields"] = json.dumps({"generationStage": stage})
        await self.emit("contentStart", start)
        for name, body in events:
            await self.emit(name, {**self._ids(content_id), **body})
        await self.emit(
            "contentEnd", {**self._ids(content_id), "type": kind, "stopReason": stop_reason}
        )
        return content_id

    async def _completion_start(self) -> None:
        self.completion_id = str(uuid.uuid4())
        await self.emit(
            "completionStart",
            {
                "sessionId": self.session_id,
                "promptName": self.prompt_name,
                "completionId": self.completion_id,
            },
        )

    async def _completion_end(self, stop_reason: str) -> None:
        await self.emit(
            "completionEnd",
            {
                "sessionId": self.session_id,
                "promptName": self.prompt_name,
                "completionId": self.completion_id,
                "stopReason": stop_reason,
            },
        )
        self.completion_id = ""

    async def _usage(self, reply: Reply) -> None:
        self.usage[0] += reply.input_tokens
        self.usage[1] += reply.output_tokens
        await self.emit(
            "usageEvent",
            {
                "sessionId": self.session_id,
                "promptName": self.prompt_name,
                "completionId": self.completion_id,
                "totalInputTokens": self.usage[0],
                "totalOutputTokens": self.usage[1],
                "totalTokens": sum(self.usage),
            },
        )

    async def _malformed_burst(self) -> None:
        await self.emit_raw(b"this is not json")
        await self.emit_raw(b'{"event": {"contentStart": "not an object"}}')
        await self.emit_raw(b'{"event": {"audioOutput": {"contentId": "x", "content": "@@@"}}}')
        await self.emit_raw(b'{"event": {"textOutput": {"contentId": 7}}}')
        await self.emit("futureEventKind", {"whatever": True})
        await self.emit_raw(b"[1, 2, 3]")

    async def _reply(self, reply: Reply) -> None:
        if reply.after is not None and reply.after_chunks < 0:
            await self._misbehave(reply)
            return
        if reply.malformed_first:
            await self._malformed_burst()
        if self.plan.completion_per_reply or not self.completion_id:
            await self._completion_start()
        await self._content(
            "TEXT",
            "USER",
            "FINAL",
            [("textOutput", {"role": "USER", "content": reply.user_text})],
            "END_TURN",
        )
        if reply.tool_name is not None:
            tool_use_id = str(uuid.uuid4())
            future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            self.tool_results[tool_use_id] = future
            await self._content(
                "TOOL",
                "TOOL",
                None,
                [
                    (
                        "toolUse",
                        {
                            "toolName": reply.tool_name,
                            "toolUseId": tool_use_id,
                            "content": json.dumps(reply.tool_args),
                        },
                    )
                ],
                "TOOL_USE",
                {"toolUseOutputConfiguration": {"mediaType": "application/json"}},
            )
            await future
            if reply.ignore_tool_result:
                await asyncio.Event().wait()  # until the client gives up and resets
        await self._content(
            "TEXT",
            "ASSISTANT",
            "SPECULATIVE",
            [("textOutput", {"role": "ASSISTANT", "content": reply.assistant_text})],
            "PARTIAL_TURN",
        )
        audio_id = str(uuid.uuid4())
        await self.emit(
            "contentStart",
            {
                **self._ids(audio_id),
                "type": "AUDIO",
                "role": "ASSISTANT",
                "additionalModelFields": json.dumps({"generationStage": "FINAL"}),
                "audioOutputConfiguration": {
                    "mediaType": "audio/lpcm",
                    "sampleRateHertz": 24000,
                    "sampleSizeBits": 16,
                    "channelCount": 1,
                },
            },
        )
        stop_reason = "END_TURN"
        for index in range(reply.audio_chunks):
            if reply.after is not None and index == reply.after_chunks:
                await self._misbehave(reply)
                return
            if self.barged_in.is_set():
                stop_reason = "INTERRUPTED"
                break
            pcm = reply_chunk_pcm(index, reply.chunk_samples)
            await self.emit(
                "audioOutput",
                {**self._ids(audio_id), "content": base64.b64encode(pcm).decode()},
            )
            if reply.chunk_interval_s > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.barged_in.wait(), reply.chunk_interval_s)
        if stop_reason == "INTERRUPTED" and reply.barge_in_signal in ("both", "text"):
            await self._content(
                "TEXT",
                "ASSISTANT",
                "SPECULATIVE",
                [("textOutput", {"role": "ASSISTANT", "content": '{ "interrupted" : true }'})],
                "PARTIAL_TURN",
            )
        audio_stop = stop_reason
        if stop_reason == "INTERRUPTED" and reply.barge_in_signal == "text":
            audio_stop = "PARTIAL_TURN"
        await self.emit(
            "contentEnd", {**self._ids(audio_id), "type": "AUDIO", "stopReason": audio_stop}
        )
        await self._content(
            "TEXT",
            "ASSISTANT",
            "FINAL",
            [("textOutput", {"role": "ASSISTANT", "content": reply.assistant_text})],
            stop_reason,
        )
        await self._usage(reply)
        if self.plan.completion_per_reply:
            await self._completion_end(stop_reason)
        if reply.after is not None and reply.after_chunks >= reply.audio_chunks:
            await self._misbehave(reply)

    async def _misbehave(self, reply: Reply) -> None:
        if reply.after == "model_timeout":
            await self.emit_exception("ModelTimeoutException", reply.exception_message)
        elif reply.after == "exception":
            await self.emit_exception(reply.exception_type, reply.exception_message)
        elif reply.after == "drop":
            self.conn.abort()
        elif reply.after == "stall":
            await asyncio.Event().wait()  # until the client gives up and resets
        elif reply.after == "end":
            # A clean-looking end without completionEnd: the stream was lost.
            await self.end_stream()


class FakeBedrock:
    """The fake endpoint, in a background thread. A context manager.

    ``endpoint_url``, ``ca_file`` and ``env`` (endpoint, CA bundle, static test
    credentials, region, AWS config files disabled) are ready after ``start()``.
    ``script`` decides how each new stream behaves; ``received`` lists what every
    stream got, in order of arrival.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ca_dir: str | Path | None = None,
        script: Script | None = None,
        known_models: tuple[str, ...] = KNOWN_MODELS,
        require_auth: bool = True,
    ) -> None:
        self.host = host
        self.port = port
        self.script = script or Script()
        self.known_models = known_models
        self.require_auth = require_auth
        self.received: list[ReceivedStream] = []
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if ca_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="fake-bedrock-")
            ca_dir = self._tmp.name
        self.certs = make_test_ca(ca_dir)
        self._cond = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None

    # -- lifecycle
    def __enter__(self) -> FakeBedrock:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._thread_main, name="fake-bedrock", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            raise self._startup_error

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self.certs.cert_file, self.certs.key_file)
            context.set_alpn_protocols(["h2"])
            self._server = loop.run_until_complete(
                loop.create_server(lambda: _Connection(self), self.host, self.port, ssl=context)
            )
            sock = self._server.sockets[0]
            self.port = sock.getsockname()[1]
        except BaseException as exc:
            self._startup_error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            self._server.close()
            for conn in list(self._connections):
                conn.abort()
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(self._server.wait_closed())
            loop.close()

    # -- what tests use
    @property
    def endpoint_url(self) -> str:
        return f"https://{self.host}:{self.port}"

    @property
    def ca_file(self) -> Path:
        return self.certs.ca_file

    @property
    def env(self) -> dict[str, str]:
        """Environment that points the AWS SDK here with static test credentials."""
        return {
            "AWS_ENDPOINT_URL_BEDROCK_RUNTIME": self.endpoint_url,
            "SSL_CERT_FILE": str(self.ca_file),
            "AWS_CA_BUNDLE": str(self.ca_file),
            "AWS_ACCESS_KEY_ID": "AKIDEDGEVOICETEST",
            "AWS_SECRET_ACCESS_KEY": "edgevoice-test-secret",
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": "/dev/null",
            "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        }

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Block until ``predicate()`` holds (checked on every received event)."""
        with self._cond:
            if not self._cond.wait_for(predicate, timeout):
                raise TimeoutError(f"fake bedrock: condition not met in {timeout} s")

    async def wait_for_async(self, predicate: Callable[[], bool], within_s: float = 10.0) -> None:
        """:meth:`wait_for` for asyncio tests (waits in a worker thread)."""
        await asyncio.to_thread(self.wait_for, predicate, within_s)

    def drop_connections(self) -> None:
        """Abort every client connection now, as a network failure would."""
        loop = self._loop
        if loop is None:
            return
        done = threading.Event()

        def _drop() -> None:
            for conn in list(self._connections):
                conn.abort()
            done.set()

        loop.call_soon_threadsafe(_drop)
        done.wait(5)

    # -- internals
    def _new_record(self, model_id: str, headers: dict[str, str]) -> ReceivedStream:
        with self._cond:
            record = ReceivedStream(len(self.received), model_id, headers)
            self.received.append(record)
            self._cond.notify_all()
            return record

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify_all()


def iter_env_lines(fake: FakeBedrock) -> Iterator[str]:
    """``export`` lines a shell can eval to use the fake."""
    for key, value in fake.env.items():
        yield f"export {key}={value}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m edgevoice_dev.testing.fake_bedrock",
        description="Run a fake Nova Sonic (Bedrock bidirectional streaming) endpoint.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--ca-dir", required=True, help="where the throwaway CA is kept")
    parser.add_argument("--reply-text", default=Reply.assistant_text)
    parser.add_argument("--audio-chunks", type=int, default=10)
    parser.add_argument("--chunk-interval", type=float, default=0.02)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO)

    reply = Reply(
        assistant_text=args.reply_text,
        audio_chunks=args.audio_chunks,
        chunk_interval_s=args.chunk_interval,
    )
    fake = FakeBedrock(
        host=args.host,
        port=args.port,
        ca_dir=args.ca_dir,
        script=Script(StreamPlan(default_reply=reply)),
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with fake:
        # One JSON line on stdout: what a parent process needs to use this server.
        print(json.dumps({"endpoint_url": fake.endpoint_url, "env": fake.env}), flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
