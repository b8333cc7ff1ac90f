"""Device-side sampling with the semantics of vivace.kernels.sampling.sample (see its docstring).

Window masking, softmax and the stable descending sort are torch ops on the logits' device (float64, as in
the reference); one Triton program per row then hashes (seed, stream, step) into its uniform, applies
top-k and top-p, and draws by inverse CDF. Nothing is read back to the host, so a decode step can queue
sampling without a sync. seed, stream and step travel as int64 tensors holding the uint64 bit patterns.
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from vivace.kernels import buffers
from vivace.kernels.sampling import SamplingBatch

_GOLDEN = tl.constexpr(0x9E3779B97F4A7C15)
_GOLDEN_TWICE = tl.constexpr((2 * 0x9E3779B97F4A7C15) & ((1 << 64) - 1))
_MAX_BLOCK_V = 1024


@triton.jit
def _mix64(z):
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    return z ^ (z >> 31)


@triton.jit
def _uniform(seed_bits, stream_bits, step_bits):
    seed = seed_bits.to(tl.uint64, bitcast=True)
    stream = stream_bits.to(tl.uint64, bitcast=True)
    step = step_bits.to(tl.uint64, bitcast=True)
    key = _mix64(seed + _GOLDEN)
    key = _mix64(key ^ (stream + _GOLDEN_TWICE))
    bits = _mix64(key ^ (step * _GOLDEN))
    return (bits >> 11).to(tl.float64) * 1.1102230246251565e-16  # 2**-53, exact in fp32 and fp64


@triton.jit
def _uniform_kernel(seed_ptr, stream_ptr, step_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    u = _uniform(tl.load(seed_ptr + offs, mask=mask, other=0), tl.load(stream_ptr + offs, mask=mask, other=0),
                 tl.load(step_ptr + offs, mask=mask, other=0))
    tl.store(out_ptr + offs, u, mask=mask)


@triton.jit
def _nucleus_block(probs_row, rank, vocab, top_k, top_k_mass, top_p, carry, kept_carry):
    """One block of sorted ranks: which are kept by top-k then top-p, their running kept mass, the carries."""
    p = tl.load(probs_row + rank, mask=rank < vocab, other=0.0)
    kept = tl.where((p > 0) & (rank < top_k), p, 0.0)
    cumulative = tl.cumsum(kept, axis=0) + carry
    keep = (kept > 0) & (((cumulative - kept) / top_k_mass < top_p) | (rank == 0))
    kept_cumulative = tl.cumsum(tl.where(keep, p, 0.0), axis=0) + kept_carry
    return keep, kept_cumulative, tl.max(cumulative, axis=0), tl.max(kept_cumulative, axis=0)


@triton.jit
def _draw_kernel(
    sorted_probs_ptr, order_ptr, top_k_ptr, top_p_ptr, seed_ptr, stream_ptr, step_ptr, out_ptr,
    vocab, stride_p, stride_o,
    BLOCK_V: tl.constexpr,
):
    # Three passes over the sorted row mirror the reference: mass kept by top-k, then the top-p prefix
    # and its cumulative mass, then the first kept rank whose cumulative mass exceeds u * kept mass.
    row = tl.program_id(0)
    probs_row = sorted_probs_ptr + row.to(tl.int64) * stride_p
    top_k = tl.load(top_k_ptr + row)
    top_k = tl.where(top_k > 0, top_k, vocab)
    top_p = tl.load(top_p_ptr + row)
    u = _uniform(tl.load(seed_ptr + row), tl.load(stream_ptr + row), tl.load(step_ptr + row))

    top_k_mass = tl.zeros([], tl.float64)
    for first in range(0, vocab, BLOCK_V):
        rank = first + tl.arange(0, BLOCK_V)
        p = tl.load(probs_row + rank, mask=rank < vocab, other=0.0)
        top_k_mass += tl.sum(tl.where((p > 0) & (rank < top_k), p, 0.0), axis=0)

    carry = tl.zeros([], tl.float64)
    kept_mass = tl.zeros([], tl.float64)
    num_kept = tl.zeros([], tl.int32)
    for first in range(0, vocab, BLOCK_V):
        rank = first + tl.arange(0, BLOCK_V)
        keep, kept_cumulative, carry, kept_mass = _nucleus_block(
            probs_row, rank, vocab, top_k, top_k_mass, top_p, carry, kept_mass
        )
        num_kept += tl.sum(keep.to(tl.int32), axis=0)

    threshold = u * kept_mass
    index = tl.zeros([], tl.int32)
    carry = tl.zeros([], tl.float64)
    kept_carry = tl.zeros([], tl.float64)
    for first in range(0, vocab, BLOCK_V):
        rank = first + tl.arange(0, BLOCK_V)
        keep, kept_cumulative, carry, kept_carry = _nucleus_block(
            probs_row, rank, vocab, top_k, top_k_mass, top_p, carry, kept_carry
        )
        index += tl.sum(((kept_cumulative <= threshold) & (rank < vocab)).to(tl.int32), axis=0)

    index = tl.minimum(index, num_kept - 1)
    tl.store(out_ptr + row, tl.load(order_ptr + row.to(tl.int64) * stride_o + index))


def uniform(seed: torch.Tensor, stream: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Float64 uniforms, bit-identical to vivace.kernels.sampling.uniform; int64 inputs of one shape, on one device."""
    seed, stream, step = (x.contiguous() for x in (seed, stream, step))
    out = buffers.empty(tuple(seed.shape), torch.float64, seed.device)
    n = seed.numel()
    if n:
        _uniform_kernel[(triton.cdiv(n, 1024),)](seed, stream, step, out, n, BLOCK=1024)
    return out


