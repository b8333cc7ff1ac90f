"""Serving load over HTTP: `vivace serve` on the demo pack (int8) in a subprocess, driven by async HTTP clients.

The server runs on a free localhost port with --max-running R and --max-queue Q. Every request is OpenAI's
POST /v1/audio/speech with response_format pcm, read as a stream. Phases:
- closed loop at 1, 4, 16, 64 clients (--quick: 1, 4, 16 with fewer, shorter clips): each client sends its next
  request when the last one ends; R + Q is the largest client count, so none of them is refused;
- a burst of R + Q + extra requests at once: every one is answered before the first admitted clip ends, so exactly
  `extra` of them are planned to get 503 (the run prints when the last answer came and when the first clip ended).
Reported per phase: requests, answers by status, seconds of audio per wall second, time to first byte (the response's
status line and headers: the server has admitted the request) and time to first audio (the first PCM bytes), p50 / p99.
Checked, each failure a one-line reason and a non-zero exit (the results are written first): no answer but 200 and
the planned 503s; /metrics after the load shows no request running or waiting and no KV block in use, and its
finished / rejected counters agree with what the clients saw; a sample of served clips equals offline generation
(Engine.from_pack(..., quantize="int8").generate with the same seed, through the server's pcm16) byte for byte.

Needs the [serve] extra and httpx; it runs only when named: python -m benchmarks serve_load [--quick] [--threads N].
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.common import ROOT, Options, table, write_result
from benchmarks.serving import DEMO_PACK, PROMPTS, percentile, requests

Call = tuple[str, float, int]  # prompt, seconds, seed

READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0  # after SIGTERM; the server's grace is shorter, so a kill means it hung
GRACE_S = 5.0  # the server's own grace on SIGTERM: a benchmark that failed mid-load need not wait 30 s
SETTLE_S = 10.0  # how long /metrics may take to show an idle engine after the last response ended
SAMPLES = 3  # served clips compared with offline generation


@dataclass(frozen=True)
class Plan:
    clients: dict[int, int]  # clients at once -> requests in that phase
    seconds: list[float]  # closed-loop clip lengths
    max_running: int
    max_queue: int
    extra: int  # burst requests past R + Q: the planned 503s
    burst_seconds: float

    @property
    def admitted(self) -> int:
        return self.max_running + self.max_queue


def plan(quick: bool) -> Plan:
    # R + Q equals the largest client count: the closed loops fill the engine without a 503. The burst's first R
    # clips take seconds to decode and the whole burst is answered in a fraction of one (the burst's line prints
    # both), so no admitted request leaves before the last one arrives.
    if quick:
        return Plan({1: 4, 4: 8, 16: 16}, [1.0], max_running=8, max_queue=8, extra=4, burst_seconds=1.0)
    return Plan({1: 8, 4: 16, 16: 32, 64: 128}, [2.0], max_running=16, max_queue=48, extra=8, burst_seconds=2.0)


@dataclass
class Reply:
    """One request as its client saw it; times in seconds from the phase's start."""

    call: Call
    sent: float
    status: int = 0  # 0: no answer (the connection failed)
    headers_at: float | None = None
    first_audio_at: float | None = None
    ended_at: float | None = None
    body: bytes = b""
    error: str | None = None  # a failed connection, or the code of an error answer
    replica: str | None = None  # X-Vivace-Replica: which Ray Serve replica answered (none from a plain server)

    @property
    def ttfb(self) -> float | None:
        return None if self.headers_at is None else self.headers_at - self.sent

    @property
    def ttfa(self) -> float | None:
        return None if self.first_audio_at is None else self.first_audio_at - self.sent


@dataclass
class Phase:
    name: str
    clients: int
    replies: list[Reply]
    wall_s: float
    notes: dict[str, Any] = field(default_factory=dict)


