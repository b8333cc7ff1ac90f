"""The HTTP server against offline generation: OpenAI's client (whole and streamed), SSE, the native endpoint (stories,
several seeds, melody uploads), error answers in OpenAI's shape, backpressure, disconnects and metrics.

Every served clip is compared byte for byte with offline `generate` (or `stream`, for a MusicGen pack's streamed
chunks) for the same seed, converted with the server's own pcm16: the server adds no arithmetic of its own.
"""
from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import wave
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families
from server_harness import offline, served  # noqa: F401 - fixtures
from server_harness import Served, running_server

from vivace import Engine
from vivace.server.app import ServerSettings
from vivace.server.audio_formats import pcm16, wav_header

DEMO_PACK = Path(__file__).resolve().parent.parent / "packs" / "demo"
TIMEOUT = httpx.Timeout(120.0)


def metrics(url: str) -> dict[str, float]:
    """Every sample of /metrics by name and labels, parsed with prometheus_client's own parser."""
    text = httpx.get(f"{url}/metrics", timeout=TIMEOUT).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def blocks_in_use(url: str) -> float:
    return sum(value for name, value in metrics(url).items() if name.startswith("vivace_kv_blocks_used"))


def wait_until_idle(url: str, timeout_s: float = 30.0) -> dict[str, float]:
    """Polls /metrics until nothing runs, waits or holds a block (aborts land before the core's next step)."""
    deadline = time.monotonic() + timeout_s
    while True:
        values = metrics(url)
        idle = values["vivace_requests_running"] == 0 and values["vivace_requests_waiting"] == 0
        if idle and blocks_in_use(url) == 0:
            return values
        assert time.monotonic() < deadline, f"the server did not go idle: {values}"
        time.sleep(0.05)


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "\n" not in error["message"]
    return error


def test_openai_client_whole_and_streamed_equal_offline_generate(served, offline: Engine) -> None:
    client = OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    expected = pcm16(offline.generate("slow piano", 0.5, seed=11)[0])
    extra = {"duration": 0.5, "seed": 11}
    whole = client.audio.speech.create(model=model, voice="alloy", input="slow piano", response_format="pcm", extra_body=extra)
    assert whole.content == expected
    with client.audio.speech.with_streaming_response.create(
        model=model, voice="alloy", input="slow piano", response_format="pcm", extra_body=extra,
    ) as response:
        assert response.headers["x-sample-rate"] == str(offline.sample_rate)
        streamed = b"".join(response.iter_bytes())
    assert streamed == expected
    wav = client.audio.speech.create(model=model, voice="alloy", input="slow piano", response_format="wav", extra_body=extra)
    assert wav.content[:44] == wav_header(offline.sample_rate)  # streamed: 16-bit mono, sizes unknown up front
    assert wav.content[44:] == expected
    audio, rate = sf.read(io.BytesIO(wav.content), dtype="int16")  # players read such a header to the end of data
    assert rate == offline.sample_rate and audio.tobytes() == expected
    native = httpx.post(f"{served.url}/v1/music/generations", json={"prompt": "slow piano", **extra}, timeout=TIMEOUT)
    with wave.open(io.BytesIO(native.content)) as reader:  # a whole WAV: exact sizes
        assert (reader.getnchannels(), reader.getsampwidth(), reader.getframerate()) == (1, 2, offline.sample_rate)
        assert reader.readframes(reader.getnframes()) == expected


