"""Paged decode attention for the CPU: the reference's semantics (paged_attention.py) without its copies.

A float32 query over float32, bfloat16 or int8 caches (an engine's kv_cache_dtype) goes to
vivace._C.paged_decode_attention, a C++ kernel that reads each context in place through its block table (never a
slot past its end), widens bfloat16 keys and values exactly as it reads them (int8 ones times their row's scale,
vivace.kernels.kv_int8) and runs a float32 softmax per
(sequence, head), on torch's intra-op thread count once the contexts are long enough to pay for a second thread.
Where the CPU has AVX-512 and head_dim is 32, 64 or 128 it reduces sixteen dot products per transpose tree (sixteen
keys of a head, or for rows of 2 KB and more sixteen heads of a key, so that a block is read in order) and
prefetches each next block while it computes the current one (blocks lie anywhere in the pool); elsewhere a
portable form runs (_C.paged_attention_isas lists what this CPU runs).

Prefill runs on the same kernel, one query row per new token (its context: its own position + 1), so a prompt token
attends with the same arithmetic as a decode step at its position. Other dtypes and devices take
torch_decode_attention (decode) and the reference (prefill). Each context is gathered once with index_select (instead
of the reference's advanced indexing and its copies) and attended by one float32 scaled_dot_product_attention call
on strided views, with the T5 bias (and the length mask) as its additive mask. Half-precision caches are upcast
once after the gather, since torch's CPU attention is slower in bfloat16 than in float32 (docs/performance.md has
the measurements). Small batches of contexts are padded and attended together; large ones go
sequence by sequence, because a padded gather of many megabytes is a fresh allocation that page-faults on
every step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vivace._C import paged_decode_attention as _native_decode
from vivace._C import store_kv as _native_store
from vivace.kernels import paged_attention as reference
from vivace.kernels.kv_int8 import as_float

__all__ = ["paged_decode_attention", "paged_prefill_attention", "store_kv"]

PADDED_GATHER_LIMIT = 4 << 20  # bytes of float32 keys above which sequences are attended one by one
NATIVE_CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.int8)  # the C++ kernel's caches (with a float32 query)


def cache_array(cache: torch.Tensor):  # noqa: ANN202 (a numpy array)
    """A cache as the C++ kernel reads it, in place: float32 and int8 as they are, bfloat16 as its bits (numpy has no
    bfloat16)."""
    return cache.view(torch.int16).numpy() if cache.dtype == torch.bfloat16 else cache.numpy()


def _bias(distance_bias: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    return distance_bias.float()[:, distance.clamp(0, distance_bias.shape[1] - 1)]


def _gather(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """The rows of blocks (any shape of block ids), concatenated: [num_ids * block_size, H, D] in float32."""
    return as_float(cache.index_select(0, blocks.reshape(-1).long()).flatten(0, 1))


def store_kv(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """AttentionOps.store_kv (vivace.kernels.ops has the shapes): the reference's writes; float32 keys and values into float32, bfloat16 or int8 caches by vivace._C.store_kv, which
    reads the views split from the qkv projection in place (torch's indexed assignment cost more per layer than
    the attention it feeds)."""
    native_cache = key_cache.dtype in NATIVE_CACHE_DTYPES and value_cache.dtype == key_cache.dtype
    tensors = (key, value, key_cache, value_cache, slot_mapping)
    if key.dtype == value.dtype == torch.float32 and native_cache and all(t.device.type == "cpu" for t in tensors):
        _native_store(key.detach().numpy(), value.detach().numpy(), cache_array(key_cache), cache_array(value_cache),
                      slot_mapping.to(torch.int64).numpy())
        return
    reference.store_kv(key, value, key_cache, value_cache, slot_mapping)


def paged_prefill_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim], sequences packed
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    context_lens: torch.Tensor,  # [num_seqs] int32, the query's tokens included
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    scale: float,
    distance_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """AttentionOps.paged_prefill_attention: causal attention of each new token over its sequence's cache, where the
    C++ decode kernel runs as one query row per new token (the row's block table its sequence's, its context its own
    position + 1), so a prompt token attends with a decode step's arithmetic; elsewhere the reference."""
    if not _runs_natively(query, key_cache, value_cache):
        return reference.paged_prefill_attention(
            query, key_cache, value_cache, block_tables, context_lens, query_start_loc, scale, distance_bias
        )
    counts = (query_start_loc[1:] - query_start_loc[:-1]).long()
    seq_of_token = torch.repeat_interleave(torch.arange(len(counts)), counts)
    first = (context_lens.long() - counts)[seq_of_token]  # each sequence's first new position
    offset = torch.arange(len(seq_of_token)) - query_start_loc[:-1].long()[seq_of_token]
    return _native_attention(query, key_cache, value_cache, block_tables.index_select(0, seq_of_token),
                             first + offset + 1, scale, distance_bias)


