"""Triton kernels for attention over the paged KV cache; same signatures and semantics as paged_attention.py.

Decode is split-K flash-decoding: each (sequence, head, partition) program runs an online softmax over its
slice of the context, then a merge kernel combines the partitions. Prefill tiles the concatenated queries
per sequence without reading query_start_loc on the host. Neither launch reads device values on the host,
so both are CUDA-graph safe. Scores and accumulators are fp32 and in log2 units (exp2 is the fast path).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from vivace.kernels import buffers

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # what @triton.jit read when this module was imported
_LOG2E = tl.constexpr(1.4426950408889634)
_TARGET_PROGRAMS = 1024  # enough decode programs to fill 132 SMs several times over
_MAX_PARTITION = 1024
_DECODE_BLOCK_N = 64


@triton.jit
def _paged_tile(cache_ptr, block, row, head, dims, mask, stride_b, stride_r, stride_h):
    """One head's [tokens, head_dim] tile of a paged cache, tokens given by their (block, row) slots."""
    return tl.load(
        cache_ptr + block[:, None] * stride_b + row[:, None] * stride_r + head * stride_h + dims[None, :],
        mask=mask, other=0.0,
    )


@triton.jit
def _store_kv_kernel(
    key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kc_slot, stride_kc_h, stride_vc_slot, stride_vc_h,
    num_heads, head_dim,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    heads_written = tl.where(slot >= 0, num_heads, 0)
    mask = (heads < heads_written) & (dims < head_dim)
    token64 = token.to(tl.int64)
    k = tl.load(key_ptr + token64 * stride_kt + heads * stride_kh + dims, mask=mask)
    v = tl.load(value_ptr + token64 * stride_vt + heads * stride_vh + dims, mask=mask)
    tl.store(key_cache_ptr + slot * stride_kc_slot + heads * stride_kc_h + dims,
             k.to(key_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(value_cache_ptr + slot * stride_vc_slot + heads * stride_vc_h + dims,
             v.to(value_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(
    key: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    value: torch.Tensor,
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_heads, head_dim]
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int64
) -> None:
    """Writes each token's key and value into its cache slot (a negative slot is skipped)."""
    num_tokens, num_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    assert key.stride(2) == 1 and value.stride(2) == 1
    assert key_cache.stride(3) == 1 and value_cache.stride(3) == 1
    assert key_cache.stride(0) == key_cache.shape[1] * key_cache.stride(1)
    assert value_cache.stride(0) == value_cache.shape[1] * value_cache.stride(1)
    _store_kv_kernel[(num_tokens,)](
        key, value, key_cache, value_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(1), key_cache.stride(2), value_cache.stride(1), value_cache.stride(2),
        num_heads, head_dim,
        BLOCK_H=triton.next_power_of_2(num_heads), BLOCK_D=triton.next_power_of_2(head_dim),
    )


@triton.jit
def _decode_partition_kernel(
    query_ptr, key_cache_ptr, value_cache_ptr, block_tables_ptr, context_lens_ptr, bias_ptr,
    acc_ptr, max_ptr, sum_ptr,
    scale_log2,
    stride_qs, stride_qh,
    stride_kb, stride_kr, stride_kh,
    stride_vb, stride_vr, stride_vh,
    stride_bt, stride_bias_h, max_distance,
    stride_as, stride_ah, stride_ap, stride_ms, stride_mh,
    head_dim,
    HAS_BIAS: tl.constexpr, BLOCK_SIZE: tl.constexpr, PARTITION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    part = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    start = part * PARTITION
    if start >= context_len:
        return
    end = tl.minimum(start + PARTITION, context_len)

    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < head_dim
    q = tl.load(query_ptr + seq * stride_qs + head * stride_qh + dims, mask=dim_mask, other=0.0).to(tl.float32)
    q = q * scale_log2

    m = tl.full([], float("-inf"), tl.float32)
    l = tl.zeros([], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for tile in range(start, end, BLOCK_N):
        pos = tile + tl.arange(0, BLOCK_N)
        valid = pos < end
        block = tl.load(table + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        row = pos % BLOCK_SIZE
        mask2 = valid[:, None] & dim_mask[None, :]
        k = _paged_tile(key_cache_ptr, block, row, head, dims, mask2, stride_kb, stride_kr, stride_kh).to(tl.float32)
        s = tl.sum(k * q[None, :], axis=1)
        if HAS_BIAS:
            distance = tl.minimum(context_len - 1 - pos, max_distance)
            bias = tl.load(bias_ptr + head * stride_bias_h + distance, mask=valid, other=0.0)
            s += bias.to(tl.float32) * _LOG2E
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new)
        v = _paged_tile(value_cache_ptr, block, row, head, dims, mask2, stride_vb, stride_vr, stride_vh).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l = l * alpha + tl.sum(p, axis=0)
        m = m_new

    tl.store(acc_ptr + seq * stride_as + head * stride_ah + part * stride_ap + dims, acc, mask=dim_mask)
    tl.store(max_ptr + seq * stride_ms + head * stride_mh + part, m)
    tl.store(sum_ptr + seq * stride_ms + head * stride_mh + part, l)


@triton.jit
def _decode_merge_kernel(
    out_ptr, acc_ptr, max_ptr, sum_ptr, context_lens_ptr,
    stride_os, stride_oh,
    stride_as, stride_ah, stride_ap, stride_ms, stride_mh,
    head_dim,
    PARTITION: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    context_len = tl.load(context_lens_ptr + seq)
    num_parts = (context_len + PARTITION - 1) // PARTITION
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < head_dim

    # partitions past the context were never written: masked loads keep their garbage out of the sums
    m = tl.full([], float("-inf"), tl.float32)
    l = tl.zeros([], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for first in range(0, num_parts, BLOCK_P):
        parts = first + tl.arange(0, BLOCK_P)
        valid = parts < num_parts
        part_max = tl.load(max_ptr + seq * stride_ms + head * stride_mh + parts, mask=valid, other=float("-inf"))
        part_sum = tl.load(sum_ptr + seq * stride_ms + head * stride_mh + parts, mask=valid, other=0.0)
        part_acc = tl.load(acc_ptr + seq * stride_as + head * stride_ah + parts[:, None] * stride_ap + dims[None, :],
                           mask=valid[:, None] & dim_mask[None, :], other=0.0)
        m_new = tl.maximum(m, tl.max(part_max, axis=0))
        alpha = tl.exp2(m - m_new)
        weight = tl.where(valid, tl.exp2(part_max - m_new), 0.0)
        acc = acc * alpha + tl.sum(weight[:, None] * part_acc, axis=0)
        l = l * alpha + tl.sum(weight * part_sum, axis=0)
        m = m_new
    out = acc / tl.where(l > 0, l, 1.0)  # an empty context (a padding row of the device loop) gives zeros, not NaN
    tl.store(out_ptr + seq * stride_os + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty), mask=dim_mask)


def _partition_size(num_seqs: int, num_heads: int, max_context: int) -> int:
    """Smallest power-of-two partition (>= one tile) that still gives about _TARGET_PROGRAMS programs."""
    parts_wanted = max(1, _TARGET_PROGRAMS // max(1, num_seqs * num_heads))
    size = triton.next_power_of_2(max(1, -(-max_context // parts_wanted)))
    return min(max(size, _DECODE_BLOCK_N), _MAX_PARTITION)


def paged_decode_attention(
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim]: one new token per sequence
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    context_lens: torch.Tensor,  # [num_seqs] int32, the new token included
    scale: float,
    distance_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query per sequence at position context_len - 1; the grid depends only on tensor shapes."""
    num_seqs, num_heads, head_dim = query.shape
    block_size = key_cache.shape[1]
    assert key_cache.shape[2] == num_heads and key_cache.shape[3] == head_dim
    assert query.stride(2) == 1 and key_cache.stride(3) == 1 and value_cache.stride(3) == 1
    out = buffers.empty((num_seqs, num_heads, head_dim), query.dtype, query.device)
    if num_seqs == 0:
        return out
    max_context = block_tables.shape[1] * block_size
    partition = _partition_size(num_seqs, num_heads, max_context)
    num_parts = -(-max_context // partition)
    acc = buffers.empty((num_seqs, num_heads, num_parts, head_dim), torch.float32, query.device)
    maxes = buffers.empty((num_seqs, num_heads, num_parts), torch.float32, query.device)
    sums = buffers.empty((num_seqs, num_heads, num_parts), torch.float32, query.device)
    has_bias = distance_bias is not None
    bias = distance_bias.contiguous() if has_bias else maxes
    block_d = triton.next_power_of_2(head_dim)
    _decode_partition_kernel[(num_seqs, num_heads, num_parts)](
        query, key_cache, value_cache, block_tables, context_lens, bias,
        acc, maxes, sums,
        scale * _LOG2E.value,
        query.stride(0), query.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_tables.stride(0), bias.stride(0) if has_bias else 0, bias.shape[1] - 1 if has_bias else 0,
        acc.stride(0), acc.stride(1), acc.stride(2), maxes.stride(0), maxes.stride(1),
        head_dim,
        HAS_BIAS=has_bias, BLOCK_SIZE=block_size, PARTITION=partition,
        BLOCK_N=_DECODE_BLOCK_N, BLOCK_D=block_d,
        num_warps=4 if block_d <= 64 else 8,
    )
    _decode_merge_kernel[(num_seqs, num_heads)](
        out, acc, maxes, sums, context_lens,
        out.stride(0), out.stride(1),
        acc.stride(0), acc.stride(1), acc.stride(2), maxes.stride(0), maxes.stride(1),
        head_dim,
        PARTITION=partition, BLOCK_P=min(triton.next_power_of_2(num_parts), 64), BLOCK_D=block_d,
        num_warps=4,
    )
    return out


@triton.jit
def _prefill_kernel(
    query_ptr, key_cache_ptr, value_cache_ptr, block_tables_ptr, context_lens_ptr, query_start_ptr, bias_ptr,
    out_ptr,
    scale_log2, num_seqs,
    stride_qt, stride_qh,
    stride_kb, stride_kr, stride_kh,
    stride_vb, stride_vr, stride_vh,
    stride_bt, stride_bias_h, max_distance,
    stride_ot, stride_oh,
    head_dim,
    HAS_BIAS: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Sequence s owns query tiles [start_s // BLOCK_M + s, ...): these ranges never overlap, so the grid
    # num_tokens // BLOCK_M + num_seqs covers every tile without knowing the lengths on the host.
    tile_id = tl.program_id(0)
    head = tl.program_id(1)
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(query_start_ptr + mid) // BLOCK_M + mid <= tile_id:
            lo = mid + 1
        else:
            hi = mid
    seq = lo - 1
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    q_first = (tile_id - (q_start // BLOCK_M + seq)) * BLOCK_M
    if q_first >= q_len:
        return
    context_len = tl.load(context_lens_ptr + seq)

    rows = q_first + tl.arange(0, BLOCK_M)
    row_valid = rows < q_len
    q_pos = context_len - q_len + rows
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < head_dim
    tokens = (q_start + rows).to(tl.int64)
    q = tl.load(query_ptr + tokens[:, None] * stride_qt + head * stride_qh + dims[None, :],
                mask=row_valid[:, None] & dim_mask[None, :], other=0.0)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    key_end = tl.minimum(context_len, context_len - q_len + q_first + BLOCK_M)
    for tile in range(0, key_end, BLOCK_N):
        pos = tile + tl.arange(0, BLOCK_N)
        valid = pos < key_end
        block = tl.load(table + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        row = pos % BLOCK_SIZE
        mask2 = valid[:, None] & dim_mask[None, :]
        k = _paged_tile(key_cache_ptr, block, row, head, dims, mask2, stride_kb, stride_kr, stride_kh).to(q.dtype)
        if UPCAST_DOT:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        s = s * scale_log2
        distance = q_pos[:, None] - pos[None, :]
        if HAS_BIAS:
            clamped = tl.minimum(tl.maximum(distance, 0), max_distance)
            bias = tl.load(bias_ptr + head * stride_bias_h + clamped)
            s += bias.to(tl.float32) * _LOG2E
        s = tl.where((distance >= 0) & valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        v = _paged_tile(value_cache_ptr, block, row, head, dims, mask2, stride_vb, stride_vr, stride_vh).to(q.dtype)
        p_low = p.to(q.dtype)
        if UPCAST_DOT:
            pv = tl.dot(p_low.to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p_low, v, input_precision=DOT_PRECISION)
        acc = acc * alpha[:, None] + pv
        m = m_new

    out = acc / l[:, None]
    tl.store(out_ptr + tokens[:, None] * stride_ot + head * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & dim_mask[None, :])


def paged_prefill_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim], sequences concatenated
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    context_lens: torch.Tensor,  # [num_seqs] int32: tokens in the cache after this step
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32: offsets of each sequence's queries
    scale: float,
    distance_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention for new tokens appended at the end of each sequence (prefill or chunked prefill).

    The query tokens of sequence s are its last (query_start_loc[s+1] - query_start_loc[s]) positions;
    their keys and values are already stored in the cache.
    """
    num_tokens, num_heads, head_dim = query.shape
    num_seqs = block_tables.shape[0]
    block_size = key_cache.shape[1]
    assert key_cache.shape[2] == num_heads and key_cache.shape[3] == head_dim
    assert query.stride(2) == 1 and key_cache.stride(3) == 1 and value_cache.stride(3) == 1
    out = buffers.empty((num_tokens, num_heads, head_dim), query.dtype, query.device)
    if num_tokens == 0 or num_seqs == 0:
        return out
    block_d = max(16, triton.next_power_of_2(head_dim))  # tl.dot needs every dimension >= 16
    block_m = min(64, max(16, triton.next_power_of_2(num_tokens // num_seqs)))
    block_n = 64 if block_d <= 64 else 32
    has_bias = distance_bias is not None
    bias = distance_bias.contiguous() if has_bias else query
    fp32 = query.dtype == torch.float32
    _prefill_kernel[(num_tokens // block_m + num_seqs, num_heads)](
        query, key_cache, value_cache, block_tables, context_lens, query_start_loc, bias,
        out,
        scale * _LOG2E.value, num_seqs,
        query.stride(0), query.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_tables.stride(0), bias.stride(0) if has_bias else 0, bias.shape[1] - 1 if has_bias else 0,
        out.stride(0), out.stride(1),
        head_dim,
        HAS_BIAS=has_bias, BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        # the interpreter multiplies bfloat16 bit patterns as integers, so it gets fp32 operands instead
        UPCAST_DOT=query.dtype == torch.bfloat16 and _INTERPRETED,
        DOT_PRECISION="ieee" if fp32 else "tf32",
        num_warps=4 if block_d <= 64 else 8,
    )
    return out