def test_sse_events_decode_to_the_offline_audio(served, offline: Engine) -> None:
    body = {"model": "random-tiny", "input": "drums", "duration": 0.6, "seed": 5, "response_format": "pcm", "stream_format": "sse"}
    with httpx.stream("POST", f"{served.url}/v1/audio/speech", json=body, timeout=TIMEOUT) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[len("data: "):]) for line in response.iter_lines() if line.startswith("data: ")]
    deltas = [e for e in events if e["type"] == "speech.audio.delta"]
    assert len(deltas) > 1 and events[-1]["type"] == "speech.audio.done"
    assert b"".join(base64.b64decode(e["audio"]) for e in deltas) == pcm16(offline.generate("drums", 0.6, seed=5)[0])
    usage = events[-1]["usage"]
    assert usage["output_tokens"] > 0 and usage["input_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


def test_first_bytes_arrive_before_the_generation_ends(served) -> None:
    """Read through the core's step counter: the first audio bytes reach the client many engine steps before the
    request's last step."""
    core = served.engine.core
    body = {"model": "random-tiny", "input": "strings", "duration": 3.0, "seed": 2, "response_format": "pcm"}
    with httpx.stream("POST", f"{served.url}/v1/audio/speech", json=body, timeout=TIMEOUT) as response:
        chunks = response.iter_raw()
        first = next(chunks)
        step_at_first_bytes = core.steps
        running_at_first_bytes = core.num_running
        rest = b"".join(chunks)
    assert first and rest
    assert running_at_first_bytes == 1
    assert core.steps > step_at_first_bytes


def test_native_story_and_several_seeds(served, offline: Engine) -> None:
    segments = [["calm piano", 0.3], ["loud drums", 0.3]]
    response = httpx.post(f"{served.url}/v1/music/generations", json={"segments": segments, "seed": 4, "response_format": "pcm"}, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    story = [(text, seconds) for text, seconds in segments]
    assert response.content == pcm16(offline.generate([story], seed=4)[0])
    response = httpx.post(f"{served.url}/v1/music/generations", json={"prompt": "pads", "duration": 0.4, "seed": [7, 8]}, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    clips = response.json()["data"]
    expected = offline.generate(["pads", "pads"], 0.4, seed=[7, 8])
    for clip, row in zip(clips, expected):
        audio, rate = sf.read(io.BytesIO(base64.b64decode(clip["audio"])), dtype="int16")
        assert rate == offline.sample_rate and audio.tobytes() == pcm16(row)
    body = {"prompt": "pads", "duration": 0.4, "seed": [7, 8], "stream": True, "stream_format": "sse", "response_format": "pcm"}
    with httpx.stream("POST", f"{served.url}/v1/music/generations", json=body, timeout=TIMEOUT) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    for row in (0, 1):
        pcm = b"".join(base64.b64decode(e["audio"]) for e in events if e["type"] == "music.audio.delta" and e["index"] == row)
        assert pcm == pcm16(expected[row])


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "random-tiny", "input": "x", "duration": 0.5, "speed": 1.5}, 400, "speed"),
        ({"model": "random-tiny", "input": "x", "duration": 0}, 400, "duration"),
        ({"model": "random-tiny", "input": "x", "duration": 1e6}, 400, "duration"),
        ({"model": "random-tiny", "input": "x", "duration": 0.5, "response_format": "aac"}, 400, "response_format"),
        ({"model": "random-tiny", "input": "x", "duration": 0.5, "response_format": "flac", "stream_format": "sse"}, 400, "response_format"),
        ({"model": "random-tiny", "input": "x" * 5000, "duration": 0.5}, 400, "input"),
        ({"model": "other-model", "input": "x", "duration": 0.5}, 404, "model"),
        ({"model": "random-tiny", "input": "x", "duration": "long"}, 422, "duration"),
        ({"model": "random-tiny", "duration": 0.5}, 422, "input"),
        ({"model": "random-tiny", "input": "x", "duration": 0.5, "seed": 1.5}, 422, "seed"),
        ({"model": "random-tiny", "input": "x", "duration": 0.5, "colour": "red"}, 422, "colour"),
        ({"model": "random-tiny", "input": "  ", "duration": 0.5}, 400, None),
        ({"model": "random-tiny", "input": "x", "duration": 0.5, "temperature": -1}, 400, None),
        ({"model": "random-tiny", "input": "x", "duration": 0.5, "guidance_scale": 3.0}, 400, None),
    ],
)
def test_bad_speech_requests_get_one_line_errors(served, body: dict, status: int, param: str | None) -> None:
    error = error_of(httpx.post(f"{served.url}/v1/audio/speech", json=body, timeout=TIMEOUT), status)
    assert error["param"] == param


