"""MusicLM suite: the paper-size random pack (three 24-layer, 1024-wide stages) on one device.

- per-stage decode: one sequence at a fixed context in that stage's StageRunner (the engine's own runner, pool and
  sampler), prefilled once, then runner.step() timed per decode step (batch 1); on CUDA also with 16 decode steps per
  host sync replayed as CUDA graphs (one runner.step() per 16 tokens, its time divided by 16);
- time to first audio and real-time factor (seconds of compute per second of audio) from engine.stream at batch 1;
- throughput in seconds of audio per second at several batch sizes (distinct prompts, seeds 0..B-1), through the
  pipeline with the engine's runners, whose preemption counts are reported.
Peak RSS per run: the process's peak over the run (the mark reset before it when the kernel allows), weights included.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import Options, PeakRSS, median_ms, release_memory, sync, table, time_calls, write_result
from vivace import AudioChunk, Engine
from vivace.core.engine_core import CoreLimits
from vivace.core.kv_cache import KVCachePool
from vivace.core.sequence import Sequence, TimeMajorSchedule
from vivace.events import StageProgress
from vivace.families.musiclm.config import PackConfig
from vivace.families.musiclm.layout import MusicLMLayout
from vivace.families.musiclm.pack import STAGES
from vivace.families.musiclm.random_pack import random_pack

PROMPTS = (
    "upbeat piano trio with walking bass", "slow ambient pads", "brushed drums and upright bass", "solo cello in d minor",
    "lo-fi hip hop beat", "big band swing", "string quartet, pizzicato", "synthwave with arpeggios",
)
QUICK = {"stage_context": 256, "stage_steps": 5, "stream_s": 0.24, "throughput_s": 0.24, "batches": (1, 4)}
FULL_CPU = {"stage_context": None, "stage_steps": 20, "stream_s": 3.0, "throughput_s": 0.5, "batches": (1, 8, 32)}
FULL_GPU = {"stage_context": None, "stage_steps": 50, "stream_s": 10.0, "throughput_s": 10.0, "batches": (1, 8, 32)}
TICK_ORDER = {"fine": 0, "coarse": 1, "semantic": 2}  # the order of one pipeline tick's StageProgress events
MEMORY_SHARE = 0.4  # at most this share of the device's memory for the KV pools
GRAPH_STEPS = 16  # decode steps per host sync of the CUDA-graph stage figures


def ensure_pack(work_dir: Path) -> Path:
    path = work_dir / "musiclm-paper"
    if not (path / "pack.json").is_file():
        partial = work_dir / "musiclm-paper.partial"
        print(f"writing the paper-size random pack to {path} (~1.9 GB, once)", flush=True)
        random_pack(partial, preset="paper", seed=0)
        partial.rename(path)
    return path


def window_contexts(config: PackConfig) -> dict[str, int]:
    """Mean context over the decode steps of each stage's first full window."""
    m, layout = config.musiclm, MusicLMLayout.of(config)
    frame_rate = config.sample_rate // config.codec.hop_length
    mt = layout.mt_levels
    semantic_new = round(m.semantic_window_s * m.semantic_rate)
    coarse_prompt = mt + round(m.coarse_window_s * m.semantic_rate)
    coarse_new = round(m.coarse_window_s * frame_rate) * m.coarse_levels
    fine_frames = round(m.fine_chunk_s * frame_rate)
    return {
        "semantic": mt + semantic_new // 2,
        "coarse": coarse_prompt + coarse_new // 2,
        "fine": fine_frames * m.coarse_levels + fine_frames * m.fine_levels // 2,
    }


def schedule(config: PackConfig, stage: str) -> TimeMajorSchedule:
    layout = MusicLMLayout.of(config)
    if stage == "semantic":
        return TimeMajorSchedule(1, layout.semantic_vocab, layout.semantic_offset)
    if stage == "coarse":
        return TimeMajorSchedule(layout.coarse_levels, layout.acoustic_codebook, layout.coarse_offset)
    return TimeMajorSchedule(layout.fine_levels, layout.acoustic_codebook, layout.fine_offset)


