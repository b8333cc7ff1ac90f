"""Floor suite: what a decode step must cost on this machine if it only had to read its bytes once.

Bandwidth, measured here:
- copy: dst.copy_(src) of a large float32 tensor, bytes read + bytes written per second;
- GEMV: y = x W^T over a chain of [4096, 1024] / [1024, 4096] weights far larger than the caches, weight bytes
  per second, in float32 (F.linear, and vivace._C.float32_linear where it runs its AVX-512 form, as the native
  decoder stack does), bfloat16 (F.linear; and "bf16-weights", _C.bfloat16_weight_linear, float32 activations) and int8 (vivace.model.quant.Int8Linear with each of its CPU kernels: torch's
  int8 pack mm on bfloat16 activations, and vivace's AMX, VNNI and AVX2 kernels where the CPU has them) and int4
  (vivace.model.int4.Int4Linear: nibble and scale bytes), at 1 row and at 2 rows (a MusicGen guidance
  pair); on the CPU also the two int8 paths the engine does not take;
- on the CPU, one MusicGen-small decode step's linears (24 layers of qkv, o, cross-attention q and o, fc1, fc2 at
  their real shapes, 2 rows) through each of the engine's float32, int8 and int4 kernels: ms per step's linears.
Bytes per decode step of each model: the weights one step reads (the layers' linears and norms, the output heads,
one embedding row per codebook; not the embedding tables, nor cross-attention's key/value projection, which runs
once per request) plus the KV cache read at the step's context (self-attention, and cross-attention over the
text for MusicGen), for every row of the step. floor ms/step = bytes / copy bandwidth; fraction = floor / measured,
against the newest results of the musiclm and musicgen suites.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import Options, latest_result, release_memory, table, time_calls, write_result
from benchmarks.musicgen_suite import DECODER
from vivace import _C
from vivace.families.musiclm.pack import STAGES
from vivace.families.musiclm.random_pack import preset_config
from vivace.kernels.kv_int8 import row_width
from vivace.model.config import TransformerConfig
from vivace.model.int4 import GROUP, Int4Linear, int4_supported
from vivace.model.quant import Int8Linear, native_kernels

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
MODES = {
    "float32": ("float32", None), "bfloat16": ("bfloat16", None), "float16": ("float16", None),
    "int8": ("float32", "int8"), "int8+bf16": ("bfloat16", "int8"), "int4": ("float32", "int4"),
    "bf16-weights": ("float32", "bfloat16"),
}
ENGINE_INT8_KINDS = ("int8", "int8 pack_mm", "int8 amx", "int8 vnni", "int8 avx2")  # the int8 layer as the engine runs it
QUICK = {"copy_mib": 256, "gemv_layers": 8, "repeats": 5}
FULL = {"copy_mib": 1024, "gemv_layers": 24, "repeats": 20}


def copy_bandwidth(device: str, mib: int, repeats: int) -> dict[str, float]:
    src = torch.randn(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    times = time_calls(lambda: dst.copy_(src), device, repeats, warmup=2)
    moved = 2 * src.numel() * 4
    return {"gb_s": moved / min(times) / 1e9, "gb_s_median": moved / sorted(times)[len(times) // 2] / 1e9, "bytes": moved}


def musicgen_step_shapes() -> list[tuple[int, int]]:
    """The [out, in] weights of the linears one MusicGen-small decode step reads, layer by layer: qkv, o,
    cross-attention's q and o, fc1, fc2 (the output heads aside)."""
    d, ffn = DECODER["hidden_size"], DECODER["ffn_dim"]
    return [(3 * d, d), (d, d), (d, d), (d, d), (ffn, d), (d, ffn)] * DECODER["num_hidden_layers"]


