"""Versus suite: vivace against transformers' MusicGen generate on this CPU, side by side in one process.

The MusicGen-small-shaped random checkpoint of the musicgen suite (built and converted once in --work-dir), one
prompt, seed 0, top-k 250, temperature 1, guidance 3.0, batch 1, clips of 2 s (--quick: 0.2 s) and 10 s. Every round
runs every engine once, in the same order, after one untimed warm-up generation each; a figure is the median over
the rounds (3; --quick 1). Engines: transformers float32 (MusicgenForConditionalGeneration.generate), and vivace in
float32 and int8 (its kernels chosen by measurement) int4 (4-bit layer weights, int8 heads; CPUs with AVX-512 VNNI or AVX2) and bfloat16 weights under float32 activations (CPUs
with AVX-512), each with the decode steps' layers in one native call
(vivace.model.decoder_stack; float32 natively where the CPU has AVX-512) and with the layers run from Python (float32
on the linear plan measured on this machine, vivace.model.linear_plan), bfloat16, and int8 on torch's int8 pack mm
alone. The machine record names the CPU model and its flags, torch's and transformers' versions.
"""
from __future__ import annotations

import statistics
import time
import warnings
from typing import Any

import torch

from benchmarks.common import Options, release_memory, table, write_result
from benchmarks.musicgen_suite import GUIDANCE, PROMPTS, TOP_K, WARMUP_STEPS, ensure_models, tokenizer
from vivace import Engine, _C
from vivace.model.int4 import int4_supported

VIVACE = {  # name: Engine.from_pack options
    "vivace float32": {},  # the decode steps' layers in one native call each (on a CPU with AVX-512)
    "vivace float32, Python layers": {"native_layers": False},  # linear plan measured here (vivace.model.linear_plan)
    "vivace bfloat16": {"dtype": "bfloat16"},
    "vivace int8": {"quantize": "int8"},  # each layer shape on the faster kernel measured here (vivace.model.quant)
    "vivace int8, Python layers": {"quantize": "int8", "native_layers": False},  # the same kernels, no native stack
    "vivace int8, pack_mm": {"quantize": "int8", "int8_kernel": "pack_mm"},
    "vivace int4": {"quantize": "int4"},  # 4-bit layer weights, int8 heads (CPUs with AVX-512 VNNI or AVX2; else left out)
    "vivace bfloat16 weights": {"quantize": "bfloat16"},  # float32 activations (CPUs with AVX-512; else left out)
}


def cpu_flags() -> list[str]:
    """The CPU features that decide which kernels are fast: AVX2 / AVX-512 (VNNI, BF16) / AMX."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    except OSError:
        return []
    return sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))


def transformers_generate(model: Any, seconds: float) -> float:
    inputs = tokenizer()([PROMPTS[0]], return_tensors="pt")
    frames = round(seconds * model.config.audio_encoder.frame_rate)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        start = time.perf_counter()
        model.generate(
            **inputs, do_sample=True, top_k=TOP_K, guidance_scale=GUIDANCE,
            max_new_tokens=frames + model.decoder.num_codebooks - 1,
        )
        return time.perf_counter() - start


def vivace_generate(engine: Engine, seconds: float) -> float:
    start = time.perf_counter()
    engine.generate(PROMPTS[0], seconds, seed=0, top_k=TOP_K, guidance_scale=GUIDANCE)
    return time.perf_counter() - start


def run(options: Options) -> dict[str, Any]:
    from transformers import MusicgenForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    src, pack = ensure_models(options.work_dir)
    durations = [0.2] if options.quick else [2.0, 10.0]
    rounds = 1 if options.quick else 3
    model = MusicgenForConditionalGeneration.from_pretrained(src).eval()
    kernels = {"int4": int4_supported(), "bfloat16": _C.float32_linear_fast()}  # where their modes run
    runnable = {name: kwargs for name, kwargs in VIVACE.items() if kernels.get(kwargs.get("quantize"), True)}
    engines = {name: Engine.from_pack(pack, **kwargs) for name, kwargs in runnable.items()}
    calls = {"transformers float32": lambda s: transformers_generate(model, s)}
    calls.update({name: (lambda s, e=engine: vivace_generate(e, s)) for name, engine in engines.items()})
    warmup = WARMUP_STEPS / engines["vivace float32"].config.frame_rate
    for call in calls.values():
        call(warmup)
    results: dict[str, Any] = {"linear_plan": engines["vivace float32, Python layers"].info()["linear_matmul_rows"],
                               "native_layers": engines["vivace float32"].info()["native_layers"],
                               "int8_kernels": engines["vivace int8"].info()["int8_kernels"]}
    rows = []
    for seconds in durations:
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(rounds):
            for name, call in calls.items():
                times[name].append(call(seconds))
        base = statistics.median(times["transformers float32"])
        results[f"{seconds:g}s"] = {
            name: {"wall_s": statistics.median(t), "rounds_s": t, "vs_transformers": base / statistics.median(t)}
            for name, t in times.items()
        }
        for name, t in times.items():
            rows.append([f"{seconds:g} s", name, f"{statistics.median(t):.2f}", f"{base / statistics.median(t):.2f}x"])
    print(table(["clip", "engine", "wall s (median)", "vs transformers"], rows,
                title=f"MusicGen-small shape, guidance {GUIDANCE}, top-k {TOP_K}, batch 1, {rounds} alternating rounds"))
    print(f"measured linear plan (W x^T at these row buckets): {results['linear_plan']}")
    print(f"measured int8 kernels: {results['int8_kernels']}")
    calls.clear()
    engines.clear()
    release_memory()
    config = {"prompt": PROMPTS[0], "durations_s": durations, "rounds": rounds, "cpu_flags": cpu_flags()}
    path = write_result("versus", options, config, results)
    print(f"wrote {path}")
    return results
