"""The two peers of the bandwidth comparison, streaming the same speech over real TCP.

* **Wyoming**: raw 16 kHz PCM in ``audio-chunk`` events, written by the real
  ``wyoming`` package's event writer (the wire format wyoming-satellite streams) to
  a server that reads them back with the same package. Chunks of
  :data:`WYOMING_SAMPLES_PER_CHUNK` samples, wyoming-satellite's default.
* **Nova JSON**: each chunk of 16 kHz PCM base64-encoded in a JSON ``audioInput``
  event, one WebSocket text message per chunk, the shape the Nova Sonic sample
  applications send from the browser to their server.

Both peers stream continuously for as long as the audio lasts (that is what they
do while listening): unlike edgevoice they have no silence gate. Byte counts are
independent of pacing, so the peers are sent as fast as the receiver reads.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import uuid
import warnings
from dataclasses import asdict, dataclass
from typing import Any

from edgevoice.audio.base import CAPTURE_RATE_HZ, SAMPLE_WIDTH_BYTES
from edgevoice_dev.bench.wire import OPCODE_TEXT, CountingProxy, client_frame_bytes

logger = logging.getLogger(__name__)

#: wyoming-satellite's default microphone chunk (``--mic-samples-per-chunk``): 64 ms.
WYOMING_SAMPLES_PER_CHUNK = 1024
#: Chunk of the Nova Sonic samples' browser capture: 512 samples, 32 ms at 16 kHz.
NOVA_SAMPLES_PER_CHUNK = 512


@dataclass
class PeerBytes:
    """What one protocol put on the wire, client to server, for the same audio."""

    name: str
    transport: str
    chunk_ms: float
    chunks: int
    audio_s: float
    #: everything the client sent on the connection, handshake included
    session_bytes: int
    #: the part that carried audio (per-chunk framing and headers included)
    audio_bytes: int

    @property
    def streaming_bps(self) -> float:
        """Bytes per second of audio streamed."""
        return self.audio_bytes / self.audio_s if self.audio_s else 0.0

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["streaming_bytes_per_s"] = round(self.streaming_bps, 1)
        return data


def _chunks(pcm: bytes, samples: int) -> list[bytes]:
    step = samples * SAMPLE_WIDTH_BYTES
    return [pcm[i:i + step] for i in range(0, len(pcm), step)]


async def wyoming_bytes(pcm: bytes) -> PeerBytes:
    """Stream ``pcm`` (16 kHz mono s16le) as Wyoming events through a counting proxy."""
    with warnings.catch_warnings():
        # wyoming 1.10 imports the stdlib's deprecated audioop; not ours to fix
        warnings.simplefilter("ignore", DeprecationWarning)
        from wyoming.audio import AudioChunk, AudioStart, AudioStop
    from wyoming.client import AsyncTcpClient
    from wyoming.event import async_read_event

    received = {"chunks": 0, "audio": 0}
    done = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while (event := await async_read_event(reader)) is not None:
                if AudioChunk.is_type(event.type):
                    received["chunks"] += 1
                    received["audio"] += len(event.payload or b"")
                elif AudioStop.is_type(event.type):
                    break
        finally:
            writer.close()
            done.set()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    proxy = CountingProxy(int(server.sockets[0].getsockname()[1]))
    port = await proxy.start()
    chunks = _chunks(pcm, WYOMING_SAMPLES_PER_CHUNK)
    try:
        client = AsyncTcpClient("127.0.0.1", port)
        await client.connect()
        fmt = {"rate": CAPTURE_RATE_HZ, "width": SAMPLE_WIDTH_BYTES, "channels": 1}
        await client.write_event(AudioStart(**fmt, timestamp=0).event())
        timestamp_ms = 0
        for chunk in chunks:
            await client.write_event(AudioChunk(**fmt, audio=chunk, timestamp=timestamp_ms).event())
            timestamp_ms += len(chunk) * 1000 // (CAPTURE_RATE_HZ * SAMPLE_WIDTH_BYTES)
        await client.write_event(AudioStop(timestamp=timestamp_ms).event())
        await asyncio.wait_for(done.wait(), 30)
        await client.disconnect()
    finally:
        await proxy.close()
        server.close()
        await server.wait_closed()
    if received["audio"] != len(pcm):
        raise RuntimeError(f"wyoming peer: {received['audio']} of {len(pcm)} audio bytes arrived")
    session = proxy.up_bytes
    # audio-start and audio-stop are the whole overhead that is not per chunk.
    overhead = _wyoming_event_size(AudioStart(**fmt, timestamp=0).event()) + \
        _wyoming_event_size(AudioStop(timestamp=timestamp_ms).event())
    return PeerBytes("wyoming", "TCP, JSON header + raw PCM payload per event",
                     1000 * WYOMING_SAMPLES_PER_CHUNK / CAPTURE_RATE_HZ, len(chunks),
                     len(pcm) / (CAPTURE_RATE_HZ * SAMPLE_WIDTH_BYTES), session,
                     session - overhead)


def _wyoming_event_size(event: Any) -> int:
    """Bytes the wyoming writer puts on the wire for ``event`` (written to a buffer)."""
    from wyoming.event import write_event

    class _Sink:
        size = 0

        def writelines(self, parts: Any) -> None:
            self.size += sum(len(p) for p in parts)

        def write(self, data: bytes) -> None:
            self.size += len(data)

        def flush(self) -> None:
            pass

    sink = _Sink()
    write_event(event, sink)  # type: ignore[arg-type]
    return sink.size


async def nova_json_bytes(pcm: bytes, *, deflate: bool = False) -> PeerBytes:
    """Stream ``pcm`` as base64 JSON ``audioInput`` events over a WebSocket."""
    from websockets.asyncio.client import connect
    from websockets.asyncio.server import ServerConnection, serve

    received = {"messages": 0, "audio": 0}
    done = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        async for message in ws:
            event = json.loads(message)["event"]
            if "audioInput" in event:
                received["messages"] += 1
                received["audio"] += len(base64.b64decode(event["audioInput"]["content"]))
            elif "contentEnd" in event:
                break
        done.set()

    compression = "deflate" if deflate else None
    chunks = _chunks(pcm, NOVA_SAMPLES_PER_CHUNK)
    async with serve(handler, "127.0.0.1", 0, compression=compression, max_size=None) as server:
        target = int(next(iter(server.sockets)).getsockname()[1])
        proxy = CountingProxy(target, websocket=True)
        port = await proxy.start()
        try:
            prompt, content = str(uuid.uuid4()), str(uuid.uuid4())
            opening = json.dumps({"event": {"contentStart": {
                "promptName": prompt, "contentName": content, "type": "AUDIO",
                "interactive": True, "role": "USER", "audioInputConfiguration": {
                    "mediaType": "audio/lpcm", "sampleRateHertz": CAPTURE_RATE_HZ,
                    "sampleSizeBits": 16, "channelCount": 1, "audioType": "SPEECH",
                    "encoding": "base64"}}}})
            closing = json.dumps({"event": {"contentEnd": {
                "promptName": prompt, "contentName": content}}})
            async with connect(f"ws://127.0.0.1:{port}/", compression=compression,
                               max_size=None, proxy=None) as ws:
                await ws.send(opening)
                for chunk in chunks:
                    await ws.send(json.dumps({"event": {"audioInput": {
                        "promptName": prompt, "contentName": content,
                        "content": base64.b64encode(chunk).decode("ascii")}}}))
                await ws.send(closing)
                await asyncio.wait_for(done.wait(), 30)
        finally:
            await proxy.close()
    if received["audio"] != len(pcm):
        raise RuntimeError(f"nova peer: {received['audio']} of {len(pcm)} audio bytes arrived")
    conn = proxy.connections[0]
    assert conn.up is not None
    # Every text message but the opening and the closing one carries audio. (With
    # deflate those two are smaller than their plain size: a few bytes too few.)
    overhead = client_frame_bytes(len(opening)) + client_frame_bytes(len(closing))
    audio_bytes = conn.up.tally(OPCODE_TEXT).wire_bytes - overhead
    name = "nova-json+deflate" if deflate else "nova-json"
    transport = "WebSocket, base64 PCM in JSON text messages" + (
        ", permessage-deflate" if deflate else "")
    return PeerBytes(name, transport, 1000 * NOVA_SAMPLES_PER_CHUNK / CAPTURE_RATE_HZ,
                     len(chunks), len(pcm) / (CAPTURE_RATE_HZ * SAMPLE_WIDTH_BYTES),
                     conn.up_bytes, audio_bytes)
