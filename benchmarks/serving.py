"""Serving suite: many requests on one engine core, against the same requests one at a time in the same run.

For each pack (the bundled demo pack, with float32, bfloat16 and int8 KV caches; a MusicGen-small-shaped random pack
unless --quick), the same list of requests
(mixed durations, each with its own seed) runs:
- one at a time, each a plain Engine.generate call (the baseline);
- through one AsyncEngine with closed-loop clients (1, 2, 4, 8, 16 at once: each client sends its next request when
  the last one ends);
- with Poisson arrivals at a rate near the engine's measured capacity.
Reported: aggregate seconds of audio per wall second, time to first audio p50 / p95, per-request real-time factor
(wall time over audio time, p50), mean KV block use of the busiest stage, sampled while requests run, and the KV
cache bytes the decode steps read (every key a row attended to, every layer) per second of wall time and per second
of audio. Dividing the streaming read bandwidth measured in the same run (floor.gemv_bandwidth, float32, one row)
by the bytes per second of audio gives the "KV ceiling": the audio seconds per second the machine could reach if
reading the cache were the only work. Beside it, the "batching ceiling" adds the other work each request brings
whatever runs beside it, as the one-at-a-time run measured it per second of audio: its prefill (compute-bound at its
row counts, so no cheaper in a batch) and its pipeline (token bookkeeping, events and codec decode, per request per
step). It leaves out the decode steps' linears, sampling and the core's fixed costs, so it is an estimate of the most
that batching can give, not a strict bound: cache reads served from the last-level cache (a few requests' caches
fit) run faster than the measured streaming bandwidth.
"""
from __future__ import annotations

import asyncio
import random
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from vivace import AsyncEngine, Engine

from benchmarks.common import ROOT, Options, table, write_result
from benchmarks.floor import gemv_bandwidth

DEMO_PACK = ROOT / "packs" / "demo"
PROMPTS = ["upbeat piano with acoustic bass and rock drums", "slow solo piano in d minor", "ambient pads", "brushed drums"]