def test_bad_native_requests_and_bodies(served) -> None:
    url = f"{served.url}/v1/music/generations"
    assert error_of(httpx.post(url, json={"prompt": "x", "segments": [["y", 1.0]]}), 400)["param"] == "prompt"
    assert error_of(httpx.post(url, json={"prompt": "x", "duration": 0.5, "seed": [1, 2], "stream": True}), 400)["param"] == "seed"
    assert error_of(httpx.post(url, json={"prompt": "x", "duration": 0.5, "melody": "%%%"}), 400)["param"] == "melody"
    assert error_of(httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert error_of(httpx.post(url, json={"prompt": "x", "duration": 0.5, "stage_sampling": {"semantic": {"top_k": "a"}}}), 422)
    melody = base64.b64encode(b"RIFF not a sound file").decode()
    assert "melody" in error_of(httpx.post(url, json={"prompt": "x", "duration": 0.5, "melody": melody}), 400)["message"]
    assert error_of(httpx.post(f"{served.url}/v1/audio/speech", content=b"[", headers={"content-type": "application/json"}), 400)
    wait_until_idle(served.url)


def test_api_key_body_limit_and_a_full_queue(tiny_pack: Path, offline: Engine) -> None:
    settings = ServerSettings(api_key="s3cret", max_body_bytes=4096)
    engine = Engine.from_pack(tiny_pack, max_running=1, max_waiting=0)
    with running_server(engine, settings) as served:
        speech = f"{served.url}/v1/audio/speech"
        # long enough that the admitted request is still decoding when the second one arrives (2 s left a window of
        # about 0.15 s after the first chunk, which a loaded machine could miss)
        body = {"model": "random-tiny", "input": "bass", "duration": 12.0, "seed": 9, "response_format": "pcm"}
        error = error_of(httpx.post(speech, json=body), 401)
        assert error["code"] == "invalid_api_key"
        error_of(httpx.post(speech, json=body, headers={"Authorization": "Bearer wrong"}), 401)
        error_of(httpx.get(f"{served.url}/v1/models"), 401)
        auth = {"Authorization": "Bearer s3cret"}
        error_of(httpx.post(speech, json={**body, "input": "x" * 5000}, headers=auth), 413)
        with httpx.stream("POST", speech, json=body, headers=auth, timeout=TIMEOUT) as running:
            assert running.status_code == 200
            chunks = running.iter_raw()
            first = next(chunks)  # admitted and decoding: the one running place is taken
            busy = httpx.post(speech, json={**body, "seed": 10}, headers=auth, timeout=TIMEOUT)
            error = error_of(busy, 503)
            assert busy.headers["retry-after"] == "1" and error["code"] == "engine_busy"
            audio = first + b"".join(chunks)
        assert audio == pcm16(offline.generate("bass", 12.0, seed=9)[0])  # the admitted request lost nothing
        values = wait_until_idle(served.url)
        assert values["vivace_queue_rejections_total"] == 1
        assert values["vivace_requests_finished_total{reason=rejected}"] == 1
        assert values["vivace_requests_finished_total{reason=done}"] == 1


def test_a_client_that_leaves_mid_stream_frees_its_blocks(served) -> None:
    before = metrics(served.url)["vivace_requests_finished_total{reason=aborted}"]
    body = {"model": "random-tiny", "input": "choir", "duration": 8.0, "seed": 1, "response_format": "pcm"}
    with httpx.stream("POST", f"{served.url}/v1/audio/speech", json=body, timeout=TIMEOUT) as response:
        chunks = response.iter_raw()  # kept: a dropped iterator closes the connection at once
        next(chunks)
        assert blocks_in_use(served.url) > 0
    # leaving the block closed the connection mid-stream
    values = wait_until_idle(served.url)
    assert values["vivace_requests_finished_total{reason=aborted}"] == before + 1
    assert served.engine.core.num_running == 0


def test_a_client_that_leaves_a_whole_file_request_aborts_it(served) -> None:
    before = metrics(served.url)["vivace_requests_finished_total{reason=aborted}"]
    body = {"model": "random-tiny", "input": "choir", "duration": 30.0, "seed": 1, "response_format": "flac"}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{served.url}/v1/audio/speech", json=body, timeout=httpx.Timeout(1.0))
    values = wait_until_idle(served.url)
    assert values["vivace_requests_finished_total{reason=aborted}"] == before + 1


def test_metrics_health_models_and_page(served) -> None:
    values = metrics(served.url)
    for name in ("vivace_requests_running", "vivace_requests_waiting", "vivace_queue_rejections_total",
                 "vivace_audio_seconds_total", "vivace_time_to_first_audio_seconds_count", "vivace_real_time_factor_count"):
        assert name in values
    for reason in ("done", "aborted", "rejected", "error"):
        assert f"vivace_requests_finished_total{{reason={reason}}}" in values
    for stage in ("semantic", "coarse", "fine"):
        assert values[f"vivace_kv_blocks_total{{stage={stage}}}"] > 0
        for counter in ("prefill_tokens", "decode_tokens", "preemptions", "prefill_seconds", "decode_seconds", "kv_read_bytes"):
            assert values[f"vivace_{counter}_total{{stage={stage}}}"] >= 0
    assert values["vivace_engine_steps_total"] >= 0 and values["vivace_request_pipeline_seconds_total"] >= 0
    assert httpx.get(f"{served.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{served.url}/ready").json() == {"ready": True}
    card = httpx.get(f"{served.url}/v1/models").json()["data"][0]
    assert card["id"] == "random-tiny" and card["sample_rate"] == 24000 and {"pcm", "wav"} <= set(card["response_formats"])
    page = httpx.get(f"{served.url}/")
    assert page.status_code == 200 and "<html" in page.text.lower()


def test_whole_file_formats_decode_to_the_clip(served, offline: Engine) -> None:
    formats = httpx.get(f"{served.url}/v1/models").json()["data"][0]["response_formats"]
    expected = offline.generate("harp", 0.5, seed=3)[0]
    for name in formats:
        if name == "pcm":
            continue
        body = {"model": "random-tiny", "input": "harp", "duration": 0.5, "seed": 3, "response_format": name}
        response = httpx.post(f"{served.url}/v1/audio/speech", json=body, timeout=TIMEOUT)
        assert response.status_code == 200, (name, response.text)
        audio, rate = sf.read(io.BytesIO(response.content), dtype="float32")
        assert rate == offline.sample_rate
        if name in ("wav", "flac"):  # lossless at 16 bits
            assert np.abs(audio - expected).max() <= 1 / 32767 + 1e-6, name
        else:  # lossy: the clip's length, give or take the codec's padding
            assert abs(len(audio) - len(expected)) < 0.1 * offline.sample_rate, name


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize(("grace", "duration"), [(60.0, 1.5), (0.5, 40.0)], ids=["finishes", "aborted-after-grace"])
def test_sigterm_lets_running_requests_finish_then_exits_cleanly(tiny_pack: Path, offline: Engine, grace: float, duration: float) -> None:
    """SIGTERM mid-stream: within the grace period the request completes with all its audio; past it the stream
    is cut (the request aborted). Either way the process exits 0."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "vivace", "serve", "--pack", str(tiny_pack), "--port", str(port), "--grace", str(grace),
         "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "vivace serve did not become ready"
            time.sleep(0.1)
        body = {"model": "random-tiny", "input": "organ", "duration": duration, "seed": 6, "response_format": "pcm"}
        with httpx.stream("POST", f"{url}/v1/audio/speech", json=body, timeout=TIMEOUT) as response:
            chunks = response.iter_raw()
            audio = next(chunks)
            server.send_signal(signal.SIGTERM)
            cut = False
            try:
                for chunk in chunks:
                    audio += chunk
            except httpx.RemoteProtocolError:  # no terminating chunk: a client cannot take the cut stream for whole
                cut = True
        assert cut == (grace < 1)
        if grace > 1:
            assert audio == pcm16(offline.generate("organ", duration, seed=6)[0])
        else:
            assert len(audio) < duration * offline.sample_rate * 2
        assert server.wait(timeout=60) == 0, server.stdout.read().decode()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_the_demo_pack_served_through_the_openai_client() -> None:
    engine = Engine.from_pack(DEMO_PACK, quantize="int8")
    prompt = "upbeat piano with acoustic bass and rock drums in C major"
    expected = pcm16(engine.generate(prompt, 1.0, seed=0)[0])
    with running_server(engine) as served:
        client = OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)
        with client.audio.speech.with_streaming_response.create(
            model="vivace-demo", voice="alloy", input=prompt, response_format="pcm", extra_body={"duration": 1.0, "seed": 0},
        ) as response:
            assert b"".join(response.iter_bytes()) == expected
        wait_until_idle(served.url)


@pytest.fixture(scope="module")
def melody_pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from musicgen_checkpoints import TinyMusicGen, converted

    return converted(tmp_path_factory.mktemp("served_melody"), TinyMusicGen(melody=True, seed=5))


def test_musicgen_melody_pack_streamed_whole_and_uploaded_melody(melody_pack: Path, tmp_path: Path) -> None:
    """A MusicGen pack streams its 1 s chunks (equal to offline stream) and answers whole files from whole-clip
    decodes (equal to offline generate); a melody uploaded as a multipart file conditions like the same file offline."""
    engine = Engine.from_pack(melody_pack)
    rate = 3200
    melody = np.random.default_rng(0).uniform(-0.5, 0.5, (2, rate)).astype(np.float32)  # 1 s of stereo noise
    melody_file = tmp_path / "melody.wav"
    sf.write(melody_file, melody.T, rate, subtype="FLOAT")
    options = {"guidance_scale": 3.0}
    streamed = b"".join(pcm16(c.pcm) for c in engine.stream("slow piano", 2.4, seed=3, **options))
    whole = pcm16(engine.generate("slow piano", 2.4, seed=3, **options)[0])
    with_melody = pcm16(engine.generate("slow piano", 1.2, seed=4, melody=str(melody_file))[0])
    with running_server(Engine.from_pack(melody_pack)) as served:
        model = httpx.get(f"{served.url}/v1/models").json()["data"][0]["id"]
        body = {"model": model, "input": "slow piano", "duration": 2.4, "seed": 3, "response_format": "pcm", **options}
        assert httpx.post(f"{served.url}/v1/audio/speech", json=body, timeout=TIMEOUT).content == streamed
        native = {"prompt": "slow piano", "duration": 2.4, "seed": 3, "response_format": "pcm", **options}
        assert httpx.post(f"{served.url}/v1/music/generations", json=native, timeout=TIMEOUT).content == whole
        request = {"prompt": "slow piano", "duration": 1.2, "seed": 4, "response_format": "pcm"}
        upload = httpx.post(
            f"{served.url}/v1/music/generations", data={"request": json.dumps(request)},
            files={"melody": ("melody.wav", melody_file.read_bytes(), "audio/wav")}, timeout=TIMEOUT,
        )
        assert upload.status_code == 200, upload.text
        assert upload.content == with_melody
        as_json = {**request, "melody": base64.b64encode(melody_file.read_bytes()).decode()}
        assert httpx.post(f"{served.url}/v1/music/generations", json=as_json, timeout=TIMEOUT).content == with_melody
        error_of(httpx.post(f"{served.url}/v1/music/generations", data={"request": "{}"}), 400)
        wait_until_idle(served.url)


def test_audio_prompt_negative_prompt_and_unconditional_requests(melody_pack: Path, tmp_path: Path) -> None:
    """An audio prompt (multipart or base64), a negative prompt and an unconditional request are answered as offline
    generate makes them; bad ones get a 400 naming the field."""
    engine = Engine.from_pack(melody_pack)
    rate = 3200
    prompt = np.random.default_rng(1).uniform(-0.5, 0.5, 10 * 16).astype(np.float32)  # 10 frames
    prompt_file = tmp_path / "prompt.wav"
    sf.write(prompt_file, prompt, rate, subtype="FLOAT")
    continued = pcm16(engine.generate("slow piano", 0.2, seed=2, audio_prompt=str(prompt_file))[0])
    unconditional = pcm16(engine.generate(None, 0.2, seed=2)[0])
    steered = pcm16(engine.generate("slow piano", 0.2, seed=2, negative_prompt="loud rock")[0])
    url = "/v1/music/generations"
    with running_server(Engine.from_pack(melody_pack)) as served:
        request = {"prompt": "slow piano", "duration": 0.2, "seed": 2, "response_format": "pcm"}
        upload = httpx.post(
            served.url + url, data={"request": json.dumps(request)},
            files={"audio_prompt": ("prompt.wav", prompt_file.read_bytes(), "audio/wav")}, timeout=TIMEOUT,
        )
        assert upload.status_code == 200, upload.text
        assert upload.content == continued
        as_json = {**request, "audio_prompt": base64.b64encode(prompt_file.read_bytes()).decode()}
        assert httpx.post(served.url + url, json=as_json, timeout=TIMEOUT).content == continued
        negative = {**request, "negative_prompt": "loud rock"}
        assert httpx.post(served.url + url, json=negative, timeout=TIMEOUT).content == steered
        body = {"unconditional": True, "duration": 0.2, "seed": 2, "response_format": "pcm"}
        assert httpx.post(served.url + url, json=body, timeout=TIMEOUT).content == unconditional
        both = {**body, "prompt": "x"}
        assert error_of(httpx.post(served.url + url, json=both), 400)["param"] == "prompt"
        long_prompt = {**as_json, "duration": 0.04}
        assert "audio_prompt of 0.05 s must be shorter" in error_of(httpx.post(served.url + url, json=long_prompt), 400)["message"]
        bad = {**request, "audio_prompt": base64.b64encode(b"not a sound").decode()}
        assert error_of(httpx.post(served.url + url, json=bad), 400)["param"] == "audio_prompt"
        wait_until_idle(served.url)


def test_a_musiclm_pack_refuses_audio_prompts_and_unconditional_requests(served: Served, tmp_path: Path) -> None:
    url = served.url + "/v1/music/generations"
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(2400, np.float32), 24000, format="WAV")
    with_prompt = {"prompt": "x", "duration": 0.5, "audio_prompt": base64.b64encode(buffer.getvalue()).decode()}
    assert "carries no codec encoder and no semantic tokenizer" in error_of(httpx.post(url, json=with_prompt, timeout=TIMEOUT), 400)["message"]
    unconditional = {"unconditional": True, "duration": 0.5}
    assert "unconditional generation" in error_of(httpx.post(url, json=unconditional, timeout=TIMEOUT), 400)["message"]


def test_serve_refuses_bad_options_with_one_line(tiny_pack: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vivace.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = [
            (["--pack", str(tmp_path / "missing")], "missing"),
            (["--pack", str(tiny_pack), "--port", "0"], "--port"),
            (["--pack", str(tiny_pack), "--max-duration", "-1"], "--max-duration"),
            (["--pack", str(tiny_pack), "--port", str(port)], "cannot listen"),
            (["--pack", str(tiny_pack), "--max-running", "0", "--port", str(free_port())], "--max-running"),
        ]
        for args, named in cases:
            assert main(["serve", *args]) == 2, args
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and err.startswith("vivace: error:") and named in err, (args, err)


def test_a_request_that_fails_mid_stream_is_visibly_cut(tiny_pack: Path) -> None:
    """A step that fails after audio went out: a PCM stream ends without its terminating chunk (the client cannot take
    it for a whole clip), an SSE stream ends with an `error` event, and the failures are counted."""
    engine = Engine.from_pack(tiny_pack)
    real_step = engine.core.step

    def failing_step():
        if any(seq for runner in engine.core.runners.values() for seq in runner.running) and engine.core.steps > 40:
            raise RuntimeError("injected failure")
        return real_step()

    engine.core.step = failing_step
    with running_server(engine) as served:
        body = {"model": "random-tiny", "input": "organ", "duration": 8.0, "seed": 1, "response_format": "pcm"}
        with pytest.raises(httpx.RemoteProtocolError):
            with httpx.stream("POST", f"{served.url}/v1/audio/speech", json=body, timeout=TIMEOUT) as response:
                assert response.status_code == 200
                for _ in response.iter_raw():
                    pass
        with httpx.stream("POST", f"{served.url}/v1/audio/speech", json={**body, "stream_format": "sse"}, timeout=TIMEOUT) as response:
            events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1]["type"] == "error" and "injected failure" in events[-1]["error"]["message"]
        assert wait_until_idle(served.url)["vivace_requests_finished_total{reason=error}"] == 2
