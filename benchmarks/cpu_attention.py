"""CPU paged decode attention per layer call: the plain-torch reference, vivace's torch path and the C++ kernel in
each form this CPU runs (AVX-512 and portable), float32 queries over float32, bfloat16 or int8 caches.

python -m benchmarks cpu_attention [--threads N]   (prints a table, writes benchmarks/results/cpu_attention-<date>.json)

Shapes: the MusicLM paper-size stages (16 heads x 64) and a small model (4 heads x 64, the demo pack's). "layers" is
how many separate caches of that shape a timed round cycles through, as an engine's layers do: 1 keeps one layer's
caches in the CPU's caches between calls; 8 spreads the reads over eight times the bytes, usually more than the
last-level cache holds, as a decode batch of several requests does. GB/s: cached key and value bytes read per second.
"""
from __future__ import annotations

import time
from typing import Any

import torch

from vivace import _C
from vivace.kernels import cpu_paged_attention as cpu
from vivace.kernels import paged_attention as ref
from vivace.kernels.kv_int8 import as_float, quantize_rows, row_width

from benchmarks.common import Options, table, write_result

# (seqs, context, cache dtype, heads, layers)
CASES = [(1, 1262, torch.bfloat16, 16, 1), (8, 600, torch.bfloat16, 16, 1), (8, 600, torch.bfloat16, 16, 8),
         (8, 600, torch.float32, 16, 1), (8, 600, torch.float32, 16, 8), (64, 100, torch.float32, 16, 1),
         (1, 400, torch.bfloat16, 4, 1), (13, 400, torch.bfloat16, 4, 1), (13, 400, torch.bfloat16, 4, 8),
         (13, 400, torch.float32, 4, 1), (13, 400, torch.float32, 4, 8),
         (1, 1262, torch.int8, 16, 1), (8, 600, torch.int8, 16, 8), (13, 400, torch.int8, 4, 1), (13, 400, torch.int8, 4, 8)]


def case(num_seqs: int, context: int, dtype: torch.dtype, heads: int, layers: int, head_dim: int = 64, block_size: int = 16):
    """A float32 query, `layers` pairs of caches (blocks in random order), block tables, lengths and a T5 bias."""
    per_seq = -(-context // block_size)
    num_blocks = num_seqs * per_seq + 4
    def filled() -> torch.Tensor:
        values = torch.randn(num_blocks, block_size, heads, head_dim)
        return quantize_rows(values) if dtype == torch.int8 else values.to(dtype)

    caches = [(filled(), filled()) for _ in range(layers)]
    tables = torch.randperm(num_blocks)[: num_seqs * per_seq].view(num_seqs, per_seq).int()
    lens = torch.randint(context // 2, context + 1, (num_seqs,), dtype=torch.int32)
    lens[0] = context
    return torch.randn(num_seqs, heads, head_dim), caches, tables, lens, torch.randn(heads, 129)


def ms_per_call(fn, calls: list[tuple], seconds: float = 0.3) -> float:
    """Mean time of one call, cycling through `calls` (one per layer)."""
    start = time.perf_counter()
    for args in calls:
        fn(*args)
    rounds = max(3, min(2000, int(seconds / (time.perf_counter() - start))))
    start = time.perf_counter()
    for _ in range(rounds):
        for args in calls:
            fn(*args)
    return (time.perf_counter() - start) / (rounds * len(calls)) * 1e3


def native(isa: str):
    def call(query, key_cache, value_cache, tables, lens, scale, bias):
        arrays = [cpu.cache_array(key_cache), cpu.cache_array(value_cache)]
        return _C.paged_decode_attention(query.numpy(), *arrays, tables.numpy(), lens.numpy(), scale, bias.numpy(),
                                         torch.get_num_threads(), isa)
    return call


def run(options: Options) -> None:
    torch.manual_seed(0)
    isas = _C.paged_attention_isas(64)
    rows = []
    for num_seqs, context, dtype, heads, layers in CASES:
        query, caches, tables, lens, bias = case(num_seqs, context, dtype, heads, layers)
        calls = [(query, k, v, tables, lens, 0.125, bias) for k, v in caches]
        expected = ref.paged_decode_attention(query, as_float(caches[0][0]), as_float(caches[0][1]), tables, lens, 0.125, bias)
        row: dict[str, Any] = {"seqs": num_seqs, "context": context, "heads": heads, "cache_dtype": str(dtype)[6:],
                               "layers": layers, "reference_ms": ms_per_call(ref.paged_decode_attention, calls),
                               "torch_path_ms": ms_per_call(cpu.torch_decode_attention, calls)}
        read = int(lens.sum()) * heads * row_width(64, dtype) * 2 * caches[0][0].element_size()
        for isa in ("avx512", "portable"):
            if isa in isas:
                out = torch.from_numpy(native(isa)(*calls[0]))
                row[f"{isa}_ms"] = ms_per_call(native(isa), calls)
                row[f"{isa}_gb_s"] = read / row[f"{isa}_ms"] / 1e6
                row[f"{isa}_max_rel_err"] = ((out - expected).abs().max() / expected.abs().max()).item()
        rows.append(row)
    print(table(
        ["seqs", "context", "heads", "caches", "layers", "ref ms", "torch ms", *(f"{isa} ms" for isa in isas),
         *(f"{isa} GB/s" for isa in isas), "max rel err"],
        [[r["seqs"], r["context"], r["heads"], r["cache_dtype"], r["layers"], r["reference_ms"], r["torch_path_ms"],
          *(r[f"{isa}_ms"] for isa in isas), *(r[f"{isa}_gb_s"] for isa in isas),
          max(r[f"{isa}_max_rel_err"] for isa in isas)] for r in rows],
        title=f"paged decode attention per layer call, float32 queries, {torch.get_num_threads()} threads",
    ), flush=True)
    path = write_result("cpu_attention", options, {"cases": [list(map(str, c)) for c in CASES], "isas": isas}, {"cases": rows})
    print(f"wrote {path}")
