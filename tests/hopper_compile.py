"""Compiles every Triton kernel of the engine for Hopper (sm_90) without a GPU, through the engine's own wrappers.

    python tests/hopper_compile.py      (TRITON_INTERPRET must be unset: kernels must be real JIT functions)

A stand-in Triton driver reports an sm_90 target, and every launch becomes a compile-only warm-up, so the wrappers
run on CPU tensors, their kernels go through Triton's whole pipeline down to a cubin (ptxas included) with the
constexprs and dtypes the engine uses, and nothing is launched. Prints one JSON line per compiled kernel: its name,
shared memory bytes and warps. tests/test_triton_compile.py runs it in a subprocess.
"""
from __future__ import annotations

import json
import os
import sys
import warnings

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: the interpreter replaces the kernels this compiles")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's own default, stated to keep it quiet

import numpy as np
import torch
import triton.runtime.jit as jit
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

COMPUTE_CAPABILITY = 90  # H100 / H200


class HopperStandIn:
    """The parts of a Triton driver that compiling needs: a device, a stream and an sm_90 target."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", COMPUTE_CAPABILITY, 32)

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


def compile_only(compiled: list) -> None:
    run = jit.JITFunction.run

    def warm_up(self: jit.JITFunction, *args, grid, warmup, **kwargs):  # noqa: ANN001, ANN202 (Triton's signature)
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.__name__, kernel))
        return kernel

    jit.JITFunction.run = warm_up


def exercise() -> None:
    from vivace.kernels import triton_fused as tf
    from vivace.kernels import triton_paged_attention as tpa
    from vivace.kernels import triton_sampling as ts
    from vivace.kernels.sinusoid import sinusoid_frequencies

    # attention: (dtype, head_dim, block_size, bias) as the engine runs them
    for dtype, head_dim, block_size, bias in [(torch.float32, 64, 16, True), (torch.bfloat16, 128, 16, True),
                                              (torch.float16, 128, 32, False), (torch.bfloat16, 64, 1, False)]:
        heads, tokens = 4, 48
        cache = torch.zeros(8, block_size, heads, head_dim, dtype=dtype)
        tables = torch.zeros(2, 8, dtype=torch.int32)
        lens = torch.tensor([40, 8], dtype=torch.int32)
        query = torch.zeros(tokens, heads, head_dim, dtype=dtype)
        table = torch.zeros(heads, 129) if bias else None
        tpa.store_kv(query, query, cache, cache, torch.zeros(tokens, dtype=torch.int64))
        tpa.paged_prefill_attention(query, cache, cache, tables, lens, torch.tensor([0, 40, 48], dtype=torch.int32),
                                    head_dim**-0.5, table)
        tpa.paged_decode_attention(query[:2], cache, cache, tables, lens, head_dim**-0.5, table)
    # sampling: MusicGen's codebooks and a MusicLM window, bf16 and fp32 logits
    for dtype, vocab in [(torch.float32, 1024), (torch.bfloat16, 2048)]:
        rows = 8
        bits = [ts.bits_as_int64(np.arange(rows, dtype=np.uint64), rows, "cpu") for _ in range(3)]
        ts.sample_on_device(torch.zeros(rows, vocab, dtype=dtype), torch.ones(rows, dtype=torch.float64),
                            torch.full((rows,), 250), torch.ones(rows, dtype=torch.float64), torch.zeros(rows, dtype=torch.int64),
                            torch.full((rows,), vocab), *bits)
    ts.uniform(*[ts.bits_as_int64(np.arange(5, dtype=np.uint64), 5, "cpu") for _ in range(3)])
    # fused: embedding sums (no / learned / sinusoidal positions) and add + norm at MusicGen-small / large widths
    for dtype, width, position in [(torch.bfloat16, 1024, "sinusoidal"), (torch.float16, 2048, "learned"),
                                   (torch.float32, 1024, "none")]:
        tables = torch.zeros(4, 2049, width, dtype=dtype)
        ids, positions = torch.zeros(6, 4, dtype=torch.int64), torch.zeros(6, dtype=torch.int64)
        learned = torch.zeros(4096, width, dtype=dtype) if position == "learned" else None
        freqs = sinusoid_frequencies(width) if position == "sinusoidal" else None
        tf.embed_codebooks(ids, positions, tables, learned, freqs)
        hidden = torch.zeros(6, width, dtype=dtype)
        tf.add_norm(hidden, hidden, torch.ones(width, dtype=dtype), torch.zeros(width, dtype=dtype), 1e-5, False)
        tf.add_norm(hidden, None, torch.ones(width, dtype=dtype), None, 1e-6, True)


def main() -> None:
    driver.set_active(HopperStandIn())
    compiled: list = []
    compile_only(compiled)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exercise()
    for name, kernel in compiled:
        print(json.dumps({"kernel": name, "shared_bytes": kernel.metadata.shared, "num_warps": kernel.metadata.num_warps,
                          "cubin_bytes": len(kernel.asm["cubin"])}))


if __name__ == "__main__":
    main()
