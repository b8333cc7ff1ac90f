"""One served request on the engine, and the bodies it is sent as: streamed PCM / WAV, SSE events, or whole files.

A Generation reads its AsyncCall's events, keeps the request's metrics (time to first audio, audio seconds,
real-time factor, how it ended) and its usage (tokens in and out), and closes the call however it ends: a client
that leaves mid-stream cancels the body, which aborts the request before the core's next step.
"""
from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np

from vivace.async_engine import AsyncCall
from vivace.engine import assemble
from vivace.errors import VivaceError
from vivace.events import AudioChunk, StageProgress, WindowStarted
from vivace.server.audio_formats import AudioFormat, encode_whole, pcm16, wav_header
from vivace.server.metrics import ServerMetrics


class Generation:
    def __init__(self, call: AsyncCall, metrics: ServerMetrics, sample_rate: int, arrived: float) -> None:
        self.call = call
        self.metrics = metrics
        self.sample_rate = sample_rate
        self.arrived = arrived  # time.perf_counter() when the request arrived
        self.first_audio_s: float | None = None
        self.audio_samples = 0
        self.input_tokens = 0
        self._output_tokens: dict[str, int] = {}
        self._first_stage: str | None = None
        self.ended: str | None = None

    @property
    def usage(self) -> dict[str, int]:
        output = sum(self._output_tokens.values())
        return {"input_tokens": self.input_tokens, "output_tokens": output, "total_tokens": self.input_tokens + output}

    async def chunks(self) -> AsyncIterator[AudioChunk]:
        """The call's audio chunks in order per row, as they are decoded."""
        try:
            async for event in self.call:
                if isinstance(event, AudioChunk):
                    self._audio(event)
                    yield event
                elif isinstance(event, StageProgress):
                    self._output_tokens[event.stage] = event.done
                elif isinstance(event, WindowStarted):
                    self._first_stage = self._first_stage or event.stage
                    if event.index == 0 and event.stage == self._first_stage:
                        self.input_tokens += len(event.condition)  # each row's conditioning tokens, counted once
        except VivaceError:
            self._end("error")
            raise
        except BaseException:  # cancelled: the client left, or the server is shutting down
            self._end("aborted")
            raise
        finally:
            self.call.close()
        self._end("done")

    def _audio(self, chunk: AudioChunk) -> None:
        if self.first_audio_s is None:
            self.first_audio_s = time.perf_counter() - self.arrived
            self.metrics.first_audio.observe(self.first_audio_s)
        self.audio_samples += len(chunk.pcm)
        self.metrics.audio_seconds.inc(len(chunk.pcm) / self.sample_rate)

    def _end(self, reason: str) -> None:
        if self.ended is not None:
            return
        self.ended = reason
        self.metrics.finished.labels(reason).inc()
        if reason == "done" and self.audio_samples:
            self.metrics.real_time_factor.observe((time.perf_counter() - self.arrived) / (self.audio_samples / self.sample_rate))

    def close(self) -> None:
        """Ends a generation whose body was never read (the response failed before it started)."""
        self.call.close()
        self._end("aborted")


async def audio_body(generation: Generation, fmt: AudioFormat) -> AsyncIterator[bytes]:
    """Raw 16-bit PCM, or a WAV with a streaming header, chunk by chunk. A request that fails mid-stream breaks the
    connection (no terminating chunk), so a client never takes a cut-off stream for a whole one."""
    if fmt.name == "wav":
        yield wav_header(generation.sample_rate)
    async for chunk in generation.chunks():
        yield pcm16(chunk.pcm)


async def sse_body(generation: Generation, fmt: AudioFormat, event_prefix: str) -> AsyncIterator[bytes]:
    """Server-sent events: `<prefix>.delta` with base64 audio (and the row's index), then `<prefix>.done` with the
    usage; a failure mid-stream is an `error` event in OpenAI's error shape."""
    header = wav_header(generation.sample_rate) if fmt.name == "wav" else b""
    try:
        async for chunk in generation.chunks():
            audio = base64.b64encode(header + pcm16(chunk.pcm)).decode()
            header = b""
            yield sse({"type": f"{event_prefix}.delta", "audio": audio, "index": chunk.row})
    except VivaceError as error:
        message = " ".join(str(error).split())
        yield sse({"type": "error", "error": {"message": message, "type": "server_error", "param": None, "code": None}})
        return
    yield sse({"type": f"{event_prefix}.done", "usage": generation.usage})


def sse(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


async def whole_clips(generation: Generation) -> np.ndarray:
    """Every row's whole clip, float32 [rows, samples]."""
    return assemble([chunk async for chunk in generation.chunks()])


def whole_json(clips: np.ndarray, seeds: list[int], fmt: AudioFormat, sample_rate: int, usage: dict[str, int]) -> dict[str, Any]:
    """Several clips in one answer: each in the format, base64."""
    data = [
        {"index": row, "seed": seed, "format": fmt.name, "audio": base64.b64encode(encode_whole(fmt, clip, sample_rate)).decode()}
        for row, (seed, clip) in enumerate(zip(seeds, clips))
    ]
    return {"object": "list", "data": data, "sample_rate": sample_rate, "usage": usage}