def requests(count: int, durations: list[float], seed: int) -> list[tuple[str, float, int]]:
    rng = random.Random(seed)
    return [(PROMPTS[i % len(PROMPTS)], rng.choice(durations), 1000 + i) for i in range(count)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def work_done(engine: Engine) -> tuple[int, float, float]:
    """The core's counters so far: KV cache bytes read (keys attended to times their bytes, all stages), host
    seconds in prefill, and host seconds in the requests' pipelines."""
    runners = engine.core.runners.values()
    return (sum(runner.kv_bytes_read for runner in runners),
            sum(runner.stats.prefill_s for runner in runners), engine.core.request_s)


def summary(mode: str, records: list[dict[str, float]], wall: float, kv_use: float | None,
            work: tuple[int, float, float]) -> dict[str, Any]:
    audio = sum(r["audio_s"] for r in records)
    first = [r["first_audio_s"] for r in records]
    kv_bytes, prefill_s, request_s = work
    return {
        "mode": mode, "requests": len(records), "audio_s": audio, "wall_s": wall, "audio_s_per_s": audio / wall,
        "first_audio_p50_s": percentile(first, 0.5), "first_audio_p95_s": percentile(first, 0.95),
        "rtf_p50": statistics.median(r["wall_s"] / r["audio_s"] for r in records), "kv_use": kv_use,
        "kv_gb_read_per_s": kv_bytes / wall / 1e9, "kv_gb_per_audio_s": kv_bytes / audio / 1e9,
        "prefill_ms_per_audio_s": prefill_s / audio * 1e3, "pipeline_ms_per_audio_s": request_s / audio * 1e3,
    }


def since(engine: Engine, before: tuple[int, float, float]) -> tuple[int, float, float]:
    return tuple(now - then for now, then in zip(work_done(engine), before))  # type: ignore[return-value]


def one_at_a_time(engine: Engine, calls: list[tuple[str, float, int]]) -> dict[str, Any]:
    records = []
    before = work_done(engine)
    start = time.perf_counter()
    for prompt, seconds, seed in calls:
        began = time.perf_counter()
        first = None
        samples = 0
        for chunk in engine.stream(prompt, seconds, seed=seed):
            first = first if first is not None else time.perf_counter() - began
            samples += len(chunk.pcm)
        records.append({"audio_s": samples / engine.sample_rate, "first_audio_s": first, "wall_s": time.perf_counter() - began})
    return summary("one at a time", records, time.perf_counter() - start, None, since(engine, before))


class KVSampler:
    """Samples the used fraction of the busiest stage's KV pool every 20 ms while requests run."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            if self.engine.core.has_unfinished():
                self.samples.append(max(
                    1 - runner.allocator.num_free / runner.pool.num_blocks for runner in self.engine.core.runners.values()
                ))

    def __enter__(self) -> KVSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def mean(self) -> float | None:
        return statistics.fmean(self.samples) if self.samples else None


async def timed(shared: AsyncEngine, prompt: str, seconds: float, seed: int, records: list[dict[str, float]]) -> None:
    began = time.perf_counter()
    first = None
    samples = 0
    async for chunk in shared.stream_async(prompt, seconds, seed=seed):
        first = first if first is not None else time.perf_counter() - began
        samples += len(chunk.pcm)
    records.append({"audio_s": samples / shared.sample_rate, "first_audio_s": first, "wall_s": time.perf_counter() - began})


def closed_loop(shared: AsyncEngine, calls: list[tuple[str, float, int]], clients: int) -> dict[str, Any]:
    records: list[dict[str, float]] = []
    queue = list(calls)

    async def client() -> None:
        while queue:
            await timed(shared, *queue.pop(0), records)

    async def run() -> None:
        await asyncio.gather(*(client() for _ in range(clients)))

    before = work_done(shared.engine)
    with KVSampler(shared.engine) as kv:
        start = time.perf_counter()
        asyncio.run(run())
        wall = time.perf_counter() - start
    return summary(f"{clients} clients", records, wall, kv.mean(), since(shared.engine, before))


def poisson(shared: AsyncEngine, calls: list[tuple[str, float, int]], rate: float, seed: int) -> dict[str, Any]:
    records: list[dict[str, float]] = []
    rng = random.Random(seed)

    async def run() -> None:
        tasks = []
        for call in calls:
            tasks.append(asyncio.create_task(timed(shared, *call, records)))
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)

    before = work_done(shared.engine)
    with KVSampler(shared.engine) as kv:
        start = time.perf_counter()
        asyncio.run(run())
        wall = time.perf_counter() - start
    return summary(f"Poisson {rate:.2f} req/s", records, wall, kv.mean(), since(shared.engine, before))


def suite(
    name: str, pack: Path, calls: list[tuple[str, float, int]], clients: list[int], options: Options, read_gb_s: float,
    **load: Any,
) -> list[dict[str, Any]]:
    engine = Engine.from_pack(pack, device=options.device, max_running=max(clients), max_waiting=len(calls), **load)
    engine.generate(*calls[0][:2], seed=0)  # warm-up
    results = [one_at_a_time(engine, calls)]
    with AsyncEngine(engine) as shared:
        results += [closed_loop(shared, calls, n) for n in clients]
        best = max(r["audio_s_per_s"] for r in results[1:])
        mean_audio = statistics.fmean(seconds for _, seconds, _ in calls)
        results.append(poisson(shared, calls, 0.8 * best / mean_audio, seed=1))  # arrivals at 80 % of capacity
    alone = results[0]
    unshared_ms = alone["prefill_ms_per_audio_s"] + alone["pipeline_ms_per_audio_s"]
    for r in results:
        r["kv_ceiling_audio_s_per_s"] = read_gb_s / r["kv_gb_per_audio_s"]
        r["batching_ceiling_audio_s_per_s"] = 1e3 / (r["kv_gb_per_audio_s"] / read_gb_s * 1e3 + unshared_ms)
    print(table(
        ["mode", "requests", "audio s/s", "TTFA p50 s", "TTFA p95 s", "RTF p50", "KV use", "KV GB/s", "KV ceiling",
         "prefill ms/audio s", "pipeline ms/audio s"],
        [[r["mode"], r["requests"], r["audio_s_per_s"], r["first_audio_p50_s"], r["first_audio_p95_s"], r["rtf_p50"],
          r["kv_use"], r["kv_gb_read_per_s"], r["kv_ceiling_audio_s_per_s"], r["prefill_ms_per_audio_s"],
          r["pipeline_ms_per_audio_s"]] for r in results],
        title=f"{name}: {len(calls)} requests of {sorted({s for _, s, _ in calls})} s; KV ceiling = audio s/s at "
        f"{read_gb_s:.1f} GB/s of reads if reading the KV cache were all the work",
    ), flush=True)
    print(f"batching ceiling (estimate): {alone['batching_ceiling_audio_s_per_s']:.2f} audio s/s (KV reads at {read_gb_s:.1f} GB/s "
          f"+ {alone['prefill_ms_per_audio_s']:.1f} ms prefill + {alone['pipeline_ms_per_audio_s']:.1f} ms pipelines "
          f"per audio second, one at a time), {alone['batching_ceiling_audio_s_per_s'] / alone['audio_s_per_s']:.2f}x "
          "one at a time", flush=True)
    return results


def run(options: Options) -> None:
    read = gemv_bandwidth("float32", 1, options.device, layers=8, repeats=5)  # streaming reads, as attention's
    print(f"read bandwidth (float32 GEMV, one row): {read['gb_s']:.1f} GB/s", flush=True)
    clients = [1, 2, 4, 8] if options.quick else [1, 2, 4, 8, 16]
    demo_calls = requests(8 if options.quick else 16, [2.0, 4.0] if options.quick else [3.0, 6.0], seed=0)
    results: dict[str, Any] = {"read_bandwidth": read}
    results["demo"] = suite("demo pack, int8", DEMO_PACK, demo_calls, clients, options, read["gb_s"], quantize="int8")
    for kv_dtype in ("bfloat16", "int8"):
        results[f"demo_{'bf16' if kv_dtype == 'bfloat16' else kv_dtype}_kv"] = suite(
            f"demo pack, int8, {kv_dtype} KV caches", DEMO_PACK, demo_calls, clients, options, read["gb_s"],
            quantize="int8", kv_cache_dtype=kv_dtype,
        )
    config: dict[str, Any] = {"clients": clients, "demo_requests": demo_calls}
    if not options.quick:
        from benchmarks.musicgen_suite import ensure_models

        _, pack = ensure_models(options.work_dir)
        musicgen_calls = requests(16, [1.0, 2.0], seed=1)
        results["musicgen_small"] = suite(
            "MusicGen-small-shaped random pack, float32", pack, musicgen_calls, clients, options, read["gb_s"]
        )
        config["musicgen_requests"] = musicgen_calls
    path = write_result("serving", options, config, results)
    print(f"wrote {path}")
