"""Picks each op's implementation (vivace.kernels.ops) for a tensor's device: Triton, the CPU kernels or the reference.

CUDA tensors get Triton whenever it imports. CPU tensors get the CPU attention (cpu_paged_attention, tested
against the reference, its C++ decode kernel serving prefill too), unless VIVACE_TRITON_INTERPRET=1
asks for the Triton interpreter (how the kernels are tested without a GPU); TRITON_INTERPRET alone does not
switch the engine's CPU path, so kernel tests that set it leave the rest of a test run on the references.
The interpreter must be chosen before the first kernel module is imported in the process.
"""
from __future__ import annotations

import functools
import os

import numpy as np
import torch

from vivace import _C
from vivace.kernels.ops import AttentionOps, FusedOps
from vivace.kernels.sampling import GuidanceRows, SamplingBatch


def interpreter_requested() -> bool:
    return os.environ.get("VIVACE_TRITON_INTERPRET") == "1"


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(tensor: torch.Tensor) -> bool:
    if tensor.is_cuda:
        return triton_importable()
    if not interpreter_requested():
        return False
    os.environ["TRITON_INTERPRET"] = "1"  # @triton.jit reads it when our kernel modules are imported
    return triton_importable()


def attention_ops(tensor: torch.Tensor) -> AttentionOps:
    """The attention implementation for tensor's device (Triton, the CPU kernels, or the torch reference)."""
    if use_triton(tensor):
        from vivace.kernels import triton_paged_attention
        return triton_paged_attention
    if tensor.device.type == "cpu":
        from vivace.kernels import cpu_paged_attention
        return cpu_paged_attention
    from vivace.kernels import paged_attention
    return paged_attention


def fused_ops(tensor: torch.Tensor) -> FusedOps:
    """The fused elementwise ops for tensor's device (Triton, or the torch reference)."""
    if use_triton(tensor):
        from vivace.kernels import triton_fused
        return triton_fused
    from vivace.kernels import fused
    return fused


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Tokens [rows] int64 on logits' device: the Triton sampler on CUDA, the C++ sampler (vivace._C) on the CPU.

    Both draw exactly the tokens of the plain-torch reference vivace.kernels.sampling.sample; there is no silent
    fallback to it.
    """
    if use_triton(logits):
        from vivace.kernels import triton_sampling
        return triton_sampling.sample(logits, batch)
    from vivace import _C

    tokens = _C.sample(
        logits.detach().to("cpu", torch.float32),
        batch.temperature.numpy(), batch.top_k.numpy(), batch.top_p.numpy(),
        batch.vocab_lo.numpy(), batch.vocab_hi.numpy(), batch.seed, batch.stream, batch.step,
    )
    return torch.from_numpy(tokens).to(logits.device)


def sample_and_advance(decode_batch: _C.DecodeBatch, logits: torch.Tensor) -> np.ndarray:
    """Draws this step's tokens from logits [members, heads, vocab] float32 and appends them to the batch's
    sequences; returns the indices of the groups that finished.

    On the CPU this is one vivace._C call (guidance mix, sampling, append). With Triton the guidance mix runs in
    torch and the Triton sampler draws on the device; the tokens come to the host for the batch to advance.
    Both draw what vivace.kernels.sampling.sample draws from the same mixed logits.
    """
    if not use_triton(logits):
        return decode_batch.sample_and_advance(logits.detach().to("cpu", torch.float32).contiguous().numpy())
    from vivace.kernels import triton_sampling

    mixed = GuidanceRows.of(decode_batch.guidance(), logits.device).mix(logits)
    rows = decode_batch.sampling_rows()
    tokens = triton_sampling.sample(mixed.flatten(0, 1), SamplingBatch(
        temperature=torch.from_numpy(rows["temperature"]), top_k=torch.from_numpy(rows["top_k"]),
        top_p=torch.from_numpy(rows["top_p"]), vocab_lo=torch.from_numpy(rows["vocab_lo"]),
        vocab_hi=torch.from_numpy(rows["vocab_hi"]), seed=rows["seed"], stream=rows["stream"], step=rows["step"],
    ))
    return decode_batch.advance(tokens.view(decode_batch.num_groups, decode_batch.num_heads).cpu().numpy())