def gemv_bandwidth(
    kind: str, rows: int, device: str, layers: int, repeats: int, shapes: list[tuple[int, int]] | None = None,
) -> dict[str, float]:
    """Weight bytes per second of x [rows, in] @ W^T over `layers` pairs of [4096, 1024] and [1024, 4096] weights,
    or over `shapes` ([out, in] each) where given."""
    generator = torch.Generator().manual_seed(0)
    shapes = shapes or [(4096, 1024), (1024, 4096)] * layers
    float_weights = [torch.randn(shape, generator=generator) for shape in shapes]
    calls: list[Callable[[], torch.Tensor]] = []
    weight_bytes = 0
    for w in float_weights:
        x = torch.randn(rows, w.shape[1], device=device)
        if kind in ("float32", "bfloat16"):
            dtype = getattr(torch, kind)
            weight = w.to(device, dtype)
            calls.append(lambda x=x.to(dtype), weight=weight: F.linear(x, weight))
            weight_bytes += weight.numel() * weight.element_size()
        elif kind == "float32 native":  # the native decoder stack's float32 linear
            weight = w.numpy()
            calls.append(lambda x=x.numpy(), weight=weight: _C.float32_linear(x, weight, None, torch.get_num_threads()))
            weight_bytes += weight.nbytes
        elif kind == "bf16-weights":  # the native decoder stack's float32 linear reading bfloat16 weights
            weight = w.to(torch.bfloat16).view(torch.int16).numpy().view("uint16")
            calls.append(lambda x=x.numpy(), weight=weight: _C.bfloat16_weight_linear(x, weight, None, torch.get_num_threads()))
            weight_bytes += weight.nbytes
        elif kind == "int4":  # 4-bit groups on vivace's kernel: nibbles and bfloat16 scales, one packed array
            linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            linear.weight.data = w
            q4 = Int4Linear.from_linear(linear)
            calls.append(lambda x=x, q4=q4: q4(x))
            weight_bytes += q4.packed.numel()
        else:
            linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            linear.weight.data = w
            q = Int8Linear.from_linear(linear).to(device)
            if kind in ENGINE_INT8_KINDS:
                if kind != "int8":
                    q.kernel = kind.removeprefix("int8 ")
                calls.append(lambda x=x, q=q: q(x))
            elif kind == "int8 pack_mm float32 activations":
                calls.append(lambda x=x, q=q: torch._weight_int8pack_mm(x, q.weight, q.scales))
            else:
                calls.append(lambda x=x, q=q: F.linear(x, q.weight.to(x.dtype)) * q.scales)
            weight_bytes += q.weight.numel() + q.out_features * 2
    del float_weights

    def chain() -> None:
        for call in calls:
            call()

    times = time_calls(chain, device, repeats, warmup=1)
    return {"gb_s": weight_bytes / min(times) / 1e9, "gb_s_median": weight_bytes / sorted(times)[len(times) // 2] / 1e9,
            "weight_bytes": weight_bytes, "ms": min(times) * 1e3, "ms_median": sorted(times)[len(times) // 2] * 1e3}


def step_bytes(config: TransformerConfig, mode: str, rows: int, context: float, enc_len: int = 0) -> dict[str, float]:
    """Bytes one decode step reads: weights once, the KV cache (and cross-attention K/V) once per row. mode: a key
    of MODES, or an int8 mode with its kernel named after it ("int8 vnni": the same bytes as "int8"), or a mode with
    bfloat16 or int8 KV caches ("float32 kv-bf16", "int8 kv-int8": head_dim int8 values and a float32 scale per row)."""
    dtype, quantize = MODES[mode.split()[0]]
    base = DTYPE_BYTES[dtype]
    kv_base = DTYPE_BYTES["bfloat16"] if mode.endswith(" kv-bf16") else base
    if mode.endswith(" kv-int8"):
        kv_base = row_width(config.head_dim, torch.int8) / config.head_dim
    d, layers = config.d_model, config.num_layers
    linears = [(3 * d, d), (d, d), (config.d_ff, d), (d, config.d_ff)]
    if config.cross_attention:
        linears += [(d, d), (d, d)]
    norms = 3 if config.cross_attention else 2
    norm_params = (2 if config.norm == "layernorm" else 1) * d
    layer_params = layers * sum(o * i for o, i in linears)
    head_params = config.num_output_heads * config.output_vocab_size * d
    out_channels = layers * sum(o for o, _ in linears) + config.num_output_heads * config.output_vocab_size
    if quantize == "int4":  # the layers in 4-bit groups with a bfloat16 scale each, the heads int8
        head_channels = config.num_output_heads * config.output_vocab_size
        linear_bytes = layer_params // 2 + 2 * layer_params // GROUP + head_params + 2 * head_channels
    elif quantize == "int8":
        linear_bytes = layer_params + head_params + 2 * out_channels
    elif quantize == "bfloat16":
        linear_bytes = (layer_params + head_params) * 2
    else:
        linear_bytes = (layer_params + head_params) * base
    other = (layers * norms + 1) * norm_params * base + rows * config.num_codebooks * d * base
    kv = rows * layers * 2 * d * (kv_base * context + base * enc_len)  # cross-attention K/V keep the engine's dtype
    return {"weights": linear_bytes + other, "kv": kv, "total": linear_bytes + other + kv}


def models() -> dict[str, TransformerConfig]:
    paper = preset_config("paper")
    found = {f"musiclm-paper {stage}": paper.stages[stage] for stage in STAGES}
    found["musicgen-small"] = TransformerConfig(
        num_layers=DECODER["num_hidden_layers"], d_model=DECODER["hidden_size"], num_heads=DECODER["num_attention_heads"],
        d_ff=DECODER["ffn_dim"], vocab_size=DECODER["vocab_size"] + 1, output_vocab_size=DECODER["vocab_size"],
        num_codebooks=DECODER["num_codebooks"], num_output_heads=DECODER["num_codebooks"], position="sinusoidal",
        cross_attention=True, cross_dim=DECODER["hidden_size"],
    )
    return found


def measured_steps(device: str) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """ms/step figures of the newest musiclm and musicgen results on this kind of device, with contexts and rows."""
    figures: list[dict[str, Any]] = []
    sources: dict[str, str] = {}
    found = latest_result("musiclm", device)
    if found is not None:
        path, report = found
        sources["musiclm"] = str(path)
        dtype = report["config"]["dtype"]
        for key, engine in (("stages", "vivace"), ("stages_graphs", "vivace, CUDA graphs")):
            for stage, r in report["results"].get(key, {}).items():
                figures.append({"model": f"musiclm-paper {stage}", "engine": engine, "mode": dtype, "rows": 1,
                                "context": r["context"], "enc_len": 0, "ms_per_step": r["ms_per_step"],
                                "threads": report["config"]["threads"]})
    found = latest_result("musicgen", device)
    if found is not None:
        path, report = found
        sources["musicgen"] = str(path)
        for r in report["results"]["runs"]:
            graphs = r["mode"].endswith("+graphs")  # the bytes are those of the mode without graphs
            figures.append({"model": "musicgen-small", "engine": r["engine"] + (", CUDA graphs" if graphs else ""),
                            "mode": r["mode"].removesuffix("+graphs"), "rows": 2,
                            "context": r["mean_context"], "enc_len": r["enc_len"], "ms_per_step": r["ms_per_step"],
                            "threads": report["config"]["threads"]})
    return figures, sources


def gemv_for(gemv: dict[str, dict[int, dict[str, float]]], mode: str) -> dict[int, dict[str, float]]:
    """The GEMV figures a mode's step runs on: its own kernel's for "int8 <kernel>", _C.float32_linear's for
    "float32" where it runs (the native decoder stack), torch's pack mm for
    "int8+bf16" (bfloat16 activations), the faster int8 kernel for "int8" (the engine measures and keeps it); a
    kv-bf16 or kv-int8 mode runs its weights as the mode without it."""
    mode = mode.removesuffix(" kv-bf16").removesuffix(" kv-int8")
    if mode == "float32" and "float32 native" in gemv:  # the native decoder stack's kernel, where it runs
        return gemv["float32 native"]
    if mode in gemv:
        return gemv[mode]
    if mode == "int8+bf16":
        return gemv.get("int8 pack_mm", gemv.get("int8", {}))
    if mode == "int8":
        kernels = [gemv[k] for k in ENGINE_INT8_KINDS[1:] if k in gemv]
        return {rows: max((k[rows] for k in kernels), key=lambda r: r["gb_s"]) for rows in (1, 2)} if kernels else {}
    return {}


def run(options: Options) -> dict[str, Any]:
    settings = QUICK if options.quick else FULL
    device = options.device
    copy = copy_bandwidth(device, settings["copy_mib"], settings["repeats"])
    release_memory()
    if device == "cpu":
        native_float32 = ["float32 native", "bf16-weights"] if _C.float32_linear_fast() else []
        kinds = ["float32", *native_float32, "bfloat16", "int8 pack_mm", *(f"int8 {kernel}" for kernel in native_kernels()),
                 *(["int4"] if int4_supported() else []), "int8 pack_mm float32 activations", "int8 dequantize per call"]
    else:
        kinds = ["float32", "bfloat16", "int8"]
    gemv: dict[str, dict[int, dict[str, float]]] = {}
    for kind in kinds:
        gemv[kind] = {}
        for rows in (1, 2):
            engine_path = kind in ("float32", "float32 native", "bf16-weights", "bfloat16", "int4", *ENGINE_INT8_KINDS)
            layers = settings["gemv_layers"] if engine_path else max(2, settings["gemv_layers"] // 4)
            gemv[kind][rows] = gemv_bandwidth(kind, rows, device, layers, max(3, settings["repeats"] // 2))
            release_memory()
    print(table(
        ["measurement", "GB/s (best)", "GB/s (median)"],
        [["copy (read + write)", copy["gb_s"], copy["gb_s_median"]]]
        + [[f"GEMV {kind}, {rows} row{'s' if rows > 1 else ''}", r["gb_s"], r["gb_s_median"]]
           for kind, per_rows in gemv.items() for rows, r in per_rows.items()],
        title=f"Memory bandwidth on {device}",
    ))

    step_linears: dict[str, dict[str, float]] = {}
    if device == "cpu":  # the engine's own kernels on one decode step's real shapes, 2 rows (a guidance pair)
        for kind in [k for k in kinds if k in ("float32", "float32 native", "bf16-weights", "int4", *ENGINE_INT8_KINDS[1:])]:
            step_linears[kind] = gemv_bandwidth(kind, 2, device, 0, max(3, settings["repeats"] // 2), musicgen_step_shapes())
            release_memory()
        print()
        print(table(
            ["kernel", "weight MB", "ms (best)", "ms (median)", "GB/s (best)"],
            [[kind, r["weight_bytes"] / 1e6, r["ms"], r["ms_median"], r["gb_s"]] for kind, r in step_linears.items()],
            title="One MusicGen-small decode step's linears (24 x qkv, o, cross q, cross o, fc1, fc2), 2 rows, "
            "weights far larger than the caches",
        ))

    figures, sources = measured_steps(device)
    floors = []
    for figure in figures:
        config = models()[figure["model"]]
        mode = figure["mode"]
        need = step_bytes(config, mode, figure["rows"], figure["context"], figure["enc_len"])
        measured_gemv = gemv_for(gemv, mode).get(min(figure["rows"], 2))
        floor_ms = need["total"] / (copy["gb_s"] * 1e9) * 1e3
        gemv_floor_ms = need["total"] / (measured_gemv["gb_s"] * 1e9) * 1e3 if measured_gemv else None
        floors.append({
            **figure, "weight_mb": need["weights"] / 2**20, "kv_mb": need["kv"] / 2**20, "floor_ms": floor_ms,
            "gemv_floor_ms": gemv_floor_ms, "fraction_of_floor": floor_ms / figure["ms_per_step"],
            "fraction_of_gemv_floor": gemv_floor_ms / figure["ms_per_step"] if gemv_floor_ms else None,
        })
    reference = [
        {"model": name, "mode": mode, **{k: v / 2**20 for k, v in step_bytes(config, mode, 1, 0).items()}}
        for name, config in models().items() for mode in MODES if mode != "float16"
    ]
    print()
    print(table(
        ["model", "mode", "weights MB/step"],
        [[r["model"], r["mode"], r["weights"]] for r in reference if r["model"] in ("musicgen-small", "musiclm-paper coarse")],
        title="Weight bytes one decode step reads (batch 1; the three MusicLM stages differ only in their heads)",
    ))
    print()
    print(table(
        ["model", "engine", "mode", "rows", "context", "weights MB", "KV MB", "floor ms", "GEMV floor ms", "measured ms",
         "of floor", "of GEMV floor"],
        [[f["model"], f["engine"], f["mode"], f["rows"], f["context"], f["weight_mb"], f["kv_mb"], f["floor_ms"],
          f["gemv_floor_ms"], f["ms_per_step"], f["fraction_of_floor"], f["fraction_of_gemv_floor"]] for f in floors],
        title="Floor (bytes / copy bandwidth) against measured ms/step" + ("" if floors else ": no musiclm / musicgen results yet"),
    ))
    config = {
        **settings, "copy": "dst.copy_(src), float32, bytes read + written, best of repeats",
        "gemv": "F.linear / _C.float32_linear / Int8Linear / Int4Linear over [4096,1024],[1024,4096] pairs, weight (+ scale) bytes, best of repeats",
        "step_bytes": step_bytes.__doc__, "sources": sources,
    }
    results = {"copy": copy, "gemv": {k: {str(r): v for r, v in per.items()} for k, per in gemv.items()},
               "musicgen_step_linears": step_linears, "bytes_per_step": reference, "floors": floors}
    path = write_result("floor", options, config, results)
    print(f"wrote {path}")
    return results