def stage_decode(engine: Engine, stage: str, context: int, steps: int, device: str, per_call: int = 1) -> dict[str, Any]:
    """Decode steps of one sequence whose cache holds `context` tokens when the timed steps start; per_call: the
    engine's steps_per_sync (each runner.step() then decodes that many tokens, its time is divided among them)."""
    runner = engine.core.runners[stage]
    cfg = engine.config.stages[stage]
    warmup = 2  # with CUDA graphs: the eager run, then the capture
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, context - 1 - warmup * per_call).tolist()
    sampling = engine.family.sampling({})[stage]
    new_tokens = (warmup + steps + 1) * per_call + 1
    seq = Sequence(0, prompt, new_tokens, schedule(engine.config, stage), sampling, seed=0, stream=0, priority=(0,))
    runner.add(seq)
    start = time.perf_counter()
    runner.step()
    sync(device)
    prefill_ms = (time.perf_counter() - start) * 1e3
    times = [t / per_call for t in time_calls(runner.step, device, repeats=steps, warmup=warmup)]
    runner.cancel_all()
    return {
        "context": context + steps * per_call // 2, "prefill_tokens": len(prompt), "prefill_ms": prefill_ms,
        "ms_per_step": median_ms(times), "ms_per_step_min": min(times) * 1e3, "steps": steps * per_call,
        "steps_per_sync": per_call,
    }


def kv_cache_gb(engine: Engine, rows: int, seconds: float) -> float:
    """Room for what every row keeps in each stage's cache (the engine splits the budget evenly across stages),
    capped at a share of the device's memory; beyond the cap the runners preempt, and the counts are reported."""
    config, m = engine.config, engine.config.musiclm
    frames = math.ceil(seconds * config.sample_rate / config.codec.hop_length)
    semantic = math.ceil(seconds * m.semantic_rate)
    mt = config.text.num_levels
    live = {
        "semantic": min(engine.family.max_sequence_tokens("semantic"), mt + semantic),
        "coarse": min(engine.family.max_sequence_tokens("coarse"), mt + semantic + frames * m.coarse_levels),
        "fine": frames * (m.coarse_levels + m.fine_levels),
    }
    chunks = math.ceil(seconds / m.fine_chunk_s)
    blocks = max(
        max(rows * (math.ceil(live[s] / engine.block_size) + chunks + 1), math.ceil(engine.family.max_sequence_tokens(s) / engine.block_size))
        for s in STAGES
    )
    cfg = config.stages["coarse"]
    per_block = KVCachePool.bytes_per_block(cfg.num_layers, engine.block_size, cfg.num_heads, cfg.head_dim, engine.dtype)
    if engine.device.type == "cuda":
        memory = torch.cuda.get_device_properties(engine.device).total_memory
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return min(len(STAGES) * blocks * per_block * 1.05, MEMORY_SHARE * memory) / 2**30


