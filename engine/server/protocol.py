"""What clients send and get back: the request bodies (OpenAI's speech request and vivace's native one), the error
shape OpenAI's clients read, and the translation of a body into an engine call."""
from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, StrictInt, ValidationError

from vivace.arguments import Story


class ApiError(Exception):
    """An answer other than 2xx, in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
        code: str | None = None, headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = " ".join(message.split())  # one line, whatever the source said
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error(error: ValidationError) -> ApiError:
    """pydantic's first complaint as one 422 line naming the field."""
    first = error.errors()[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    return ApiError(422, f"{param}: {first['msg']}" if param else first["msg"], param=param, code="invalid_value")


class Sampling(BaseModel):
    """vivace's sampling fields (None: the pack's defaults)."""

    model_config = ConfigDict(extra="forbid")

    temperature: float | None = None
    top_k: StrictInt | None = None
    top_p: float | None = None
    guidance_scale: float | None = None  # MusicGen packs, and MusicLM packs with a guided stage


class SpeechRequest(Sampling):
    """OpenAI's POST /v1/audio/speech body, with vivace's own fields beside it."""

    model: str
    input: str
    voice: str | dict[str, Any] | None = None  # accepted for compatibility; music has no voice
    response_format: str = "wav"
    speed: float = 1.0
    stream_format: Literal["audio", "sse"] = "audio"
    duration: float | None = None
    seed: StrictInt = 0


class MusicRequest(Sampling):
    """POST /v1/music/generations: a prompt, a story or (MusicGen) no text at all, one clip per seed, a melody
    reference for melody packs, an audio prompt to continue (MusicGen packs with EnCodec's encoder)."""

    model: str | None = None
    prompt: str | None = None
    unconditional: bool = False  # MusicGen: no prompt and no segments, the null text condition
    segments: list[tuple[str, float]] | None = None  # a story: (prompt, seconds) played in order
    duration: float | None = None
    seed: StrictInt | list[StrictInt] = 0
    stage_sampling: dict[str, Sampling] | None = None  # MusicLM packs: per-stage temperature / top_k / top_p
    melody: str | None = None  # base64 of a sound file (WAV, FLAC, ...), or sent as a multipart file
    audio_prompt: str | None = None  # the same; the clip continues it and begins with it (duration counts it)
    negative_prompt: str | None = None  # the text guidance's null row reads (MusicGen, guided MusicLM)
    response_format: str = "wav"
    stream: bool = False
    stream_format: Literal["audio", "sse"] = "audio"


@dataclass(frozen=True)
class Limits:
    """The server's limits on one request."""

    max_duration_s: float
    default_duration_s: float
    max_prompt_chars: int


@dataclass
class EngineCall:
    """A request body as AsyncEngine.submit_async's arguments: one row (clip) per seed."""

    prompt: str | Story | None
    duration_s: float | None
    seeds: list[int]
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return len(self.seeds)

    def arguments(self) -> tuple[Any, float | None, int | list[int]]:
        """(prompt, duration_s, seed) as the engine takes them: the prompt repeated once per seed."""
        if self.rows == 1:
            return self.prompt, self.duration_s, self.seeds[0]
        return [self.prompt] * self.rows, self.duration_s, self.seeds


def sampling_options(body: Sampling) -> dict[str, Any]:
    return {key: value for key, value in body.model_dump(include=set(Sampling.model_fields)).items() if value is not None}


def check_duration(duration: float | None, limits: Limits) -> float:
    seconds = limits.default_duration_s if duration is None else duration
    if not seconds > 0:
        raise ApiError(400, f"duration must be > 0 seconds, got {duration}", param="duration")
    if seconds > limits.max_duration_s:
        raise ApiError(400, f"duration of {seconds} s exceeds this server's limit of {limits.max_duration_s} s", param="duration")
    return seconds


def check_prompt_length(text: str, limits: Limits, param: str) -> None:
    if len(text) > limits.max_prompt_chars:
        raise ApiError(400, f"{param} has {len(text)} characters; this server takes at most {limits.max_prompt_chars}", param=param)


def speech_call(body: SpeechRequest, limits: Limits) -> EngineCall:
    if body.speed != 1.0:
        raise ApiError(400, f"speed must be 1.0 (music is generated at its own tempo), got {body.speed}", param="speed")
    check_prompt_length(body.input, limits, "input")
    return EngineCall(body.input, check_duration(body.duration, limits), [body.seed], sampling_options(body))


UPLOADS = ("melody", "audio_prompt")  # sound files a native request may carry, in JSON as base64 or as multipart files


def music_call(body: MusicRequest, limits: Limits, uploads: dict[str, bytes]) -> EngineCall:
    """uploads: the sound files sent as multipart files, by field name (UPLOADS)."""
    texts = sum(value is not None for value in (body.prompt, body.segments)) + body.unconditional
    if texts != 1:
        raise ApiError(400, "give one of prompt, segments (a story) or unconditional true", param="prompt")
    seeds = body.seed if isinstance(body.seed, list) else [body.seed]
    if not seeds:
        raise ApiError(400, "seed must be an integer or a non-empty list of them", param="seed")
    options = sampling_options(body)
    if body.stage_sampling is not None:
        options["stage_sampling"] = {stage: sampling_options(params) for stage, params in body.stage_sampling.items()}
    if body.negative_prompt is not None:
        check_prompt_length(body.negative_prompt, limits, "negative_prompt")
        options["negative_prompt"] = body.negative_prompt
    for name in UPLOADS:
        data = uploaded(name, getattr(body, name), uploads.get(name))
        if data is not None:
            options[name], options[f"{name}_sample_rate"] = decode_sound(data, name)
    if body.unconditional:
        prompt, duration = None, check_duration(body.duration, limits)
    elif body.segments is not None:
        check_prompt_length("".join(text for text, _ in body.segments), limits, "segments")
        total = sum(seconds for _, seconds in body.segments)
        check_duration(total, limits)
        if body.duration is not None and abs(body.duration - total) > 1e-6:
            raise ApiError(400, f"duration {body.duration} differs from the segments' total {total} s", param="duration")
        prompt: str | Story = Story(tuple(body.segments))
        duration = None
    else:
        assert body.prompt is not None
        check_prompt_length(body.prompt, limits, "prompt")
        prompt, duration = body.prompt, check_duration(body.duration, limits)
    return EngineCall(prompt, duration, list(seeds), options)


def uploaded(name: str, in_json: str | None, as_file: bytes | None) -> bytes | None:
    """A sound file sent as base64 in the JSON body or as a multipart file (not both)."""
    if in_json is not None and as_file is not None:
        raise ApiError(400, f"send the {name} either in the JSON body or as a multipart file, not both", param=name)
    if in_json is None:
        return as_file
    try:
        return base64.b64decode(in_json, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{name} must be base64 of a sound file", param=name) from None


def decode_sound(data: bytes, name: str) -> tuple[np.ndarray, int]:
    """A sound file's bytes -> float32 [channels, samples] and its rate."""
    import soundfile as sf

    try:
        pcm, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (RuntimeError, OSError, TypeError) as exc:
        raise ApiError(400, f"{name} is not a readable sound file ({exc})", param=name) from None
    return np.ascontiguousarray(pcm.T), int(rate)
