"""The kernel interfaces: what the stage transformer calls, and what each implementation provides.

Each interface has a plain-torch reference (paged_attention.py, fused.py: the specification, exact against the
unfused ops), a Triton implementation (triton_paged_attention.py, triton_fused.py) and, for attention, a CPU one
(cpu_paged_attention.py: the C++ decode kernel, for prefill too). vivace.kernels.dispatch picks the module for
a tensor's device; callers type it as one of these protocols, so a module missing an op or changing a signature
fails the type check instead of a run.
"""
from __future__ import annotations

from typing import Protocol

import torch


class AttentionOps(Protocol):
    """Paged attention over one layer's KV cache [num_blocks, block_size, num_heads, head_dim]."""

    def store_kv(
        self,
        key: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        value: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        slot_mapping: torch.Tensor,  # [num_tokens] int64: block * block_size + offset
    ) -> None: ...

    def paged_prefill_attention(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim], sequences packed
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
        context_lens: torch.Tensor,  # [num_seqs] int32, the query's tokens included
        query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
        scale: float,
        distance_bias: torch.Tensor | None = None,  # [num_heads, max_distance + 1]: T5 relative positions
    ) -> torch.Tensor: ...

    def paged_decode_attention(
        self,
        query: torch.Tensor,  # [num_seqs, num_heads, head_dim], one token per sequence
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        scale: float,
        distance_bias: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


class FusedOps(Protocol):
    """The stage transformer's elementwise fusions."""

    def embed_codebooks(
        self,
        input_ids: torch.Tensor,  # [num_tokens, num_codebooks] int64
        positions: torch.Tensor,  # [num_tokens] int64
        tables: torch.Tensor,  # [num_codebooks, vocab_size, d_model]
        learned_positions: torch.Tensor | None = None,  # [max_positions, d_model]
        sinusoid_freqs: torch.Tensor | None = None,  # [d_model // 2] float32: MusicGen's sinusoidal positions
    ) -> torch.Tensor: ...

    def add_norm(
        self,
        residual: torch.Tensor,  # [num_tokens, d_model]
        update: torch.Tensor | None,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        eps: float,
        rms: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...
