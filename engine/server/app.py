"""The HTTP app: OpenAI's POST /v1/audio/speech, the native POST /v1/music/generations, models, health, readiness,
Prometheus metrics and the web page, all on one AsyncEngine shared by every request."""
from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from vivace.async_engine import AsyncEngine, CallClosed
from vivace.errors import EngineBusy, VivaceError
from vivace.server.audio_formats import STREAMABLE, AudioFormat, available_formats, encode_whole
from vivace.server.generation import Generation, audio_body, sse_body, whole_clips, whole_json
from vivace.server.metrics import ServerMetrics
from vivace.server.protocol import (
    UPLOADS, ApiError, EngineCall, Limits, MusicRequest, SpeechRequest, music_call, speech_call, validation_error,
)

STATIC = Path(__file__).resolve().parent / "static"  # resolved: an editable install links each file, and StaticFiles follows no link out of its folder


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    model_name: str | None = None  # the id clients pass as `model` (default: the pack's name)
    max_duration_s: float | None = None  # default: the pack's limit
    default_duration_s: float = 10.0  # when a request names none (OpenAI's clients send no duration)
    max_prompt_chars: int = 4096
    max_body_bytes: int = 16 * 2**20  # a melody upload is the largest body
    retry_after_s: int = 1
    shutdown_grace_s: float = 30.0
    replica_id: str | None = None  # set by a Ray Serve replica: every answer says which replica gave it


class ServerState:
    """What the routes share: the engine, its metrics, the formats this machine writes, the limits."""

    def __init__(self, engine: AsyncEngine, settings: ServerSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = ServerMetrics(engine.engine)
        self.info = engine.engine.info()
        self.model_name = settings.model_name or self.info["name"]
        self.formats = available_formats(engine.sample_rate)
        pack_limit = float(self.info["max_duration_s"])
        max_duration = min(settings.max_duration_s or pack_limit, pack_limit)
        self.limits = Limits(max_duration, min(settings.default_duration_s, max_duration), settings.max_prompt_chars)
        self.accepting = True

    def format(self, name: str, stream: bool, param: str = "response_format") -> AudioFormat:
        fmt = self.formats.get(name)
        if fmt is None:
            raise ApiError(400, f"response_format {name!r} is not supported here (choose from {', '.join(self.formats)})", param=param)
        if stream and fmt.name not in STREAMABLE:
            raise ApiError(400, f"response_format {name!r} cannot be streamed (stream pcm or wav)", param=param)
        return fmt

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ApiError(404, f"model {model!r} does not exist here (this server serves {self.model_name!r})",
                           param="model", code="model_not_found")

    async def start(self, call: EngineCall, stream: bool) -> Generation:
        if not self.accepting:
            raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")
        arrived = time.perf_counter()
        prompt, duration, seed = call.arguments()
        try:
            async_call = await self.engine.submit_async(prompt, duration, seed, stream=stream, **call.options)
        except EngineBusy as busy:
            self.metrics.rejections.inc()
            self.metrics.finished.labels("rejected").inc()
            raise ApiError(503, str(busy), type="server_error", code="engine_busy",
                           headers={"Retry-After": str(self.settings.retry_after_s)}) from None
        except VivaceError as error:
            raise ApiError(400, str(error)) from None
        return Generation(async_call, self.metrics, self.engine.sample_rate, arrived)


def create_app(engine: AsyncEngine, settings: ServerSettings = ServerSettings()) -> FastAPI:
    """The app on a running AsyncEngine (its owner closes it)."""
    state = ServerState(engine, settings)
    app = FastAPI(title="vivace", version="0.1.0", docs_url=None, redoc_url=None)
    app.state.vivace = state
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    if settings.replica_id is not None:
        app.add_middleware(ReplicaHeader, replica_id=settings.replica_id)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError) -> JSONResponse:
        return await api_error(request, request_validation_error(error))

    def authorize(request: Request) -> None:  # a dependency: runs before the body is validated
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise ApiError(401, "missing or incorrect API key (send Authorization: Bearer <key>)", code="invalid_api_key")

    @app.post("/v1/audio/speech", dependencies=[Depends(authorize)])
    async def speech(body: SpeechRequest, request: Request) -> Response:
        state.check_model(body.model)
        stream_sse = body.stream_format == "sse"
        fmt = state.format(body.response_format, stream=stream_sse)
        streamed = fmt.name in STREAMABLE  # like OpenAI's endpoint, pcm and wav are sent as they are decoded
        generation = await state.start(speech_call(body, state.limits), stream=streamed)
        if stream_sse:
            return StreamingResponse(sse_body(generation, fmt, "speech.audio"), media_type="text/event-stream")
        if streamed:
            return stream_audio(generation, fmt)
        return await whole_response(request, generation, fmt, [body.seed])

    @app.post("/v1/music/generations", dependencies=[Depends(authorize)])
    async def music(request: Request) -> Response:
        body, uploads = await music_body(request)
        state.check_model(body.model)
        fmt = state.format(body.response_format, stream=body.stream)
        call = music_call(body, state.limits, uploads)
        if body.stream and body.stream_format == "audio" and call.rows > 1:
            raise ApiError(400, "several seeds stream as SSE (stream_format 'sse'), one clip per seed", param="seed")
        generation = await state.start(call, stream=body.stream)
        if body.stream and body.stream_format == "sse":
            return StreamingResponse(sse_body(generation, fmt, "music.audio"), media_type="text/event-stream")
        if body.stream:
            return stream_audio(generation, fmt)
        return await whole_response(request, generation, fmt, call.seeds)

    async def whole_response(request: Request, generation: Generation, fmt: AudioFormat, seeds: list[int]) -> Response:
        watcher = asyncio.create_task(abort_on_disconnect(request, generation))
        try:
            clips = await whole_clips(generation)
        except VivaceError as error:
            raise ApiError(500, str(error), type="server_error") from None
        except CallClosed:  # the client left: nobody reads this answer
            raise ApiError(499, "the client closed the request") from None
        finally:
            watcher.cancel()
        # encoding (mp3, opus: tens of ms a clip) runs in a worker thread, not between other requests' chunks
        if len(seeds) > 1:
            body = await asyncio.to_thread(whole_json, clips, seeds, fmt, engine.sample_rate, generation.usage)
            return JSONResponse(body)
        audio = await asyncio.to_thread(encode_whole, fmt, clips[0], engine.sample_rate)
        return Response(audio, media_type=fmt.media_type, headers=audio_headers(engine.sample_rate))

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(state)]}

    @app.get("/health")
    async def health() -> JSONResponse:
        alive = engine.running
        return JSONResponse({"status": "ok" if alive else "engine stopped"}, status_code=200 if alive else 503)

    @app.get("/ready")
    async def ready() -> JSONResponse:
        ok = state.accepting and engine.running
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/")
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def stream_audio(generation: Generation, fmt: AudioFormat) -> StreamingResponse:
    return StreamingResponse(audio_body(generation, fmt), media_type=fmt.media_type,
                             headers=audio_headers(generation.sample_rate))


