"""Int8 quantization of the stage transformers' linear layers (weights stored as int8), and the pass that applies
every weight format (quantize_stage: "int8" here, "int4" from vivace.model.int4, "bfloat16" weights from
vivace.model.bf16_weights).

Each weight row (output channel) is stored as int8 with one float scale: w ≈ q * scale, scale = max|w_row| / 127.
The activations between layers, norms, embeddings and the KV cache keep the engine's dtype. Applied after loading by swapping every
nn.Linear inside the layers (attention qkv / o, cross-attention q / kv / o, FFN) and the output heads for an
Int8Linear.

CPU, one of four kernels per layer (`Int8Linear.kernel`):
- "pack_mm": torch._weight_int8pack_mm, fed bfloat16 activations: its float32-activation path is a scalar loop, its
  bfloat16 path is vectorized (docs/performance.md, "int8 linears"); it needs in_features to be a multiple of 32.
- "amx" (CPUs with AMX-INT8), "vnni" (AVX-512 VNNI) and "avx2" (AVX2), float32 activations: vivace's own kernel
  (csrc/int8_linear.cpp) quantizes each activation row to uint8 on the fly (its range, zero included, over 255
  steps) and sums the int8 products exactly in int32, so a row's output never depends on the other rows of the
  batch, and the three instruction sets give the same bits. An "amx" or "vnni" layer keeps a second copy of its
  weights packed for vpdpbusd and AMX tiles (_C.int8_vnni_pack, made when the kernel is set): the int8 weights'
  memory twice over.
`choose_kernels` times those this machine runs for each layer shape and keeps the fastest, cached beside the float32
linear plans (docs/performance.md has the figures); where it keeps "vnni" on a CPU with AMX it also times both per
row bucket, and the layer runs "amx" from the rows where that wins (the same bits, so tokens do not move).
bfloat16 activations take "pack_mm". Where none runs (CUDA; in_features not a multiple of 32 without vivace's
kernel), the layer dequantizes per call and runs a plain matmul.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from vivace import _C
from vivace.errors import VivaceError
from vivace.model.bf16_weights import BFloat16Linear, bfloat16_weights_supported
from vivace.model.int4 import Int4Linear, int4_supported
from vivace.model.linear_plan import (
    ROW_BUCKETS,
    WIN_MARGIN,
    PlanCache,
    cpu_and_torch,
    default_cache_path,
    machine_key,
    median_seconds,
)
from vivace.model.transformer import StageTransformer

QUANTIZE_MODES = ("int8", "int4", "bfloat16")
PACK_MM_ALIGN = 32
INT8_KERNELS = ("auto", "pack_mm", "amx", "vnni", "avx2")
NATIVE_ISAS = {"amx": "amx_int8", "vnni": "avx512_vnni", "avx2": "avx2"}  # vivace's kernels by name -> _C.int8_linear's isa
ISA_NAMES = {"amx": "AMX-INT8", "vnni": "AVX-512 VNNI", "avx2": "AVX2"}
PACKED_KERNELS = ("amx", "vnni")  # the kernels that read _C.int8_vnni_pack's layout
FUSED_ACTIVATIONS = ("gelu",)  # activations an Int8Linear applies itself
TIMED_ROWS = (2, 8)  # a guided pair and a small batch: a kernel is chosen by its summed time at both


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> int8 [out, in] and float32 scales [out], symmetric per output channel."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127.0
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


@functools.cache
def pack_mm_available() -> bool:
    """Whether torch._weight_int8pack_mm runs on this CPU and matches the dequantized product."""
    if not hasattr(torch, "_weight_int8pack_mm"):
        return False
    generator = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (48, 64), dtype=torch.int8, generator=generator)
    scales = torch.rand(48, generator=generator) + 0.5
    x = torch.randn(3, 64, generator=generator)
    try:
        out = torch._weight_int8pack_mm(x.bfloat16(), q, scales.bfloat16()).float()
    except RuntimeError:
        return False
    reference = x @ (q.float() * scales[:, None]).t()
    return bool(((out - reference).norm() <= 0.02 * reference.norm()).item())


@functools.cache
def native_kernels() -> tuple[str, ...]:
    """vivace's int8 kernels this CPU runs ("amx", "vnni", "avx2"), in that order (asked once: every forward reads it)."""
    isas = _C.int8_linear_isas()
    return tuple(kernel for kernel, isa in NATIVE_ISAS.items() if isa in isas)


def native_linear(rows: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, weight_sums: torch.Tensor,
                  bias: torch.Tensor | None, kernel: str = "vnni", vnni_weight: torch.Tensor | None = None) -> torch.Tensor:
    """float32 rows [r, in] through vivace's kernel ("amx", "vnni" or "avx2": per-row uint8 activations, exact int32
    sums); vnni_weight: the weights packed for "amx" and "vnni" (_C.int8_vnni_pack), else packed per call."""
    return torch.from_numpy(_C.int8_linear(rows.detach().contiguous(), weight, scales, weight_sums, bias,
                                           torch.get_num_threads(), NATIVE_ISAS[kernel], vnni_weight))