def _runs_natively(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> bool:
    """Whether the C++ kernel takes these: a float32 query over float32, bfloat16 or int8 caches, all on the CPU."""
    native_cache = key_cache.dtype in NATIVE_CACHE_DTYPES and value_cache.dtype == key_cache.dtype
    return query.dtype == torch.float32 and native_cache and all(t.device.type == "cpu" for t in (query, key_cache, value_cache))


def _native_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_tables: torch.Tensor,
                      context_lens: torch.Tensor, scale: float, distance_bias: torch.Tensor | None) -> torch.Tensor:
    """One query row per block-table row, at position context_lens - 1, through vivace._C.paged_decode_attention."""
    out = _native_decode(
        query.contiguous().numpy(), cache_array(key_cache), cache_array(value_cache),
        block_tables.to(torch.int32).contiguous().numpy(), context_lens.to(torch.int32).contiguous().numpy(),
        scale, None if distance_bias is None else distance_bias.float().contiguous().numpy(),
        torch.get_num_threads(),
    )
    return torch.from_numpy(out)


def paged_decode_attention(
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_heads, head_dim]
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    context_lens: torch.Tensor,  # [num_seqs] int32, the new token included
    scale: float,
    distance_bias: torch.Tensor | None = None,  # [num_heads, max_distance + 1]
) -> torch.Tensor:
    if _runs_natively(query, key_cache, value_cache):
        return _native_attention(query, key_cache, value_cache, block_tables, context_lens, scale, distance_bias)
    return torch_decode_attention(query, key_cache, value_cache, block_tables, context_lens, scale, distance_bias)


def torch_decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    distance_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The torch path, for any dtype and device."""
    num_seqs, num_heads, head_dim = query.shape
    block_size = key_cache.shape[1]
    lens = context_lens.tolist()
    num_used = -(-max(lens) // block_size)
    if num_seqs * num_used * block_size * num_heads * head_dim * 4 <= PADDED_GATHER_LIMIT:
        return _padded(query, key_cache, value_cache, block_tables[:, :num_used], context_lens, scale, distance_bias)
    out = torch.empty_like(query)
    for s, length in enumerate(lens):
        blocks = block_tables[s, : -(-length // block_size)]
        keys = _gather(key_cache, blocks)[:length].transpose(0, 1)  # [H, n, D]
        values = _gather(value_cache, blocks)[:length].transpose(0, 1)
        mask = None
        if distance_bias is not None:
            mask = _bias(distance_bias, length - 1 - torch.arange(length, device=query.device)).unsqueeze(1)
        attended = F.scaled_dot_product_attention(query[s].float().unsqueeze(1), keys, values, attn_mask=mask, scale=scale)
        out[s] = attended.squeeze(1).to(query.dtype)
    return out


def _padded(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, num_used]
    context_lens: torch.Tensor,
    scale: float,
    distance_bias: torch.Tensor | None,
) -> torch.Tensor:
    num_seqs = query.shape[0]
    padded = block_tables.shape[1] * key_cache.shape[1]
    keys = _gather(key_cache, block_tables).view(num_seqs, padded, *query.shape[1:])
    values = _gather(value_cache, block_tables).view(num_seqs, padded, *query.shape[1:])
    distance = (context_lens.long().to(query.device) - 1).unsqueeze(1) - torch.arange(padded, device=query.device)
    beyond = distance < 0
    # slots past the end may hold NaN, which an additive -inf mask (keys) or a zero weight (values) cannot hide
    keys.masked_fill_(beyond[:, :, None, None], 0.0)
    values.masked_fill_(beyond[:, :, None, None], 0.0)
    mask = torch.zeros(num_seqs, 1, padded, device=query.device).masked_fill_(beyond.unsqueeze(1), float("-inf"))
    if distance_bias is not None:
        mask = mask + _bias(distance_bias, distance).transpose(0, 1)  # [S, H, padded]
    attended = F.scaled_dot_product_attention(
        query.float().unsqueeze(2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask.unsqueeze(2), scale=scale
    )
    return attended.squeeze(2).to(query.dtype)
