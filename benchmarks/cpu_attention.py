"""CPU paged decode attention: the plain-torch reference against vivace's CPU path, per layer.

python -m benchmarks.cpu_attention   (prints a table; shapes of the MusicLM paper-size stages: 16 heads x 64)
"""
from __future__ import annotations

import time

import torch

from vivace.kernels import cpu_paged_attention as cpu
from vivace.kernels import paged_attention as ref

CASES = [(1, 256, torch.bfloat16), (1, 1262, torch.bfloat16), (8, 600, torch.bfloat16), (32, 600, torch.bfloat16),
         (8, 600, torch.float32), (64, 100, torch.float32)]


def case(num_seqs: int, context: int, dtype: torch.dtype, heads: int = 16, head_dim: int = 64, block_size: int = 16):
    per_seq = -(-context // block_size)
    num_blocks = num_seqs * per_seq + 4
    key_cache = torch.randn(num_blocks, block_size, heads, head_dim).to(dtype)
    value_cache = torch.randn(num_blocks, block_size, heads, head_dim).to(dtype)
    tables = torch.randperm(num_blocks)[: num_seqs * per_seq].view(num_seqs, per_seq).int()
    lens = torch.randint(context // 2, context + 1, (num_seqs,), dtype=torch.int32)
    lens[0] = context
    return torch.randn(num_seqs, heads, head_dim).to(dtype), key_cache, value_cache, tables, lens, torch.randn(heads, 129)


def ms_per_call(fn, args, repeats: int = 5) -> float:
    fn(*args)
    start = time.perf_counter()
    for _ in range(repeats):
        fn(*args)
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    torch.manual_seed(0)
    print(f"{'seqs':>4} {'context':>7} {'dtype':>9} {'ref ms':>8} {'cpu ms':>8} {'max rel err':>11}")
    for num_seqs, context, dtype in CASES:
        query, key_cache, value_cache, tables, lens, bias = case(num_seqs, context, dtype)
        args = (query, key_cache, value_cache, tables, lens, 0.125, bias)
        expected = ref.paged_decode_attention(*args).float()
        error = ((cpu.paged_decode_attention(*args).float() - expected).abs().max() / expected.abs().max()).item()
        print(f"{num_seqs:>4} {context:>7} {str(dtype)[6:]:>9} {ms_per_call(ref.paged_decode_attention, args):>8.2f} "
              f"{ms_per_call(cpu.paged_decode_attention, args):>8.2f} {error:>11.1e}")


if __name__ == "__main__":
    main()
