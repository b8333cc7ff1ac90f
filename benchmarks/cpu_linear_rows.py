"""How a CPU linear layer's time grows with the rows it multiplies: the bound on what batching requests can gain.

    python -m benchmarks.cpu_linear_rows [--threads 1] [--rows 1 2 4 8 16 32]

Batching requests helps a decode step only where one row costs about as much as several: a weight-bandwidth-bound
matrix-vector product. A small model's weights stay in the CPU's caches, so its products are compute-bound from a
few rows on, and the gain per row levels off. For the linear shapes of the demo pack's stages (d_model 256,
d_ff 1024) and of MusicGen-small (1024, 4096), in float32 through F.linear and through the engine's Linear
(W @ x^T for 2 to 64 rows, vivace.model.transformer), and int8 weight-only through each CPU kernel of
vivace.model.quant.Int8Linear this machine runs (torch._weight_int8pack_mm with bf16 activations; vivace's AMX and
VNNI kernels on packed weights and its AVX2 kernel, float32 activations), this prints µs per call and the per-row speed-up over one row, and writes
benchmarks/results/cpu_linear_rows-<date>.json. Times are medians of 200 calls, each timed alone, after 5 warm-up calls.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import Options, median_ms, table, time_calls, write_result
from vivace.model.quant import Int8Linear, native_kernels, pack_mm_available, quantize_weight
from vivace.model.transformer import Linear

SHAPES = {  # (in_features, out_features) of one layer's linears
    "demo": [(256, 768), (256, 256), (256, 1024), (1024, 256)],
    "musicgen-small": [(1024, 1024), (1024, 4096), (4096, 1024)],
}


@torch.inference_mode()
def layer_us(shapes: list[tuple[int, int]], rows: int, mode: str) -> float:
    """µs for one pass through every linear of the list at `rows` rows."""
    gen = torch.Generator().manual_seed(0)
    calls = []
    for k, n in shapes:
        x = torch.randn(rows, k, generator=gen)
        if mode == "F.linear":
            w = torch.randn(n, k, generator=gen)
            calls.append(lambda x=x, w=w: F.linear(x, w))
        elif mode == "Linear":
            linear = Linear(k, n, bias=False)
            calls.append(lambda x=x, linear=linear: linear(x))
        elif mode == "int8 pack_mm":
            q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
            scales = (torch.rand(n, generator=gen) + 0.5).bfloat16()
            xb = x.bfloat16()
            calls.append(lambda xb=xb, q=q, s=scales: torch._weight_int8pack_mm(xb, q, s))
        else:  # "int8 amx" / "int8 vnni" / "int8 avx2": the layer as the engine runs it, Python wrapper included
            layer = Int8Linear(*quantize_weight(torch.randn(n, k, generator=gen)), None, torch.float32)
            layer.kernel = mode.removeprefix("int8 ")
            calls.append(lambda x=x, layer=layer: layer(x))
    return median_ms(time_calls(lambda: [call() for call in calls], "cpu", repeats=200, warmup=5)) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    args = parser.parse_args()
    if 1 not in args.rows:
        parser.error("--rows must include 1 (the speed-ups are against one row)")
    args.rows = sorted(set(args.rows))
    torch.set_num_threads(args.threads)
    modes = ["F.linear", "Linear", *(["int8 pack_mm"] if pack_mm_available() else []),
             *(f"int8 {kernel}" for kernel in native_kernels())]
    results: list[dict[str, Any]] = []
    for model, shapes in SHAPES.items():
        flops_per_row = 2 * sum(k * n for k, n in shapes)
        for mode in modes:
            single = None
            for rows in args.rows:
                us = layer_us(shapes, rows, mode)
                single = us if single is None else single
                results.append({
                    "model": model, "mode": mode, "rows": rows, "us": us,
                    "per_row_speedup": single * rows / us, "gflops": flops_per_row * rows / us / 1e3,
                })
    print(table(
        ["model", "mode", "rows", "µs / layer", "per-row speed-up vs 1 row", "GFLOP/s"],
        [[r["model"], r["mode"], r["rows"], r["us"], r["per_row_speedup"], r["gflops"]] for r in results],
        title=f"one layer's linears, {args.threads} thread(s)",
    ))
    options = Options(False, Path("."), "cpu", args.threads, "float32")
    path = write_result("cpu_linear_rows", options, {"shapes": SHAPES, "rows": args.rows}, {"layers": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