# -- the server ----------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """`with Server(...) as url:` a `vivace serve` subprocess, ready; it is stopped on leaving, whatever happened.
    `extra` is more of the command line (ray_load's --ray and replicas), `threads` overrides options.threads and
    `suite` names the benchmark in the one-line failures."""

    def __init__(
        self, plan: Plan, options: Options, log: Path, extra: Sequence[str] = (), threads: int | None = None,
        suite: str = "serve_load",
    ) -> None:
        self.port = free_port()
        self.command = [
            sys.executable, "-m", "vivace", "serve", "--pack", str(DEMO_PACK.relative_to(ROOT)), "--quantize", "int8",
            "--port", str(self.port), "--device", options.device, "--max-running", str(plan.max_running),
            "--max-queue", str(plan.max_queue), "--grace", str(GRACE_S), "--log-level", "warning", *extra,
        ]
        self.threads = options.threads if threads is None else threads
        self.env = dict(os.environ)
        if self.threads:  # `vivace serve` has no thread flag; torch takes its intra-op threads from these
            self.env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        self.log = log
        self.suite = suite
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> str:
        with self.log.open("wb") as sink:
            self.process = subprocess.Popen(self.command, cwd=ROOT, env=self.env, stdout=sink, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{self.port}"
            self.wait_ready(url)
            return url
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_ready(self, url: str) -> None:
        assert self.process is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                raise SystemExit(f"{self.suite}: the server exited with {code} before it was ready: {self.log_tail()}")
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass  # not listening yet: the pack is still loading
            time.sleep(0.5)
        raise SystemExit(f"{self.suite}: the server was not ready within {READY_TIMEOUT_S:.0f} s: {self.log_tail()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            print(f"the server ignored SIGTERM for {STOP_TIMEOUT_S:.0f} s: killed", flush=True)
            self.process.kill()
            self.process.wait()

    def log_tail(self) -> str:
        lines = self.log.read_text(errors="replace").strip().splitlines()
        return lines[-1] if lines else f"(nothing in {self.log})"


# -- clients -------------------------------------------------------------------------------------------------------
def http_client(url: str, connections: int) -> httpx.AsyncClient:
    # A queued request sees no byte for as long as the queue ahead of it takes, hence the long read timeout; the
    # pool must hold every concurrent request, or the client would queue them itself and hide the server's queue.
    return httpx.AsyncClient(
        base_url=url, timeout=httpx.Timeout(600.0, connect=10.0),
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
    )


async def send(client: httpx.AsyncClient, model: str, call: Call, start: float) -> Reply:
    prompt, seconds, seed = call
    body = {"model": model, "input": prompt, "response_format": "pcm", "duration": seconds, "seed": seed}
    reply = Reply(call, time.perf_counter() - start)
    chunks = []
    try:
        async with client.stream("POST", "/v1/audio/speech", json=body) as response:
            reply.status, reply.headers_at = response.status_code, time.perf_counter() - start
            reply.replica = response.headers.get("x-vivace-replica")
            async for chunk in response.aiter_bytes():
                if chunk and reply.first_audio_at is None:
                    reply.first_audio_at = time.perf_counter() - start
                chunks.append(chunk)
            reply.ended_at = time.perf_counter() - start
    except httpx.HTTPError as error:
        reply.error = f"{type(error).__name__}: {error}"
        return reply
    if reply.status == 200:
        reply.body = b"".join(chunks)
    else:
        reply.first_audio_at = None  # an error's JSON is not audio
        reply.error = error_code(b"".join(chunks), response.headers)
    return reply


def error_code(body: bytes, headers: httpx.Headers) -> str:
    """An error answer's OpenAI code, with '+retry-after' when it says when to come back."""
    try:
        code = str(json.loads(body)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        code = "unreadable body"
    return code + ("+retry-after" if "retry-after" in headers else "")


async def closed_loop(url: str, model: str, calls: list[Call], clients: int) -> Phase:
    pending = deque(calls)
    replies: list[Reply] = []
    async with http_client(url, clients) as client:
        start = time.perf_counter()

        async def one_client() -> None:
            while pending:
                replies.append(await send(client, model, pending.popleft(), start))

        await asyncio.gather(*(one_client() for _ in range(clients)))
        wall = time.perf_counter() - start
    return Phase(f"{clients} clients", clients, replies, wall)


async def burst(url: str, model: str, calls: list[Call]) -> Phase:
    async with http_client(url, len(calls)) as client:
        start = time.perf_counter()
        replies = await asyncio.gather(*(send(client, model, call, start) for call in calls))
        wall = time.perf_counter() - start
    # The plan holds when every request was answered (admitted or refused) before any admitted clip ended.
    answered = [r.headers_at for r in replies if r.headers_at is not None]
    ended = [r.ended_at for r in replies if r.status == 200 and r.ended_at is not None]
    notes = {"last_answer_s": max(answered, default=None), "first_clip_end_s": min(ended, default=None)}
    return Phase("burst", len(calls), list(replies), wall, notes)


# -- results -------------------------------------------------------------------------------------------------------
def summary(phase: Phase, sample_rate: int) -> dict[str, Any]:
    served = [r for r in phase.replies if r.status == 200]
    audio = sum(len(r.body) for r in served) / 2 / sample_rate  # 16-bit mono
    ttfb = [r.ttfb for r in served if r.ttfb is not None]
    ttfa = [r.ttfa for r in served if r.ttfa is not None]

    def quantile(values: list[float], q: float) -> float | None:
        return percentile(values, q) if values else None

    return {
        "phase": phase.name, "clients": phase.clients, "requests": len(phase.replies),
        "status": dict(sorted(Counter(str(r.status) for r in phase.replies).items())),
        "audio_s": audio, "wall_s": phase.wall_s, "audio_s_per_s": audio / phase.wall_s,
        "ttfb_p50_s": quantile(ttfb, 0.5), "ttfb_p99_s": quantile(ttfb, 0.99),
        "first_audio_p50_s": quantile(ttfa, 0.5), "first_audio_p99_s": quantile(ttfa, 0.99), **phase.notes,
    }


COLUMNS = ["phase", "requests", "status", "audio s/s", "TTFB p50 s", "TTFB p99 s", "TTFA p50 s", "TTFA p99 s", "wall s"]


def columns(s: dict[str, Any]) -> list[Any]:
    """A phase summary's cells under COLUMNS."""
    return [s["phase"], s["requests"], " ".join(f"{k}:{v}" for k, v in s["status"].items()), s["audio_s_per_s"],
            s["ttfb_p50_s"], s["ttfb_p99_s"], s["first_audio_p50_s"], s["first_audio_p99_s"], s["wall_s"]]


def print_table(title: str, summaries: list[dict[str, Any]]) -> None:
    print(table(COLUMNS, [columns(s) for s in summaries], title=title), flush=True)


# -- checks --------------------------------------------------------------------------------------------------------
def scrape(url: str) -> dict[str, float]:
    return parse_metrics(httpx.get(f"{url}/metrics", timeout=10).text)


def parse_metrics(text: str) -> dict[str, float]:
    """/metrics as {'name{label=value}': value} for vivace's samples."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("vivace_") and not sample.name.endswith(("_bucket", "_created")):
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                found[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return found


def busy(metrics: dict[str, float]) -> dict[str, float]:
    """What should be 0 on an idle engine and is not."""
    idle_zero = ("vivace_kv_blocks_used", "vivace_requests_running", "vivace_requests_waiting")
    return {k: v for k, v in metrics.items() if k.startswith(idle_zero) and v != 0}


def settled_metrics(url: str) -> tuple[dict[str, float], float]:
    """/metrics once the engine is idle (or after SETTLE_S), and the seconds that took: the last chunk a client reads
    can leave the server a moment before its request is counted as ended."""
    start = time.monotonic()
    while True:
        metrics = scrape(url)
        waited = time.monotonic() - start
        if not busy(metrics) or waited > SETTLE_S:
            return metrics, waited
        time.sleep(0.2)


def status_failures(phases: list[Phase]) -> list[str]:
    """Answers other than 200 (and 503 in a burst), and 503s not in the server's shape."""
    failures = []
    for phase in phases:
        allowed = {200, 503} if phase.name == "burst" else {200}
        for reply in phase.replies:
            if reply.status not in allowed:
                failures.append(f"{phase.name}: {reply.call} answered {reply.status or 'nothing'} ({reply.error})")
            elif reply.status == 503 and reply.error != "engine_busy+retry-after":
                failures.append(f"{phase.name}: a 503 without engine_busy and Retry-After ({reply.error})")
    return failures


def burst_failures(last: Phase, plan: Plan) -> list[str]:
    failures = []
    refused = sum(r.status == 503 for r in last.replies)
    if refused != plan.extra:
        failures.append(
            f"burst: {refused} 503s, {plan.extra} planned (last answer at {last.notes['last_answer_s']} s, "
            f"first clip ended at {last.notes['first_clip_end_s']} s)"
        )
    return failures


def metrics_failures(metrics: dict[str, float], phases: list[Phase], warmups: int) -> list[str]:
    failures = [f"after the load {key} = {value:g}" for key, value in busy(metrics).items()]
    if not any(k.startswith("vivace_kv_blocks_used") for k in metrics):
        failures.append("/metrics has no vivace_kv_blocks_used sample")
    replies = [r for phase in phases for r in phase.replies]
    expected = {
        "vivace_requests_finished_total{reason=done}": warmups + sum(r.status == 200 for r in replies),
        "vivace_requests_finished_total{reason=rejected}": sum(r.status == 503 for r in replies),
        "vivace_requests_finished_total{reason=aborted}": 0,
        "vivace_requests_finished_total{reason=error}": 0,
        "vivace_queue_rejections_total": sum(r.status == 503 for r in replies),
    }
    for key, want in expected.items():
        if metrics.get(key) != want:
            failures.append(f"/metrics {key} = {metrics.get(key)}, the clients saw {want}")
    return failures


def samples(phases: list[Phase]) -> list[tuple[str, Reply]]:
    """The first served clip of the first, a middle and the last phase: one alone, the others decoded in batches."""
    chosen = [phases[0], phases[len(phases) // 2], phases[-1]][:SAMPLES]
    return [(phase.name, next(r for r in phase.replies if r.status == 200)) for phase in chosen]


def offline_failures(chosen: list[tuple[str, Reply]], options: Options) -> tuple[list[dict[str, Any]], list[str]]:
    from vivace import Engine
    from vivace.server.audio_formats import pcm16

    engine = Engine.from_pack(DEMO_PACK, device=options.device, quantize="int8")
    rows, failures = [], []
    for phase, reply in chosen:
        prompt, seconds, seed = reply.call
        offline = pcm16(engine.generate(prompt, seconds, seed=seed)[0])
        equal = offline == reply.body
        rows.append({"phase": phase, "call": reply.call, "served_bytes": len(reply.body), "offline_bytes": len(offline),
                     "equal": equal})
        if not equal:
            difference = first_difference(reply.body, offline)
            failures.append(f"{phase}: served {reply.call} differs from offline generation ({difference})")
    return rows, failures


def first_difference(served: bytes, offline: bytes) -> str:
    if len(served) != len(offline):
        return f"{len(served)} bytes served, {len(offline)} offline"
    at = next(i for i, (a, b) in enumerate(zip(served, offline)) if a != b)
    return f"first differing sample {at // 2} of {len(served) // 2}"


# -- the suite -----------------------------------------------------------------------------------------------------
async def closed_loops(url: str, model: str, plan: Plan) -> list[Phase]:
    phases = []
    for number, (clients, count) in enumerate(plan.clients.items()):
        phases.append(await closed_loop(url, model, requests(count, plan.seconds, seed=number), clients))
    return phases


async def load(url: str, model: str, plan: Plan) -> list[Phase]:
    phases = await closed_loops(url, model, plan)
    # Seeds past the closed loops' (1000 + i): the burst's clips are new ones.
    calls = [(PROMPTS[i % len(PROMPTS)], plan.burst_seconds, 2000 + i) for i in range(plan.admitted + plan.extra)]
    phases.append(await burst(url, model, calls))
    return phases


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def report_checks(
    plan: Plan, phases: list[Phase], metrics: dict[str, float], settle_s: float, comparisons: list[dict[str, Any]],
) -> None:
    notes = phases[-1].notes
    refused = sum(r.status == 503 for r in phases[-1].replies)
    print(f"burst: {refused} 503s, {plan.extra} planned (the requests past {plan.admitted}); every request answered by "
          f"{seconds(notes['last_answer_s'])}, the first clip ended at {seconds(notes['first_clip_end_s'])}")
    shown = ("vivace_requests_", "vivace_kv_blocks", "vivace_queue")
    print(f"/metrics after the load (idle after {settle_s:.1f} s): "
          + ", ".join(f"{k} {v:g}" for k, v in metrics.items() if k.startswith(shown)))
    for row in comparisons:
        verdict = "equal" if row["equal"] else "DIFFERENT"
        print(f"offline check, {row['phase']}: {row['call']} {verdict} ({row['served_bytes']} bytes)")


def served_model(url: str) -> tuple[str, int]:
    """The model's id and sample rate, from /v1/models."""
    card = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]
    return card["id"], int(card["sample_rate"])


def run(options: Options) -> None:
    chosen = plan(options.quick)
    log = options.work_dir / "serve_load-server.log"
    server = Server(chosen, options, log)
    print(f"server: max-running {chosen.max_running}, max-queue {chosen.max_queue}; burst of {chosen.admitted + chosen.extra} "
          f"requests at once: the {chosen.extra} past {chosen.admitted} are planned to get 503 (server log: {log})", flush=True)
    load_before = os.getloadavg()  # write_result records the load at the end; other work on the machine skews both
    started = time.perf_counter()
    with server as url:
        print(f"server ready in {time.perf_counter() - started:.1f} s at {url}", flush=True)
        model, sample_rate = served_model(url)
        warmup = asyncio.run(closed_loop(url, model, requests(1, chosen.seconds, seed=99), 1))  # first-call costs
        phases = asyncio.run(load(url, model, chosen))
        metrics, settle_s = settled_metrics(url)
    summaries = [summary(phase, sample_rate) for phase in phases]
    print_table(f"vivace serve, demo pack int8, pcm streams of {chosen.seconds} s (burst: {chosen.burst_seconds} s)", summaries)
    comparisons, offline = offline_failures(samples(phases), options)
    report_checks(chosen, phases, metrics, settle_s, comparisons)
    failures = [f"warm-up answered {r.status} ({r.error})" for r in warmup.replies if r.status != 200]
    failures += status_failures(phases) + burst_failures(phases[-1], chosen)
    failures += metrics_failures(metrics, phases, len(warmup.replies)) + offline
    config = {
        "server_command": server.command[2:], "clients": chosen.clients, "clip_seconds": chosen.seconds,
        "max_running": chosen.max_running, "max_queue": chosen.max_queue, "burst_requests": chosen.admitted + chosen.extra,
        "planned_503": chosen.extra, "burst_seconds": chosen.burst_seconds, "server_threads": options.threads,
        "load_average_before": load_before,
    }
    results = {"phases": summaries, "metrics_after": metrics, "settle_s": settle_s, "offline": comparisons, "failures": failures}
    finish("serve_load", write_result("serve_load", options, config, results), failures)
    print(f"checks passed: only the planned 503s; an idle engine with no KV block in use afterwards; "
          f"{len(comparisons)} served clips equal to offline generation")


def finish(suite: str, path: Path, failures: list[str]) -> None:
    """Says where the results went; exits non-zero with the first failed check in one line (the rest are in the file)."""
    print(f"wrote {path}")
    if failures:
        more = f" (and {len(failures) - 1} more, in {path.name})" if len(failures) > 1 else ""
        raise SystemExit(f"{suite}: check failed: {failures[0]}{more}")
