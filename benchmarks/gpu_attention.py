"""Decode attention over the paged KV cache: achieved bandwidth against the device's measured copy bandwidth.

    python benchmarks/gpu_attention.py [--head-dims 64 128] [--batches 1 4 16] [--contexts 4096 16384 65536]

Bytes per call = K and V read for every sequence's context + the query read + the output written (block
tables, bias and partition scratch are left out, so the figure is a lower bound on traffic). Times are
triton.testing.do_bench medians, which flush L2 between runs. Before timing, the kernels are checked against
the plain-torch reference on this device. Results go to benchmarks/results/gpu_attention_<device>_<time>.json.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import platform
import re
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    sys.exit("gpu_attention.py needs a CUDA device, and torch.cuda.is_available() is False on this machine.")

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402
from vivace.kernels import paged_attention as ref  # noqa: E402
from vivace.kernels import triton_paged_attention as tpa  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
RESULTS = Path(__file__).resolve().parent / "results"


def copy_bandwidth(num_bytes: int) -> float:
    """Device-to-device copy, bytes read + written per second (the practical bandwidth ceiling)."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=400, return_mode="median")
    return 2 * num_bytes / (ms * 1e-3)


def paged_case(
    batch: int, context: int, num_heads: int, head_dim: int, block_size: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full-length contexts whose blocks are scattered across the pool, as after a long-running server."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    blocks_per_seq = -(-context // block_size)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, block_size, num_heads, head_dim)
    key_cache = torch.randn(shape, generator=gen, device="cuda").to(dtype)
    value_cache = torch.randn(shape, generator=gen, device="cuda").to(dtype)
    order = torch.randperm(num_blocks, generator=gen, device="cuda")
    block_tables = order.view(batch, blocks_per_seq).to(torch.int32)
    context_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    query = torch.randn(batch, num_heads, head_dim, generator=gen, device="cuda").to(dtype)
    return query, key_cache, value_cache, block_tables, context_lens


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    return ((out.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def check_against_reference(num_heads: int, block_size: int) -> list[str]:
    """Decode and prefill on this GPU against the reference; returns the failures."""
    failures = []
    for dtype, tolerance in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        for head_dim in (64, 128):
            query, key_cache, value_cache, tables, lens = paged_case(3, 3000, num_heads, head_dim, block_size, dtype)
            lens = torch.tensor([3000, 1, 1777], dtype=torch.int32, device="cuda")
            bias = torch.randn(num_heads, 129, device="cuda")
            for distance_bias in (None, bias):
                args = (query, key_cache, value_cache, tables, lens, head_dim ** -0.5, distance_bias)
                error = relative_error(tpa.paged_decode_attention(*args), ref.paged_decode_attention(*args))
                if error > tolerance:
                    failures.append(f"decode {dtype} d={head_dim} bias={distance_bias is not None}: {error:.2e}")
            query_lens = torch.tensor([700, 0, 300], dtype=torch.int32, device="cuda")
            starts = torch.cat([torch.zeros(1, dtype=torch.int32, device="cuda"), query_lens.cumsum(0).int()])
            prefill_query = torch.randn(1000, num_heads, head_dim, device="cuda").to(dtype)
            args = (prefill_query, key_cache, value_cache, tables, lens, starts, head_dim ** -0.5, bias)
            error = relative_error(tpa.paged_prefill_attention(*args), ref.paged_prefill_attention(*args))
            if error > tolerance:
                failures.append(f"prefill {dtype} d={head_dim}: {error:.2e}")
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--num-heads", type=int, default=16)
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--copy-gib", type=float, default=1.0)
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]

    failures = check_against_reference(args.num_heads, args.block_size)
    if failures:
        sys.exit("Triton kernels disagree with the reference on this device:\n  " + "\n  ".join(failures))
    print("correctness: decode and prefill match the reference (fp32, bf16; head_dim 64, 128)")

    name = torch.cuda.get_device_name()
    copy = copy_bandwidth(int(args.copy_gib * 2**30))
    print(f"{name}: device copy bandwidth {copy / 1e9:.0f} GB/s (median, {args.copy_gib:g} GiB buffers)\n")
    header = (f"{'head_dim':>8} {'batch':>5} {'context':>7} {'bias':>4} {'partition':>9} {'us':>9} {'GB/s':>7}"
              f" {'% copy':>7}")
    print(header)
    print("-" * len(header))

    element = torch.empty((), dtype=dtype).element_size()
    rows = []
    for head_dim in args.head_dims:
        for batch in args.batches:
            for context in args.contexts:
                kv_bytes = 2 * batch * context * args.num_heads * head_dim * element
                if kv_bytes > 0.4 * torch.cuda.mem_get_info()[0]:
                    print(f"{head_dim:>8} {batch:>5} {context:>7}  skipped: {kv_bytes / 2**30:.1f} GiB of K/V")
                    continue
                query, key_cache, value_cache, tables, lens = paged_case(
                    batch, context, args.num_heads, head_dim, args.block_size, dtype
                )
                bias = torch.randn(args.num_heads, 129, device="cuda")
                total_bytes = kv_bytes + 2 * query.numel() * element
                partition = tpa._partition_size(batch, args.num_heads, tables.shape[1] * args.block_size)
                for distance_bias in (None, bias):
                    ms = do_bench(
                        functools.partial(
                            tpa.paged_decode_attention,
                            query, key_cache, value_cache, tables, lens, head_dim ** -0.5, distance_bias,
                        ),
                        warmup=25, rep=200, return_mode="median",
                    )
                    bandwidth = total_bytes / (ms * 1e-3)
                    row = {
                        "head_dim": head_dim, "batch": batch, "context": context,
                        "bias": distance_bias is not None, "partition": partition, "median_ms": ms,
                        "bytes": total_bytes, "gbps": bandwidth / 1e9, "fraction_of_copy": bandwidth / copy,
                    }
                    rows.append(row)
                    print(f"{head_dim:>8} {batch:>5} {context:>7} {'t5' if row['bias'] else '-':>4} {partition:>9} "
                          f"{ms * 1e3:>9.1f} {bandwidth / 1e9:>7.0f} {100 * bandwidth / copy:>6.1f}%")
                del query, key_cache, value_cache, tables, lens
                torch.cuda.empty_cache()

    now = datetime.datetime.now(datetime.timezone.utc)
    report = {
        "benchmark": "paged_decode_attention (triton flash-decoding)",
        "device": name,
        "capability": ".".join(map(str, torch.cuda.get_device_capability())),
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
                     "python": platform.python_version()},
        "date": now.isoformat(timespec="seconds"),
        "config": {"dtype": args.dtype, "num_heads": args.num_heads, "block_size": args.block_size,
                   "head_dims": args.head_dims, "batches": args.batches, "contexts": args.contexts,
                   "timing": "triton.testing.do_bench median", "bytes": "K+V read + query read + output write"},
        "copy_bandwidth_gbps": copy / 1e9,
        "results": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"gpu_attention_{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-')}_{now:%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
