"""How the native decoder stack spreads one decode step over threads: row slices against split layers.

With row slices each thread runs every layer for a slice of the batch's rows; without, every linear and the attention
split across the threads (vivace._C.DecoderStack's row_slices). For the demo pack's coarse stage (int8 weights; int8
and bfloat16 KV caches) and, unless --quick, the MusicGen-small-shaped random pack's decoder (int8 and float32
weights, cross-attending to 12 text positions), one decode call at several (rows, context) shapes through both forms,
built on the same model and caches, in alternating rounds: ms per call, the median over rounds of each round's
median. "rule" is the form the stack picks by itself (row slices where the layers' weights fit in the last-level
cache). Writes benchmarks/results/stack_rows-<date>.json.

python -m benchmarks stack_rows [--threads N] [--quick]
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vivace import Engine
from vivace.model.decoder_stack import NativeDecoderStack
from vivace.model.transformer import AttentionBatch, CrossBatch

from benchmarks.common import Options, median_ms, table, time_calls, write_result
from benchmarks.serving import DEMO_PACK

DEMO_SHAPES = [(1, 500), (2, 500), (8, 1), (8, 500), (16, 300)]
MUSICGEN_SHAPES = [(2, 100), (8, 100)]
ENCODER_POSITIONS = 12


def step_batch(model: Any, rows: int, context: int, block_size: int, num_blocks: int) -> tuple[torch.Tensor, AttentionBatch]:
    """Inputs of one decode step: rows on distinct random blocks, each at `context` keys (its last slot written)."""
    per_row = -(-context // block_size)
    rng = np.random.default_rng(0)
    tables = torch.from_numpy(rng.choice(num_blocks, size=(rows, per_row), replace=False).astype(np.int32))
    cross = None
    if model.config.cross_attention:
        keys, values = model.encode_cross(torch.randn(rows, ENCODER_POSITIONS, model.config.cross_dim))
        cross = CrossBatch(keys=keys, values=values, enc_mask=torch.ones(rows, ENCODER_POSITIONS, dtype=torch.bool),
                           token_seq=torch.arange(rows))
    batch = AttentionBatch(
        slot_mapping=tables[:, -1].long() * block_size + (context - 1) % block_size, block_tables=tables,
        context_lens=torch.full((rows,), context, dtype=torch.int32),
        query_start_loc=torch.arange(rows + 1, dtype=torch.int32), is_decode=True, cross=cross,
    )
    return torch.randn(rows, model.config.d_model), batch


@torch.inference_mode()
def compare(name: str, pack: Path, stage: str | None, shapes: list[tuple[int, int]], calls: int, rounds: int,
            **load: Any) -> list[dict[str, Any]]:
    engine = Engine.from_pack(pack, device="cpu", **load)
    runner = engine.core.runners[stage] if stage else next(iter(engine.core.runners.values()))
    model, caches = runner.model, runner.pool.layers()
    if model.native_decoder is None:
        raise SystemExit(f"{name}: the native decoder stack does not run this stage on this CPU")
    forms = {"sliced": NativeDecoderStack(model, row_slices=True), "split": NativeDecoderStack(model, row_slices=False)}
    rule = "sliced" if model.native_decoder.stack.row_slices else "split"
    results = []
    for rows, context in shapes:
        hidden, batch = step_batch(model, rows, context, runner.pool.block_size, runner.pool.num_blocks)
        medians: dict[str, list[float]] = {form: [] for form in forms}
        for _ in range(rounds):
            for form, stack in forms.items():
                times = time_calls(lambda: stack(hidden, caches, batch, model.distance_bias), "cpu", calls, warmup=2)
                medians[form].append(median_ms(times))
        split, sliced = statistics.median(medians["split"]), statistics.median(medians["sliced"])
        results.append({"config": name, "rows": rows, "context": context, "split_ms": split, "sliced_ms": sliced,
                        "speedup": split / sliced, "rule": rule, "rounds": medians})
    return results


def run(options: Options) -> None:
    rounds = 3 if options.quick else 5
    results = []
    for kv in ("int8", "bfloat16"):
        results += compare(f"demo coarse, int8, {kv} KV", DEMO_PACK, "coarse", DEMO_SHAPES, 100, rounds, quantize="int8",
                           kv_cache_dtype=kv)
    if not options.quick:
        from benchmarks.musicgen_suite import ensure_models

        _, pack = ensure_models(options.work_dir)
        results += compare("MusicGen-small, int8", pack, None, MUSICGEN_SHAPES, 10, rounds, quantize="int8")
        results += compare("MusicGen-small, float32", pack, None, MUSICGEN_SHAPES, 10, rounds)
    print(table(
        ["config", "rows", "context", "split ms", "sliced ms", "split / sliced", "rule"],
        [[r["config"], r["rows"], r["context"], r["split_ms"], r["sliced_ms"], r["speedup"], r["rule"]] for r in results],
        title=f"one decode call of the native stack, {torch.get_num_threads()} threads, medians of {rounds} alternating rounds",
    ), flush=True)
    path = write_result("stack_rows", options, {"rounds": rounds, "demo_shapes": DEMO_SHAPES,
                                                "musicgen_shapes": MUSICGEN_SHAPES}, {"calls": results})
    print(f"wrote {path}")