def audio_headers(sample_rate: int) -> dict[str, str]:
    return {"X-Sample-Rate": str(sample_rate), "X-Audio-Channels": "1", "X-Sample-Format": "s16le"}


async def abort_on_disconnect(request: Request, generation: Generation) -> None:
    """Waits for the client to leave and aborts its request (a whole-file answer has no body to cancel meanwhile)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    generation.call.close()


async def music_body(request: Request) -> tuple[MusicRequest, dict[str, bytes]]:
    """The native body: JSON, or multipart with a `request` JSON field and optional `melody` / `audio_prompt` files."""
    uploads: dict[str, bytes] = {}
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form()
        text = form.get("request")
        if not isinstance(text, str):
            raise ApiError(400, "a multipart body needs a 'request' field holding the JSON request", param="request")
        for name in UPLOADS:
            upload = form.get(name)
            if upload is not None and not isinstance(upload, str):
                uploads[name] = await upload.read()
    else:
        text = (await request.body()).decode(errors="replace")
    try:
        return MusicRequest.model_validate(json.loads(text)), uploads
    except json.JSONDecodeError as error:
        raise ApiError(400, f"the body is not JSON ({error.msg} at position {error.pos})") from None
    except ValidationError as error:
        raise validation_error(error) from None


def request_validation_error(error: RequestValidationError) -> ApiError:
    first = error.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return ApiError(400, "the body is not valid JSON")
    return ApiError(422, f"{param}: {first['msg']}" if param else str(first["msg"]), param=param, code="invalid_value")


def model_card(state: ServerState) -> dict[str, Any]:
    info = state.info
    return {
        "id": state.model_name, "object": "model", "created": 0, "owned_by": "vivace",
        "family": info["family"], "sample_rate": info["sample_rate"], "max_duration_s": state.limits.max_duration_s,
        "default_duration_s": state.limits.default_duration_s, "response_formats": list(state.formats), "info": info,
    }


class BodyLimit:
    """Refuses bodies over max_bytes with 413, by Content-Length or, for chunked bodies, as they arrive."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = ApiError(413, f"the body exceeds this server's limit of {self.max_bytes} bytes")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await JSONResponse(too_large.body(), status_code=413)(scope, receive, send)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise too_large
            return message

        await self.app(scope, counted, send)


class ReplicaHeader:
    """Adds X-Vivace-Replica to every answer (a Ray Serve replica's id)."""

    def __init__(self, app: Any, replica_id: str) -> None:
        self.app = app
        self.header = (b"x-vivace-replica", replica_id.encode())

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        async def tagged(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, tagged if scope["type"] == "http" else send)
