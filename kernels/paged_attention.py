"""Attention over a paged KV cache: the plain-torch reference that every fused kernel must match.

Layout (NHD): key_cache and value_cache are [num_blocks, block_size, num_heads, head_dim]. Sequence s owns
the blocks block_tables[s, :ceil(context_lens[s] / block_size)]; its token at position p lives in block
block_tables[s, p // block_size], row p % block_size. The slot of a token is block * block_size + row.

Relative position bias (T5 style) enters as distance_bias [num_heads, max_distance + 1]: the score of
query position i against key position j gets distance_bias[h, min(i - j, max_distance)]. T5's buckets
saturate at max_distance, so this table holds the whole bias.

Caches are float32, bfloat16 or int8; an int8 cache's rows are head_dim + 4 wide, each with its scale
(vivace.kernels.kv_int8), and read back as their dequantized float32 values.
"""
from __future__ import annotations

import torch

from vivace.kernels.kv_int8 import as_float, is_int8_cache, quantize_rows


def store_kv(
    key: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    value: torch.Tensor,
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_heads, head_dim]
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int64
) -> None:
    """Writes each token's key and value into its cache slot (int8 caches: quantized rows with their scales)."""
    num_blocks, block_size = key_cache.shape[:2]
    for rows, cache in ((key, key_cache), (value, value_cache)):
        stored = quantize_rows(rows) if is_int8_cache(cache) else rows.to(cache.dtype)
        cache.view(num_blocks * block_size, *cache.shape[2:])[slot_mapping] = stored


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    block_size = cache.shape[1]
    num_used = (length + block_size - 1) // block_size
    blocks = cache[block_table[:num_used].long()]  # [num_used, block_size, H, D]
    return as_float(blocks.reshape(-1, *cache.shape[2:])[:length])


def _attend(
    query: torch.Tensor,  # [q_len, H, D]
    keys: torch.Tensor,  # [ctx, H, D]
    values: torch.Tensor,
    query_positions: torch.Tensor,  # [q_len]
    scale: float,
    distance_bias: torch.Tensor | None,
) -> torch.Tensor:
    q = query.float().transpose(0, 1)  # [H, q_len, D]
    k = keys.float().transpose(0, 1)
    v = values.float().transpose(0, 1)
    scores = torch.matmul(q, k.transpose(1, 2)) * scale  # [H, q_len, ctx]
    distance = query_positions.unsqueeze(1) - torch.arange(keys.shape[0], device=query.device).unsqueeze(0)
    if distance_bias is not None:
        max_distance = distance_bias.shape[1] - 1
        scores = scores + distance_bias.float()[:, distance.clamp(0, max_distance)]
    scores = scores.masked_fill(distance.unsqueeze(0) < 0, float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v)  # [H, q_len, D]
    return out.transpose(0, 1).to(query.dtype)


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
    out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    lengths = context_lens.tolist()
    for s, context_len in enumerate(lengths):
        q0, q1 = starts[s], starts[s + 1]
        if q1 == q0:
            continue
        keys = _gather_context(key_cache, block_tables[s], context_len)
        values = _gather_context(value_cache, block_tables[s], context_len)
        positions = torch.arange(context_len - (q1 - q0), context_len, device=query.device)
        out[q0:q1] = _attend(query[q0:q1], keys, values, positions, scale, distance_bias)
    return out


def paged_decode_attention(
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim]: one new token per sequence
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    context_lens: torch.Tensor,  # [num_seqs] int32, the new token included
    scale: float,
    distance_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query per sequence at position context_len - 1; all sequences in one batched gather."""
    num_seqs = query.shape[0]
    block_size = key_cache.shape[1]
    max_len = int(context_lens.max())
    num_used = (max_len + block_size - 1) // block_size
    table = block_tables[:, :num_used].long()
    keys = key_cache[table].reshape(num_seqs, num_used * block_size, *key_cache.shape[2:])[:, :max_len]
    values = value_cache[table].reshape(num_seqs, num_used * block_size, *value_cache.shape[2:])[:, :max_len]
    q = query.float().unsqueeze(2)  # [S, H, 1, D]
    scores = torch.matmul(q, as_float(keys).permute(0, 2, 3, 1)).squeeze(2) * scale  # [S, H, max_len]
    lens = context_lens.long().to(query.device).unsqueeze(1)
    distance = (lens - 1) - torch.arange(max_len, device=query.device).unsqueeze(0)  # [S, max_len]
    if distance_bias is not None:
        max_distance = distance_bias.shape[1] - 1
        scores = scores + distance_bias.float()[:, distance.clamp(0, max_distance)].permute(1, 0, 2)
    scores = scores.masked_fill((distance < 0).unsqueeze(1), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # Slots past a sequence's length hold other data or garbage (possibly NaN): zero them, since 0 * NaN = NaN.
    values = as_float(values).masked_fill((distance < 0)[:, :, None, None], 0.0)
    out = torch.matmul(probs.unsqueeze(2), values.permute(0, 2, 1, 3)).squeeze(2)  # [S, H, D]
    return out.to(query.dtype)
