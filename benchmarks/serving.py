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
reading the cache were the only work, a bound no batching can pass.
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


def kv_bytes_read(engine: Engine) -> int:
    """KV cache bytes every decode step so far read: keys attended to times their bytes, over all stages."""
    return sum(runner.stats.context_tokens * runner.pool.bytes_per_token for runner in engine.core.runners.values())


def summary(mode: str, records: list[dict[str, float]], wall: float, kv_use: float | None, kv_bytes: int) -> dict[str, Any]:
    audio = sum(r["audio_s"] for r in records)
    first = [r["first_audio_s"] for r in records]
    return {
        "mode": mode, "requests": len(records), "audio_s": audio, "wall_s": wall, "audio_s_per_s": audio / wall,
        "first_audio_p50_s": percentile(first, 0.5), "first_audio_p95_s": percentile(first, 0.95),
        "rtf_p50": statistics.median(r["wall_s"] / r["audio_s"] for r in records), "kv_use": kv_use,
        "kv_gb_read_per_s": kv_bytes / wall / 1e9, "kv_gb_per_audio_s": kv_bytes / audio / 1e9,
    }


def one_at_a_time(engine: Engine, calls: list[tuple[str, float, int]]) -> dict[str, Any]:
    records = []
    read_before = kv_bytes_read(engine)
    start = time.perf_counter()
    for prompt, seconds, seed in calls:
        began = time.perf_counter()
        first = None
        samples = 0
        for chunk in engine.stream(prompt, seconds, seed=seed):
            first = first if first is not None else time.perf_counter() - began
            samples += len(chunk.pcm)
        records.append({"audio_s": samples / engine.sample_rate, "first_audio_s": first, "wall_s": time.perf_counter() - began})
    return summary("one at a time", records, time.perf_counter() - start, None, kv_bytes_read(engine) - read_before)


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

    read_before = kv_bytes_read(shared.engine)
    with KVSampler(shared.engine) as kv:
        start = time.perf_counter()
        asyncio.run(run())
        wall = time.perf_counter() - start
    return summary(f"{clients} clients", records, wall, kv.mean(), kv_bytes_read(shared.engine) - read_before)


def poisson(shared: AsyncEngine, calls: list[tuple[str, float, int]], rate: float, seed: int) -> dict[str, Any]:
    records: list[dict[str, float]] = []
    rng = random.Random(seed)

    async def run() -> None:
        tasks = []
        for call in calls:
            tasks.append(asyncio.create_task(timed(shared, *call, records)))
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)

    read_before = kv_bytes_read(shared.engine)
    with KVSampler(shared.engine) as kv:
        start = time.perf_counter()
        asyncio.run(run())
        wall = time.perf_counter() - start
    return summary(f"Poisson {rate:.2f} req/s", records, wall, kv.mean(), kv_bytes_read(shared.engine) - read_before)


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
    for r in results:
        r["kv_ceiling_audio_s_per_s"] = read_gb_s / r["kv_gb_per_audio_s"]
    print(table(
        ["mode", "requests", "audio s/s", "TTFA p50 s", "TTFA p95 s", "RTF p50", "KV use", "KV GB/s", "KV ceiling"],
        [[r["mode"], r["requests"], r["audio_s_per_s"], r["first_audio_p50_s"], r["first_audio_p95_s"], r["rtf_p50"],
          r["kv_use"], r["kv_gb_read_per_s"], r["kv_ceiling_audio_s_per_s"]] for r in results],
        title=f"{name}: {len(calls)} requests of {sorted({s for _, s, _ in calls})} s; KV ceiling = audio s/s at "
        f"{read_gb_s:.1f} GB/s of reads if reading the KV cache were all the work",
    ), flush=True)
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
