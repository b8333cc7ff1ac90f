"""A stage transformer's decoder layers as one native call per decode step (vivace._C.DecoderStack).

At small batches a decode step's kernels are short, so a layer's Python and its dozen small tensor ops (norms,
residual adds, reshapes, the cross-attention over the text) weigh beside its linears (docs/performance.md, "The
native decoder stack", has the measurements). Where every linear of the layers runs a native kernel (CPU, float32
activations: an Int8Linear on vivace's int8 kernels, amx, vnni or avx2, chosen per layer as in Python; an Int4Linear
on its AVX-512 VNNI or AVX2 kernel; a float32 nn.Linear or a BFloat16Linear where vivace._C.float32_linear runs its
AVX-512 form), the decode steps run every layer in C++: those linears, the same KV writes and paged attention, norms,
GELU and cross-attention of its own. Where the output heads are int8 or bfloat16-weight layers on those kernels too,
the stack also computes the logits of all heads in one call (StageTransformer.native_heads), of every step, prefills' included: the same
kernels on the same inputs, so the same bits as the heads called one by one. Prefills and the embeddings stay in
Python.

The native norms sum their statistics in float64 where torch sums in float32, and float32 linears sum in their own
fixed order, so hidden states agree with the Python layers to float32 rounding, not bit for bit (in int8 layers,
where that rounding moves an activation across a quantization step, by that step; tests/test_decoder_stack.py bounds
both); each row still depends on its own inputs only, so a request's
tokens do not depend on what runs beside it.
"""
from __future__ import annotations

import torch
from torch import nn

from vivace import _C
from vivace.kernels.cpu_paged_attention import cache_array
from vivace.model.bf16_weights import BFloat16Linear
from vivace.model.int4 import Int4Linear
from vivace.model.quant import NATIVE_ISAS, Int8Linear, native_kernels
from vivace.model.transformer import AttentionBatch, FeedForward, StageTransformer

NATIVE_ACTIVATIONS = ("gelu", "relu")  # the FFN activations the stack applies (by FeedForward.activation_name)


def _norm(norm: nn.Module) -> tuple:
    rms = isinstance(norm, nn.RMSNorm)
    eps = norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps
    bias = None if rms or norm.bias is None else norm.bias.detach().numpy()
    return norm.weight.detach().numpy(), bias, float(eps), rms


def _linear(linear: nn.Module, activation: str = "none") -> tuple:
    if isinstance(linear, BFloat16Linear):
        weight, bias = linear.native_args()
        return "bfloat16", weight, bias, activation
    if isinstance(linear, Int4Linear):
        packed, bias = linear.native_args()
        return "int4", packed, bias, linear.in_features, linear.out_features, activation
    if isinstance(linear, Int8Linear):
        weight, scales, weight_sums, bias, isa, packed = linear.native_args()
        return weight, scales, weight_sums, bias, isa, packed, linear.amx_from_rows or 0, activation
    bias = None if linear.bias is None else linear.bias.detach().numpy()
    return linear.weight.detach().numpy(), bias, activation


def _native_linear(linear: nn.Module) -> bool:
    if isinstance(linear, BFloat16Linear | Int4Linear):
        return linear.native_ready()
    if isinstance(linear, Int8Linear):
        return linear.kernel in NATIVE_ISAS and linear.kernel in native_kernels()
    return linear.weight.dtype == torch.float32 and _C.float32_linear_fast()


def _native_heads(model: StageTransformer) -> list[tuple]:
    """The output heads as the stack takes them where every one is an int8 or a bfloat16-weight layer on vivace's
    kernels (the kernel the heads run one by one, so the same bits), else none (float32 heads stay F.linear's:
    _C.float32_linear would round differently, and tokens must not move)."""
    heads = list(model.heads)
    native = (Int8Linear, BFloat16Linear)
    if heads and all(isinstance(h, native) and h.activation == "none" and _native_linear(h) for h in heads):
        return [_linear(head) for head in heads]
    return []


def _fc1_activation(ffn: FeedForward) -> str:
    """What fc1's outputs go through: the fused GELU the layer applies itself, or the FFN's own activation."""
    return ffn.fc1.activation if ffn.activation is None else ffn.activation_name