def bits_as_int64(values: np.ndarray, rows: int, device: torch.device | str) -> torch.Tensor:
    """uint64 numpy values (broadcast to rows) as an int64 tensor with the same bit patterns."""
    array = np.array(np.broadcast_to(np.asarray(values, dtype=np.uint64), (rows,)))  # writable copy
    return torch.from_numpy(array.view(np.int64)).to(device, non_blocking=True)


def sample_on_device(
    logits: torch.Tensor,  # [rows, vocab], any float dtype
    temperature: torch.Tensor,  # [rows] float64
    top_k: torch.Tensor,  # [rows] int64, 0 = off
    top_p: torch.Tensor,  # [rows] float64, 1.0 = off
    vocab_lo: torch.Tensor,  # [rows] int64
    vocab_hi: torch.Tensor,  # [rows] int64, exclusive
    seed: torch.Tensor,  # [rows] int64 holding uint64 bits
    stream: torch.Tensor,
    step: torch.Tensor,
) -> torch.Tensor:
    """Draws one token per row; every input on logits.device; returns int64 tokens [rows] there."""
    rows, vocab = logits.shape
    device = logits.device
    scores = logits.detach().to(torch.float64)
    ids = torch.arange(vocab, device=device).unsqueeze(0)
    allowed = (ids >= vocab_lo.unsqueeze(1)) & (ids < vocab_hi.unsqueeze(1))
    scores = scores.masked_fill(~allowed, float("-inf"))
    greedy = temperature == 0
    tokens = torch.argmax(scores, dim=1)
    temperature = torch.where(greedy, torch.ones_like(temperature), temperature)
    probs = torch.softmax(scores / temperature.unsqueeze(1), dim=1)
    sorted_probs, order = torch.sort(probs, dim=1, descending=True, stable=True)
    drawn = buffers.empty((rows,), torch.int64, device)
    if rows:
        _draw_kernel[(rows,)](
            sorted_probs, order, top_k.contiguous(), top_p.contiguous(),
            seed.contiguous(), stream.contiguous(), step.contiguous(), drawn,
            vocab, sorted_probs.stride(0), order.stride(0),
            BLOCK_V=min(triton.next_power_of_2(vocab), _MAX_BLOCK_V),
        )
    return torch.where(greedy, tokens, drawn)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """vivace.kernels.sampling.sample on logits' device: the host-side batch is copied over, tokens stay there."""
    rows = logits.shape[0]
    device = logits.device
    if bool((batch.temperature == 0).all()):  # host tensor: no device sync
        lo = batch.vocab_lo.to(device, non_blocking=True).unsqueeze(1)
        hi = batch.vocab_hi.to(device, non_blocking=True).unsqueeze(1)
        ids = torch.arange(logits.shape[1], device=device).unsqueeze(0)
        scores = logits.detach().to(torch.float64).masked_fill((ids < lo) | (ids >= hi), float("-inf"))
        return torch.argmax(scores, dim=1)
    return sample_on_device(
        logits,
        batch.temperature.to(device, torch.float64, non_blocking=True),
        batch.top_k.to(device, torch.int64, non_blocking=True),
        batch.top_p.to(device, torch.float64, non_blocking=True),
        batch.vocab_lo.to(device, torch.int64, non_blocking=True),
        batch.vocab_hi.to(device, torch.int64, non_blocking=True),
        bits_as_int64(batch.seed, rows, device),
        bits_as_int64(batch.stream, rows, device),
        bits_as_int64(batch.step, rows, device),
    )