def vnni_pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(_C.int8_vnni_pack(weight.contiguous()))


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales.float())
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))
        self.register_buffer("scales_bf16", scales.to(torch.bfloat16))
        self.register_buffer("weight_sums", weight.sum(dim=1, dtype=torch.int32))
        self.register_buffer("vnni_weight", None, persistent=False)  # packed while the kernel is "amx" or "vnni"
        self._kernel = "pack_mm"
        self._native_args: tuple | None = None  # numpy views of the buffers for _C.int8_linear, made once
        self.activation = "none"  # "gelu": this layer applies GELU to its outputs (FeedForward.fuse_activation)
        self.amx_from_rows: int | None = None  # a "vnni" layer runs "amx" (the same bits) from this many rows on

    @property
    def kernel(self) -> str:
        """The CPU kernel for float32 activations where several run (set by choose_kernels)."""
        return self._kernel

    @kernel.setter
    def kernel(self, kernel: str) -> None:
        self._kernel = kernel
        self._native_args = None
        self.amx_from_rows = None  # choose_kernels sets it after the kernel
        packed = kernel in PACKED_KERNELS and kernel in native_kernels() and self.weight.device.type == "cpu"
        if packed and self.vnni_weight is None:
            self.vnni_weight = vnni_pack(self.weight)
        elif not packed:
            self.vnni_weight = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        q, scales = quantize_weight(linear.weight)
        return cls(q, scales, linear.bias, linear.weight.dtype)

    def use_pack_mm(self, x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and self.in_features % PACK_MM_ALIGN == 0 and pack_mm_available()

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.scales[:, None]

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        self._native_args = None  # .to(), .cpu() and friends may replace the buffers
        return super()._apply(fn, recurse)

    def native_args(self) -> tuple:
        """The buffers as _C.int8_linear takes them, converted once: turning five tensors into arrays on every call
        cost more than a small layer's kernel."""
        if self._native_args is None:
            bias = None if self.bias is None else self.bias.float().numpy()
            packed = None if self.vnni_weight is None else self.vnni_weight.numpy()
            self._native_args = (self.weight.numpy(), self.scales.numpy(), self.weight_sums.numpy(), bias,
                                 NATIVE_ISAS[self.kernel], packed)
        return self._native_args

    def use_native(self, x: torch.Tensor) -> bool:
        return (self.kernel in NATIVE_ISAS and x.device.type == "cpu" and x.dtype == torch.float32
                and self.kernel in native_kernels())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.use_native(x):
            weight, scales, weight_sums, bias, isa, packed = self.native_args()
            if self.amx_from_rows is not None and rows.shape[0] >= self.amx_from_rows:
                isa = NATIVE_ISAS["amx"]
            out = _C.int8_linear(rows.detach().contiguous().numpy(), weight, scales, weight_sums, bias,
                                 torch.get_num_threads(), isa, packed, self.activation)
            return torch.from_numpy(out).view(*x.shape[:-1], self.out_features)
        if self.use_pack_mm(x):
            out = torch._weight_int8pack_mm(rows.to(torch.bfloat16).contiguous(), self.weight, self.scales_bf16).to(x.dtype)
        else:
            out = F.linear(rows, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        if self.activation == "gelu":
            out = F.gelu(out)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        fused = "" if self.activation == "none" else f", activation={self.activation}"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}{fused}"


def quantize_linears(module: nn.Module, layer_type: type[Int8Linear | Int4Linear | BFloat16Linear] = Int8Linear) -> int:
    """Replaces every nn.Linear below module with layer_type (Int8Linear, Int4Linear or BFloat16Linear); returns how
    many."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, layer_type.from_linear(child))
            count += 1
        else:
            count += quantize_linears(child, layer_type)
    return count


def quantize_stage(model: StageTransformer, mode: str = "int8") -> int:
    """The decoder layers' linears (int8, 4-bit groups with mode "int4", bfloat16 with "bfloat16") and the output
    heads (int8, or bfloat16 with "bfloat16") of one StageTransformer; embeddings and norms stay. In the int modes
    each FFN's GELU moves into its first linear, which applies it in the same call (one torch op less per layer)."""
    check_quantize(mode)
    if mode == "bfloat16":
        return quantize_linears(model.layers, BFloat16Linear) + quantize_linears(model.heads, BFloat16Linear)
    count = quantize_linears(model.layers, Int4Linear if mode == "int4" else Int8Linear) + quantize_linears(model.heads)
    for layer in model.layers:
        if layer.ffn.activation_name in FUSED_ACTIVATIONS:
            layer.ffn.fuse_activation()
    return count


@torch.inference_mode()
def kernel_timings(in_features: int, out_features: int, native_only: bool = False) -> dict[str, float]:
    """Seconds of each CPU kernel this machine runs for one layer shape (vivace's own only, with native_only), summed
    over TIMED_ROWS (linear_plan's alternating rounds and medians, on random weights: the kernels' speed does not
    depend on the values)."""
    generator = torch.Generator().manual_seed(0)
    layer = Int8Linear(*quantize_weight(torch.randn(out_features, in_features, generator=generator)), None, torch.float32)
    inputs = [torch.randn(rows, in_features, generator=generator) for rows in TIMED_ROWS]
    candidates = {}
    if in_features % PACK_MM_ALIGN == 0 and pack_mm_available() and not native_only:
        candidates["pack_mm"] = lambda: [torch._weight_int8pack_mm(x.bfloat16(), layer.weight, layer.scales_bf16) for x in inputs]
    packed = vnni_pack(layer.weight) if set(PACKED_KERNELS) & set(native_kernels()) else None
    for kernel in native_kernels():
        candidates[kernel] = lambda kernel=kernel: [
            native_linear(x, layer.weight, layer.scales, layer.weight_sums, None, kernel, packed if kernel in PACKED_KERNELS else None)
            for x in inputs
        ]
    return dict(zip(candidates, median_seconds(list(candidates.values())))) if candidates else {}


def measured_kernels(shapes: Iterable[tuple[int, int]], cache: PlanCache, native_only: bool = False) -> dict[tuple[int, int], str]:
    """The faster kernel for float32 activations of each (in_features, out_features) on this machine (of vivace's own,
    with native_only), measured once per CPU model and torch version, at the thread count of the first engine, then
    read from cache (a few milliseconds per shape): every later engine on the machine runs the same kernels, so its
    tokens do not depend on the thread count (the two kernels round differently) and its bytes repeat."""
    candidates = [*(["pack_mm"] if pack_mm_available() and not native_only else []), *native_kernels()]
    # new candidates, or a candidate in a new form (vnni reading packed weights), are measured afresh
    key = f"{cpu_and_torch()} | int8 kernels: {', '.join(candidates)}{' (packed)' if 'vnni' in candidates else ''}"
    stored = {name: kernel for name, kernel in cache.entries(key).items() if kernel in INT8_KERNELS[1:]}
    chosen = {}
    for in_features, out_features in sorted(set(shapes)):
        name = f"{in_features}x{out_features}"
        if name not in stored:
            timings = kernel_timings(in_features, out_features, native_only)
            stored[name] = min(timings, key=timings.get) if timings else "pack_mm"
            cache.store(key, stored)
        chosen[(in_features, out_features)] = stored[name]
    return chosen


def amx_row_timings(in_features: int, out_features: int) -> dict[int, tuple[float, float]]:
    """Seconds of the vnni and the amx kernel for one layer shape at each row bucket (the same packed weights and
    quantized rows, so the same bits: only their speed differs)."""
    generator = torch.Generator().manual_seed(0)
    layer = Int8Linear(*quantize_weight(torch.randn(out_features, in_features, generator=generator)), None, torch.float32)
    packed = vnni_pack(layer.weight)
    timings = {}
    for rows in ROW_BUCKETS:
        x = torch.randn(rows, in_features, generator=generator)
        vnni_s, amx_s = median_seconds([
            lambda kernel=kernel: native_linear(x, layer.weight, layer.scales, layer.weight_sums, None, kernel, packed)
            for kernel in ("vnni", "amx")
        ])
        timings[rows] = (vnni_s, amx_s)
    return timings


def amx_threshold(timings: dict[int, tuple[float, float]]) -> int | None:
    """The fewest rows from which amx takes under WIN_MARGIN of vnni's time at that bucket and every larger one,
    from {rows: (vnni seconds, amx seconds)}; None where amx does not win at the largest bucket."""
    from_rows = None
    for rows in sorted(timings, reverse=True):
        vnni_s, amx_s = timings[rows]
        if amx_s >= WIN_MARGIN * vnni_s:
            break
        from_rows = rows
    return from_rows


def measured_amx_rows(shapes: Iterable[tuple[int, int]], cache: PlanCache) -> dict[tuple[int, int], int | None]:
    """For each shape, the fewest rows from which the amx kernel beats vnni (under WIN_MARGIN of its time at that
    row bucket and every larger one), or None; measured once per CPU model, torch version and thread count, then
    read from cache. Choosing by row count costs no token: the two kernels give the same bits."""
    key = f"{machine_key()} | int8 amx from rows"
    stored = cache.entries(key)
    chosen: dict[tuple[int, int], int | None] = {}
    for in_features, out_features in sorted(set(shapes)):
        name = f"{in_features}x{out_features}"
        if name not in stored:
            stored[name] = amx_threshold(amx_row_timings(in_features, out_features)) or 0  # 0: never
            cache.store(key, stored)
        chosen[(in_features, out_features)] = stored[name] or None
    return chosen


def quantize_mode(models: Iterable[nn.Module]) -> str | None:
    """What quantize_stage made of models' layers (engine.info): "int4", "int8", "bfloat16" or None."""
    kinds = {type(m) for model in models for m in model.modules()}
    found = {Int4Linear: "int4", Int8Linear: "int8", BFloat16Linear: "bfloat16"}
    return next((mode for kind, mode in found.items() if kind in kinds), None)


def amx_from_rows(models: Iterable[nn.Module]) -> dict[str, int]:
    """Where "vnni" layers switch to the amx kernel (engine.info): {"in x out": rows}."""
    found = {f"{m.in_features}x{m.out_features}": m.amx_from_rows
             for model in models for m in model.modules() if isinstance(m, Int8Linear) and m.amx_from_rows is not None}
    return dict(sorted(found.items()))


def choose_kernels(models: Iterable[nn.Module], kernel: str = "auto", cache: PlanCache | None = None,
                   activations: torch.dtype = torch.float32, native_only: bool = False) -> dict[tuple[int, int], str]:
    """Sets the CPU kernel of every Int8Linear below models: "auto" the faster one for its shape on this machine
    (measured_kernels; with native_only, the faster of vivace's own kernels where this CPU runs one: the native
    decoder stack runs only those, and saves more per layer than pack_mm's lead on small shapes), or the named one;
    returns the choice per (in_features, out_features). Activations other than float32 always take pack_mm."""
    check_int8_kernel(kernel, activations)
    layers = [layer for model in models for layer in model.modules() if isinstance(layer, Int8Linear)]
    shapes = {(layer.in_features, layer.out_features) for layer in layers}
    if activations != torch.float32:
        chosen = dict.fromkeys(shapes, "pack_mm")
    elif kernel == "auto":
        cache = cache or PlanCache(default_cache_path())
        chosen = measured_kernels(shapes, cache, native_only and bool(native_kernels()))
    else:
        chosen = dict.fromkeys(shapes, kernel)
    switch = {}
    if kernel == "auto" and activations == torch.float32 and {"amx", "vnni"} <= set(native_kernels()):
        switch = measured_amx_rows([shape for shape, name in chosen.items() if name == "vnni"], cache)
    for layer in layers:
        shape = (layer.in_features, layer.out_features)
        layer.kernel = chosen[shape]
        layer.amx_from_rows = switch.get(shape)
    return chosen


def check_int8_kernel(kernel: object, activations: torch.dtype = torch.float32) -> str:
    if kernel not in INT8_KERNELS:
        raise VivaceError(f"int8_kernel must be one of {', '.join(INT8_KERNELS)}, got {kernel!r}")
    if kernel in NATIVE_ISAS and kernel not in native_kernels():
        raise VivaceError(f"int8_kernel {kernel!r} needs a CPU with {ISA_NAMES[kernel]}, which this one does not have")
    if kernel in NATIVE_ISAS and activations != torch.float32:
        name = str(activations).removeprefix("torch.")
        raise VivaceError(f"int8_kernel {kernel!r} takes float32 activations; with dtype {name} the int8 layers run pack_mm")
    return kernel  # type: ignore[return-value]


def check_quantize(mode: str | None, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> None:
    """mode None, "int8", "int4" or "bfloat16"; "int4" and "bfloat16" where their kernels run (the CPU, float32
    activations; AVX-512 VNNI or AVX2 for int4, AVX-512 for bfloat16 weights): their fallbacks elsewhere widen every
    layer's weights on every call, slower than the float32 weights they replace."""
    if mode is not None and mode not in QUANTIZE_MODES:
        raise VivaceError(f"unknown quantize mode {mode!r} (choose None or one of {', '.join(QUANTIZE_MODES)})")
    if mode not in ("int4", "bfloat16") or device is None:
        return
    if device.type != "cpu" or dtype != torch.float32:
        other = "quantize 'int8'" if mode == "int4" else "dtype 'bfloat16'"
        raise VivaceError(f"quantize '{mode}' runs on the CPU with dtype float32 only; use {other} elsewhere")
    if mode == "int4" and not int4_supported():
        raise VivaceError("quantize 'int4' needs a CPU with AVX-512 VNNI or AVX2, which this one does not have; use quantize 'int8'")
    if mode == "bfloat16" and not bfloat16_weights_supported():
        raise VivaceError("quantize 'bfloat16' needs a CPU with AVX-512, which this one does not have; use quantize 'int8'")