def unsupported(model: StageTransformer) -> str | None:
    """Why the native stack cannot run model's decode steps, or None where it can."""
    layers = list(model.layers)
    linears = [m for layer in layers for m in layer.modules() if isinstance(m, nn.Linear | Int8Linear | Int4Linear | BFloat16Linear)]
    if not all(_native_linear(m) for m in linears):
        return ("its linears are neither int8 or int4 on vivace's kernels (amx, vnni or avx2), nor float32 or "
                "bfloat16-weight on a CPU with AVX-512")
    params = [p for p in model.parameters()] + [b for b in model.buffers() if b.is_floating_point()]
    if any(t.device.type != "cpu" for t in params):
        return "it is not on the CPU"
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm | nn.RMSNorm)]
    if any(m.weight is None or m.weight.dtype != torch.float32 for m in norms):
        return "its norms are not float32 with weights"
    if model.embed[0].weight.dtype != torch.float32:
        return "its activations are not float32"
    if any(layer.ffn.activation is not None and layer.ffn.activation_name not in NATIVE_ACTIVATIONS for layer in layers):
        return "its FFN activation has no native form"
    return None


class NativeDecoderStack:
    """Runs StageTransformer.forward's layers for a decode batch (one token per row) in one vivace._C call."""

    def __init__(self, model: StageTransformer, row_slices: bool | None = None) -> None:
        """row_slices: how a step uses several threads (vivace._C.DecoderStack's argument; None: the stack's rule)."""
        reason = unsupported(model)
        if reason is not None:
            raise ValueError(f"the native decoder stack cannot run this stage: {reason}")
        layers = []
        for layer in model.layers:
            fields = {
                "attn_norm": _norm(layer.attn_norm), "ffn_norm": _norm(layer.ffn_norm),
                "qkv": _linear(layer.attn.qkv_proj), "o": _linear(layer.attn.o_proj),
                "fc1": _linear(layer.ffn.fc1, _fc1_activation(layer.ffn)), "fc2": _linear(layer.ffn.fc2),
            }
            if layer.cross_attn is not None:
                fields.update(cross_norm=_norm(layer.cross_norm), cross_q=_linear(layer.cross_attn.q_proj),
                              cross_o=_linear(layer.cross_attn.o_proj))
            layers.append(fields)
        config = model.config
        final_norm = None if model.final_norm is None else _norm(model.final_norm)
        self.stack = _C.DecoderStack(layers, final_norm, config.num_heads, config.head_dim, _native_heads(model), row_slices)
        self.scale = config.head_dim**-0.5
        self._caches: tuple[list, list, list] | None = None  # (kv_caches, key arrays, value arrays)
        self._cross: tuple[list, list, list] | None = None  # (CrossBatch.keys, key arrays, value arrays)

    def _cache_arrays(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[list, list]:
        if self._caches is None or self._caches[0] is not kv_caches:
            self._caches = (kv_caches, [cache_array(k) for k, _ in kv_caches], [cache_array(v) for _, v in kv_caches])
        return self._caches[1], self._caches[2]

    def _cross_arrays(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> tuple[list, list]:
        """The encoder keys and values as C-contiguous float32 arrays, converted once per batch composition (the
        model runner hands over the same lists while its batch is unchanged)."""
        if self._cross is None or self._cross[0] is not keys:
            self._cross = (keys, [k.float().contiguous().numpy() for k in keys],
                           [v.float().contiguous().numpy() for v in values])
        return self._cross[1], self._cross[2]

    def __call__(self, hidden: torch.Tensor, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], batch: AttentionBatch,
                 distance_bias: torch.Tensor | None) -> torch.Tensor:
        key_caches, value_caches = self._cache_arrays(kv_caches)
        cross = batch.cross
        cross_args = {}
        if cross is not None:
            keys, values = self._cross_arrays(cross.keys, cross.values)
            cross_args = dict(cross_keys=keys, cross_values=values, enc_mask=cross.enc_mask.numpy(),
                              token_seq=cross.token_seq.to(torch.int64).numpy())
        out = self.stack.decode(
            hidden.detach().contiguous().numpy(), key_caches, value_caches, batch.slot_mapping.to(torch.int64).numpy(),
            batch.block_tables.to(torch.int32).numpy(), batch.context_lens.to(torch.int32).numpy(), self.scale,
            None if distance_bias is None else distance_bias.float().contiguous().numpy(),
            num_threads=torch.get_num_threads(), **cross_args,
        )
        return torch.from_numpy(out)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [rows, d_model] -> [rows, num_output_heads, output_vocab_size], every head in one native call."""
        return torch.from_numpy(self.stack.logits(hidden.detach().contiguous().numpy(), torch.get_num_threads()))


def use_native_stacks(models: list[StageTransformer]) -> list[bool]:
    """Gives each model whose layers the native stack runs one (StageTransformer.native_decoder); returns which."""
    used = []
    for model in models:
        stack = NativeDecoderStack(model) if unsupported(model) is None else None
        model.native_decoder = stack
        model.native_heads = stack.logits if stack is not None and stack.stack.num_output_heads else None
        used.append(stack is not None)
    return used