def pipeline_run(engine: Engine, rows: int, seconds: float, streamed: bool) -> dict[str, Any]:
    """One generation of `rows` prompts; streamed=True iterates engine.stream (batch-1 latency figures)."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(rows)]
    engine = Engine(engine.family, engine.device, engine.dtype, engine.block_size, kv_cache_gb(engine, rows, seconds),
                    engine.decode_options, CoreLimits(max_running=max(rows, 1)))  # pools sized for this run
    runners = engine.core.runners
    steps = {stage: 0 for stage in STAGES}
    ticks, samples, first, previous = 0, 0, None, None
    with PeakRSS() as memory:
        start = time.perf_counter()
        events = engine.stream(prompts, seconds, seed=0) if streamed else engine.events(prompts, seconds, seed=0)
        for event in events:
            if isinstance(event, StageProgress):
                steps[event.stage] += 1
                ticks += not isinstance(previous, StageProgress) or TICK_ORDER[event.stage] <= TICK_ORDER[previous.stage]
            elif isinstance(event, AudioChunk):
                if first is None:
                    first = time.perf_counter() - start
                samples += len(event.pcm)
            previous = event
        total = time.perf_counter() - start
    audio_s = samples / engine.sample_rate
    result = {
        "rows": rows, "seconds": seconds, "audio_s": audio_s, "wall_s": total, "time_to_first_audio_s": first,
        "real_time_factor": total / (audio_s / rows), "audio_s_per_s": audio_s / total,
        "kv_cache_gb": round(engine.kv_cache_gb, 2), **memory.record(),
    }
    if not streamed:
        result.update(
            stage_steps=steps, ticks=ticks, ms_per_tick=total / ticks * 1e3 if ticks else None,
            preemptions={s: r.stats.preemptions for s, r in runners.items()},
        )
    return result


def run(options: Options) -> dict[str, Any]:
    settings = QUICK if options.quick else FULL_GPU if options.device.startswith("cuda") else FULL_CPU
    pack = ensure_pack(options.work_dir)
    with PeakRSS() as memory:
        start = time.perf_counter()
        engine = Engine.from_pack(pack, device=options.device, dtype=options.musiclm_dtype)
        load_s = time.perf_counter() - start
    load = {"load_s": load_s, **memory.record()}
    contexts = window_contexts(engine.config)
    if settings["stage_context"] is not None:
        contexts = {stage: settings["stage_context"] for stage in STAGES}
    stages = {stage: stage_decode(engine, stage, contexts[stage], settings["stage_steps"], options.device) for stage in STAGES}
    release_memory()
    stream = pipeline_run(engine, 1, settings["stream_s"], streamed=True)
    throughput = []
    for rows in settings["batches"]:
        if rows == 1 and settings["throughput_s"] == settings["stream_s"]:
            throughput.append({**stream, "from": "the streamed batch-1 run"})
            continue
        throughput.append(pipeline_run(engine, rows, settings["throughput_s"], streamed=False))
        release_memory()
    info = engine.info()
    del engine
    release_memory()
    stages_graphs = {}
    if options.device.startswith("cuda"):
        engine = Engine.from_pack(pack, device=options.device, dtype=options.musiclm_dtype,
                                  steps_per_sync=GRAPH_STEPS, cuda_graphs=True)
        stages_graphs = {stage: stage_decode(engine, stage, contexts[stage], settings["stage_steps"], options.device,
                                             per_call=GRAPH_STEPS) for stage in STAGES}
        del engine
        release_memory()

    print(table(
        ["stage", "context", "ms/step", "min ms", "prefill tok", "prefill ms"],
        [[s, r["context"], r["ms_per_step"], r["ms_per_step_min"], r["prefill_tokens"], r["prefill_ms"]] for s, r in stages.items()],
        title=f"MusicLM paper-size stages, {info['dtype']}, batch 1 (StageRunner.step, median of {settings['stage_steps']})",
    ))
    if stages_graphs:
        print()
        print(table(
            ["stage", "context", "ms/step", "min ms"],
            [[s, r["context"], r["ms_per_step"], r["ms_per_step_min"]] for s, r in stages_graphs.items()],
            title=f"The same, {GRAPH_STEPS} steps per host sync replayed as CUDA graphs (per-step time = call / {GRAPH_STEPS})",
        ))
    print()
    print(table(
        ["batch", "clip s", "wall s", "first audio s", "RTF", "audio s/s", "ms/tick", "peak RSS MB"],
        [[r["rows"], r["seconds"], r["wall_s"], r["time_to_first_audio_s"], r["real_time_factor"], r["audio_s_per_s"],
          r.get("ms_per_tick"), r["peak_rss_mb"]] for r in throughput],
        title="MusicLM pipeline (RTF: compute seconds per second of audio of one row)",
    ))
    config = {
        "pack": str(pack), "pack_stored": "bfloat16 random weights (vivace.families.musiclm.random_pack.random_pack preset 'paper', seed 0)",
        "dtype": info["dtype"], "stage_contexts": contexts, **settings,
        "stage_method": "StageRunner.step() on one sequence, median wall time per decode step after 2 warm-up steps",
        "stream_method": "engine.stream(prompt, seconds, seed=0): first AudioChunk, then all chunks",
        "prompts": PROMPTS, "model": info["stages"],
    }
    results = {"load": load, "stages": stages, "stages_graphs": stages_graphs, "stream": stream, "throughput": throughput}
    path = write_result("musiclm", options, config, results)
    print(f"wrote {path}")
    return results
