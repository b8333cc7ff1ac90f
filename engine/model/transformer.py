"""The stage transformer: one decoder-only module for every stage of every family.

Two entry points share the weights: `forward` runs flattened variable-length batches over the paged KV
cache (inference), `forward_dense` runs padded [batch, time] inputs with a plain causal mask (training
and the reference that paged decoding is tested against).
"""
from __future__ import annotations

from collections.abc import Callable

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vivace.kernels.dispatch import attention_ops, fused_ops, use_triton
from vivace.kernels.sinusoid import sinusoid_frequencies, sinusoidal_embedding
from vivace.model.config import TransformerConfig
from vivace.model.linear_plan import bucket, matmul_product
from vivace.model.positions import distance_bias_table, t5_relative_bucket


@dataclass(frozen=True)
class CrossBatch:
    """Encoder keys/values per layer, padded per sequence, and which sequence each query token belongs to."""

    keys: list[torch.Tensor]  # per layer [num_seqs, enc_len, H, D]
    values: list[torch.Tensor]
    enc_mask: torch.Tensor  # [num_seqs, enc_len] bool, True = attend
    token_seq: torch.Tensor  # [num_tokens] int64


@dataclass(frozen=True)
class PrefixBatch:
    """Input embeddings that replace the token embeddings of some of a forward's tokens (sequences' prefixes)."""

    token_index: torch.Tensor  # [n] int64, positions in the forward's flattened tokens
    embeds: torch.Tensor  # [n, d_model]


@dataclass(frozen=True)
class AttentionBatch:
    """Where one forward's tokens sit in the paged cache, and what conditions them besides their ids."""

    slot_mapping: torch.Tensor  # [num_tokens] int64
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    context_lens: torch.Tensor  # [num_seqs] int32, new tokens included
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    is_decode: bool  # one query token per sequence
    cross: CrossBatch | None = None
    prefix: PrefixBatch | None = None


class Linear(nn.Linear):
    """nn.Linear that multiplies 2 to 64 float32 rows on the CPU as W x^T where the engine's linear plan says so.

    F.linear may run one matrix-vector product per row, reading the weights once per row; W x^T is one matrix product
    that reads them once. Which is faster depends on the CPU, the BLAS and the thread count, so the engine measures
    both per layer shape and row bucket (vivace.model.linear_plan) and sets matmul_buckets; without a plan every
    product is F.linear.
    """

    matmul_buckets: frozenset[int] = frozenset()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self.matmul_buckets and x.dim() == 2 and x.dtype == torch.float32 and x.device.type == "cpu"
            and bucket(x.shape[0]) in self.matmul_buckets
        ):
            return matmul_product(x, self.weight, self.bias)
        return super().forward(x)


def _norm(config: TransformerConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.d_model, eps=config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps)


