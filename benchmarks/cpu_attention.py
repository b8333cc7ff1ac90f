"""CPU paged decode attention per layer call: the plain-torch reference, vivace's torch path and its C++ kernel.

python -m benchmarks.cpu_attention [--threads N]   (prints a table; shapes of the MusicLM paper-size stages,
16 heads x 64, and of a small model, 4 heads x 64; the C++ kernel takes float32 caches only: "-" for bfloat16)
"""
from __future__ import annotations

import argparse
import time

import torch

from vivace.kernels import cpu_paged_attention as cpu
from vivace.kernels import paged_attention as ref

CASES = [(1, 256, torch.bfloat16, 16), (1, 1262, torch.bfloat16, 16), (8, 600, torch.bfloat16, 16),
         (32, 600, torch.bfloat16, 16), (8, 600, torch.float32, 16), (64, 100, torch.float32, 16),
         (1, 300, torch.float32, 4), (4, 300, torch.float32, 4), (1, 1200, torch.float32, 4),
         (4, 1200, torch.float32, 4)]  # (seqs, context, dtype, heads); the last four: a small model


def case(num_seqs: int, context: int, dtype: torch.dtype, heads: int = 16, head_dim: int = 64, block_size: int = 16):
    per_seq = -(-context // block_size)
    num_blocks = num_seqs * per_seq + 4
    key_cache = torch.randn(num_blocks, block_size, heads, head_dim).to(dtype)
    value_cache = torch.randn(num_blocks, block_size, heads, head_dim).to(dtype)
    tables = torch.randperm(num_blocks)[: num_seqs * per_seq].view(num_seqs, per_seq).int()
    lens = torch.randint(context // 2, context + 1, (num_seqs,), dtype=torch.int32)
    lens[0] = context
    return torch.randn(num_seqs, heads, head_dim).to(dtype), key_cache, value_cache, tables, lens, torch.randn(heads, 129)


def ms_per_call(fn, args, seconds: float = 0.2) -> float:
    start = time.perf_counter()
    fn(*args)
    repeats = max(5, min(2000, int(seconds / (time.perf_counter() - start))))
    start = time.perf_counter()
    for _ in range(repeats):
        fn(*args)
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cpu_attention")
    parser.add_argument("--threads", type=int, help="torch intra-op threads, which the C++ kernel uses too")
    if (threads := parser.parse_args().threads) is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    print(f"{'seqs':>4} {'context':>7} {'heads':>5} {'dtype':>9} {'ref ms':>8} {'torch ms':>8} {'c++ ms':>8} "
          f"{'max rel err':>11}")
    for num_seqs, context, dtype, heads in CASES:
        query, key_cache, value_cache, tables, lens, bias = case(num_seqs, context, dtype, heads)
        args = (query, key_cache, value_cache, tables, lens, 0.125, bias)
        expected = ref.paged_decode_attention(*args).float()
        error = ((cpu.paged_decode_attention(*args).float() - expected).abs().max() / expected.abs().max()).item()
        native = f"{ms_per_call(cpu.paged_decode_attention, args):>8.3f}" if dtype == torch.float32 else f"{'-':>8}"
        reference = ms_per_call(ref.paged_decode_attention, args)
        torch_path = ms_per_call(cpu.torch_decode_attention, args)
        print(f"{num_seqs:>4} {context:>7} {heads:>5} {str(dtype)[6:]:>9} {reference:>8.3f} {torch_path:>8.3f} "
              f"{native} {error:>11.1e}")


if __name__ == "__main__":
    main()