def _add_norm(residual: torch.Tensor, update: torch.Tensor | None, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual + update, norm(residual + update)) in one pass over the rows where a fused kernel runs."""
    rms = isinstance(norm, nn.RMSNorm)
    return fused_ops(residual).add_norm(residual, update, norm.weight, None if rms else norm.bias, norm.eps, rms)


class SelfAttention(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj = Linear(config.d_model, 3 * config.d_model, bias=config.attn_bias)
        self.o_proj = Linear(config.d_model, config.d_model, bias=config.attn_bias)

    def forward(
        self,
        x: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        batch: AttentionBatch,
        distance_bias: torch.Tensor | None,
    ) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).view(-1, 3, self.num_heads, self.head_dim).unbind(1)
        key_cache, value_cache = kv_cache
        ops = attention_ops(key_cache)
        ops.store_kv(k, v, key_cache, value_cache, batch.slot_mapping)
        if batch.is_decode:
            out = ops.paged_decode_attention(
                q, key_cache, value_cache, batch.block_tables, batch.context_lens, self.scale, distance_bias
            )
        else:
            out = ops.paged_prefill_attention(
                q, key_cache, value_cache, batch.block_tables, batch.context_lens, batch.query_start_loc,
                self.scale, distance_bias,
            )
        return self.o_proj(out.reshape(x.shape[0], -1))

    def forward_dense(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv_proj(x).view(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class CrossAttention(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.q_proj = Linear(config.d_model, config.d_model, bias=config.attn_bias)
        self.kv_proj = Linear(config.cross_dim, 2 * config.d_model, bias=config.attn_bias)
        self.o_proj = Linear(config.d_model, config.d_model, bias=config.attn_bias)

    def encode(self, encoder_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, enc_len, cross_dim] -> keys, values [B, enc_len, H, D]; computed once per request."""
        b, e, _ = encoder_states.shape
        k, v = self.kv_proj(encoder_states).view(b, e, 2, self.num_heads, self.head_dim).unbind(2)
        return k, v

    def forward(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [N, d]; keys/values [N, enc_len, H, D] already gathered per token; mask [N, enc_len]."""
        q = self.q_proj(x).view(-1, self.num_heads, 1, self.head_dim)
        scores = torch.matmul(q, keys.permute(0, 2, 3, 1)) * self.scale  # [N, H, 1, enc_len]
        # transformers' additive mask is the dtype's minimum, not -inf: a row with every position masked (the
        # null condition of classifier-free guidance) attends uniformly instead of turning into NaN
        scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min)
        out = torch.matmul(torch.softmax(scores, dim=-1), values.transpose(1, 2))  # [N, H, 1, D]
        return self.o_proj(out.reshape(x.shape[0], -1))


class FeedForward(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.fc1 = Linear(config.d_model, config.d_ff, bias=config.ffn_bias)
        self.fc2 = Linear(config.d_ff, config.d_model, bias=config.ffn_bias)
        self.activation_name = config.activation
        self.activation: Callable[[torch.Tensor], torch.Tensor] | None = F.gelu if config.activation == "gelu" else F.relu

    def fuse_activation(self) -> None:
        """fc1 applies the activation itself from now on (an int8 layer in its kernel's output pass)."""
        self.fc1.activation = self.activation_name
        self.activation = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h if self.activation is None else self.activation(h))


class DecoderLayer(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.attn_norm = _norm(config)
        self.attn = SelfAttention(config)
        self.cross_norm = _norm(config) if config.cross_attention else None
        self.cross_attn = CrossAttention(config) if config.cross_attention else None
        self.ffn_norm = _norm(config)
        self.ffn = FeedForward(config)


class StageTransformer(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.ModuleList(nn.Embedding(config.vocab_size, config.d_model) for _ in range(config.num_codebooks))
        self.pos_embed = nn.Embedding(config.max_positions, config.d_model) if config.position == "learned" else None
        self.rel_bias = (
            nn.Embedding(config.rel_num_buckets, config.num_heads) if config.position == "t5_relative" else None
        )
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.final_norm = _norm(config) if config.final_norm else None
        self.heads = nn.ModuleList(
            Linear(config.d_model, config.output_vocab_size, bias=False) for _ in range(config.num_output_heads)
        )
        self.register_buffer("distance_bias", None, persistent=False)
        self.register_buffer("codebook_tables", None, persistent=False)
        self.register_buffer("sinusoid_freqs", None, persistent=False)
        # where set (vivace.model.decoder_stack), decode forwards run the layers through it in one native call
        self.native_decoder: Callable[..., torch.Tensor] | None = None
        self.native_heads: Callable[[torch.Tensor], torch.Tensor] | None = None  # float32 CPU hidden -> logits

    def refresh_derived(self) -> None:
        """Recomputes tensors derived from the weights; call after loading or editing weights (moves and casts call
        it themselves, see _apply).

        The T5 distance table always; where Triton runs, the codebook tables stacked for the fused embedding
        kernel (a copy of the input embeddings) and the sinusoid's frequencies, so no step reads the host."""
        weight = self.embed[0].weight
        if self.rel_bias is not None:
            table = distance_bias_table(self.rel_bias.weight.detach().float(), self.config.rel_max_distance)
            self.distance_bias = table.to(self.rel_bias.weight.device)
        fused = use_triton(weight)
        self.codebook_tables = torch.stack([e.weight.detach() for e in self.embed]) if fused else None
        sinusoidal = fused and self.config.position == "sinusoidal"
        self.sinusoid_freqs = sinusoid_frequencies(self.config.d_model, weight.device) if sinusoidal else None

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 (nn.Module's signature)
        # .to() / .cuda() / .half() would cast the derived buffers too (float32 frequencies to bf16): rebuild them
        super()._apply(fn, recurse)
        self.refresh_derived()
        self.native_decoder = self.native_heads = None  # they read the weights where they were
        return self

    def _embed(self, input_ids: torch.Tensor, positions: torch.Tensor, prefix: PrefixBatch | None) -> torch.Tensor:
        if self.codebook_tables is None or prefix is not None:  # prefix rows: a prefill's, off the decode path
            return self.embed_tokens(input_ids, positions, prefix)
        learned = self.pos_embed.weight if self.pos_embed is not None else None
        return fused_ops(self.codebook_tables).embed_codebooks(
            input_ids, positions, self.codebook_tables, learned, self.sinusoid_freqs
        )

    def embed_tokens(self, input_ids: torch.Tensor, positions: torch.Tensor, prefix: PrefixBatch | None = None) -> torch.Tensor:
        """input_ids [..., num_codebooks], positions [...] -> [..., d_model]; prefix embeddings (flattened tokens
        only) take the place of their tokens' embeddings and get positions like them."""
        h = self.embed[0](input_ids[..., 0])
        for c in range(1, len(self.embed)):
            h = h + self.embed[c](input_ids[..., c])
        if prefix is not None:
            h = h.index_copy(0, prefix.token_index, prefix.embeds.to(h.dtype))
        if self.pos_embed is not None:
            h = h + self.pos_embed(positions)
        elif self.config.position == "sinusoidal":
            table = sinusoidal_embedding(positions.reshape(-1), self.config.d_model, self.sinusoid_freqs).to(h.device, h.dtype)
            h = h + table.view(*positions.shape, -1)
        return h

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens, num_codebooks]
        positions: torch.Tensor,  # [num_tokens]
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        batch: AttentionBatch,
    ) -> torch.Tensor:
        # each sublayer's update joins the residual stream in the same pass that normalizes the next input
        h = self._embed(input_ids, positions, batch.prefix)
        if batch.is_decode and self.native_decoder is not None:
            return self.native_decoder(h, kv_caches, batch, self.distance_bias)
        update = None
        for i, layer in enumerate(self.layers):
            h, x = _add_norm(h, update, layer.attn_norm)
            update = layer.attn(x, kv_caches[i], batch, self.distance_bias)
            if layer.cross_attn is not None:
                cross = batch.cross
                assert cross is not None, "a cross-attention stage needs encoder states"
                keys = cross.keys[i][cross.token_seq]
                values = cross.values[i][cross.token_seq]
                h, x = _add_norm(h, update, layer.cross_norm)
                update = layer.cross_attn(x, keys, values, cross.enc_mask[cross.token_seq])
            h, x = _add_norm(h, update, layer.ffn_norm)
            update = layer.ffn(x)
        if self.final_norm is None:
            return h if update is None else h + update
        return _add_norm(h, update, self.final_norm)[1]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[rows, d_model] -> [rows, num_output_heads, output_vocab_size]."""
        if self.native_heads is not None and hidden.dtype == torch.float32 and hidden.device.type == "cpu":
            return self.native_heads(hidden)
        return torch.stack([head(hidden) for head in self.heads], dim=1)

    def encode_cross(self, encoder_states: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        keys, values = [], []
        for layer in self.layers:
            k, v = layer.cross_attn.encode(encoder_states)
            keys.append(k)
            values.append(v)
        return keys, values

    def forward_dense(
        self,
        input_ids: torch.Tensor,  # [B, T, num_codebooks]
        encoder_states: torch.Tensor | None = None,  # [B, enc_len, cross_dim]
        encoder_mask: torch.Tensor | None = None,  # [B, enc_len] bool
    ) -> torch.Tensor:
        """Causal forward over whole sequences without a cache; returns hidden states [B, T, d_model]."""
        b, t = input_ids.shape[:2]
        positions = torch.arange(t, device=input_ids.device).expand(b, t)
        h = self.embed_tokens(input_ids, positions)
        distance = torch.arange(t, device=h.device).unsqueeze(1) - torch.arange(t, device=h.device).unsqueeze(0)
        mask = torch.zeros(t, t, device=h.device, dtype=h.dtype).masked_fill(distance < 0, float("-inf"))
        mask = mask.expand(self.config.num_heads, t, t)
        if self.rel_bias is not None:
            buckets = t5_relative_bucket(distance, self.config.rel_num_buckets, self.config.rel_max_distance)
            mask = mask + self.rel_bias(buckets).permute(2, 0, 1).to(h.dtype)
        mask = mask.unsqueeze(0)
        for layer in self.layers:
            h = h + layer.attn.forward_dense(layer.attn_norm(h), mask)
            if layer.cross_attn is not None:
                assert encoder_states is not None, "a cross-attention stage needs encoder states"
                keys, values = layer.cross_attn.encode(encoder_states)
                enc_mask = encoder_mask if encoder_mask is not None else torch.ones(keys.shape[:2], dtype=torch.bool)
                x = layer.cross_norm(h).reshape(b * t, -1)
                per_token = torch.arange(b, device=h.device).repeat_interleave(t)
                out = layer.cross_attn(x, keys[per_token], values[per_token], enc_mask[per_token])
                h = h + out.view(b, t, -1)
            h = h + layer.ffn(layer.ffn_norm(h))
        return self.final_norm(h) if self.final_norm is not None else h
