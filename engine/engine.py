"""The Python API: Engine.from_pack(...).generate / stream / events, thin loops over the engine's one EngineCore.

Every call adds its rows to the core as requests and reads their outputs; whichever caller needs output next steps
the core (under the engine's lock), and each step's outputs go to the request that owns them. Calls interleaved in
one thread, or made from several threads, are batched together in the same steps. Leaving a call's loop early
(closing or dropping its iterator) aborts its requests and frees their blocks.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vivace.arguments import PromptLike, Story, check_bool
from vivace.codecs.backend import select_backend
from vivace.core.engine_core import CoreLimits, EngineCore, RequestOutput, pool_blocks, stage_runners
from vivace.core.model_runner import DecodeOptions
from vivace.core.sampling import is_finite, is_real
from vivace.errors import VivaceError
from vivace.events import AudioChunk, Event, StageProgress
from vivace.model.decoder_stack import use_native_stacks
from vivace.model.linear_plan import LinearPlan, check_linear_products, plan_linears
from vivace.model.quant import (
    amx_from_rows,
    check_int8_kernel,
    check_quantize,
    choose_kernels,
    quantize_mode,
    quantize_stage,
)
from vivace.packs.registry import family_of
from vivace.threads import ThreadGovernor

__all__ = ["Engine", "Story", "assemble"]

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
KV_CACHE_DTYPES = {**DTYPES, "int8": torch.int8}  # int8: rows with a scale each (vivace.kernels.kv_int8)

Sink = Callable[[RequestOutput], None]


def check_device(device: Any) -> torch.device:
    """The engine's device: "cpu", or a CUDA device this machine has ("cuda", "cuda:N"). Anything else is refused
    here, before the pack loads, with one line (torch would raise an AssertionError or RuntimeError mid-load)."""
    if isinstance(device, torch.device):
        parsed = device
    elif isinstance(device, str):
        try:
            parsed = torch.device(device)
        except RuntimeError:
            raise VivaceError(f"unknown device {device!r} (use 'cpu', 'cuda' or 'cuda:N')") from None
    else:
        raise VivaceError(f"device must be a string such as 'cpu' or 'cuda:0', got {device!r}")
    if parsed.type == "cpu":
        # torch takes "cpu:3" and allocates on the one CPU device: refuse it rather than report a device that is not
        if parsed.index not in (None, 0):
            raise VivaceError(f"device {str(parsed)!r} does not exist: the CPU is one device, 'cpu'")
        return parsed
    if parsed.type != "cuda":
        raise VivaceError(f"device type {parsed.type!r} is not supported (use 'cpu', 'cuda' or 'cuda:N')")
    if not torch.cuda.is_available():
        build = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise VivaceError(f"device {str(parsed)!r} is not available: {build} (torch {torch.__version__})")
    count = torch.cuda.device_count()
    if parsed.index is not None and parsed.index >= count:
        raise VivaceError(
            f"device {str(parsed)!r} does not exist: this machine has {count} CUDA device{'s' if count != 1 else ''} "
            f"(cuda:0 to cuda:{count - 1})"
        )
    return parsed


def check_kv_cache_dtype(kv_cache_dtype: Any, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The KV caches' dtype for kv_cache_dtype ("auto": the engine's dtype)."""
    if kv_cache_dtype == "auto":
        return dtype
    if not isinstance(kv_cache_dtype, str) or kv_cache_dtype not in KV_CACHE_DTYPES:
        raise VivaceError(
            f"unknown kv_cache_dtype {kv_cache_dtype!r} (choose auto or one of {sorted(set(KV_CACHE_DTYPES))})"
        )
    kv_dtype = KV_CACHE_DTYPES[kv_cache_dtype]
    if kv_dtype != dtype and device.type != "cpu":
        raise VivaceError(
            f"kv_cache_dtype {kv_cache_dtype!r} differs from dtype {str(dtype).removeprefix('torch.')!r}: "
            f"that runs on the CPU only (device {str(device)!r})"
        )
    return kv_dtype


class Engine:
    """One pack's engine. Its calls (generate, stream, events; AsyncEngine's too) take:

    prompt: a string (one row); a list of strings (a batch, one row each); a Story, or a list of (prompt, seconds)
      pairs, which is ONE story (one row), not a batch; a list of Story objects (a batch of stories). Stories are
      MusicLM's; MusicGen refuses them. MusicGen: None (or a None row) generates unconditionally.
    duration_s: seconds (an int or a float, not a string), required for plain prompts; a story's is its total.
      Durations round to whole codec frames (a duration shorter than one frame is refused); a story's segment
      boundaries round to whole semantic tokens (a segment that rounds to none is refused).
    seed: an integer in [0, 2**63) (row i gets seed + i), or a list with one per row. Booleans are not seeds.
    options: temperature, top_k, top_p (every stage); stage_sampling ({stage: {temperature, top_k, top_p}} or
      {stage: SamplingParams}, applied over those; MusicLM's stages are "semantic", "coarse", "fine", MusicGen's one
      is "decoder"); guidance_scale and negative_prompt (MusicGen; MusicLM packs with a guided stage, whose windows
      in those stages run as guided pairs); MusicGen: chunk_s (stream and events only: seconds per audio chunk, None for one
      whole decode; MusicLM refuses it, its chunks are the pack's fine_chunk_s), melody, melody_sample_rate;
      audio_prompt, audio_prompt_sample_rate (a clip to continue; the output begins with it and duration_s counts it).

    Every argument is checked before any work; a bad one raises VivaceError with one line naming it.
    """

    def __init__(
        self, family: Any, device: torch.device, dtype: torch.dtype, block_size: int, kv_cache_gb: float,
        decode: DecodeOptions = DecodeOptions(), limits: CoreLimits = CoreLimits(),
        num_blocks: dict[str, int] | None = None, linear_plan: LinearPlan = LinearPlan(),
        thread_governor: ThreadGovernor | None = None, int8_kernels: dict[tuple[int, int], str] | None = None,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        """family: the pack's family object (vivace.core.family). num_blocks: each stage's pool size in blocks
        (default: what kv_cache_gb gives, see vivace.core.engine_core.pool_blocks). kv_dtype: the KV caches' dtype
        (default: dtype)."""
        self.family = family
        self.pack = family.pack
        self.config = family.config
        self.codec = family.codec
        self.device = device
        self.dtype = dtype
        self.kv_dtype = kv_dtype or dtype
        self.block_size = block_size
        self.kv_cache_gb = kv_cache_gb
        self.decode_options = decode
        self.linear_plan = linear_plan
        self.int8_kernels = int8_kernels or {}
        self.thread_governor = thread_governor
        stages = family.stages()
        if num_blocks is None:
            budget = kv_cache_gb * 2**30 / len(stages)
            num_blocks = {name: pool_blocks(name, spec, block_size, self.kv_dtype, budget) for name, spec in stages.items()}
        runners = stage_runners(stages, num_blocks, block_size, self.kv_dtype, device, decode)
        self.core = EngineCore(family, runners, limits)
        self._lock = threading.RLock()
        self._sinks: dict[int, Sink] = {}

    @classmethod
    def from_pack(
        cls,
        path: str | Path,
        device: str = "cpu",
        dtype: str = "float32",
        block_size: int = 16,
        kv_cache_gb: float = 4.0,
        codec_backend: str = "auto",
        quantize: str | None = None,
        steps_per_sync: int = 1,
        cuda_graphs: bool = False,
        max_running: int = 16,
        max_waiting: int = 64,
        linear_products: str = "auto",
        adaptive_threads: bool = False,
        int8_kernel: str = "auto",
        kv_cache_dtype: str = "auto",
        native_layers: bool = True,
    ) -> Engine:
        """codec_backend: "auto" | "torch" | "onnxruntime" | "tensorrt" (see vivace.codecs.backend.select_backend).
        quantize: None, "int8" for int8 stage linears, "int4" for 4-bit group-wise weights in the layers and int8
        output heads (CPU with AVX-512 VNNI or AVX2, dtype float32), or "bfloat16" for bfloat16 weights under float32
        activations (CPU with AVX-512, dtype float32); see vivace.model.quant, vivace.model.int4 and
        vivace.model.bf16_weights.
        steps_per_sync > 1: decode that many steps per host sync on the device (Triton sampling and advance, see
        vivace.core.device_decode); cuda_graphs: capture them as CUDA graphs. Both are for CUDA devices; the default
        (1, False) is the per-step path with the C++ decode batch.
        max_running / max_waiting: requests running at once and waiting for a place (past both: EngineBusy).
        linear_products: how float32 linear layers multiply 2 to 64 rows on the CPU: "auto" measures F.linear against
        W x^T per layer shape on this machine (once; cached, see vivace.model.linear_plan), "linear" or "matmul"
        fix one.
        int8_kernel: with quantize="int8" on the CPU, "auto" times torch's int8 pack mm against vivace's kernel
        (AMX-INT8, AVX-512 VNNI and AVX2, which give the same bits) per layer shape (once per CPU model and torch
        version, cached) and keeps the fastest; "pack_mm", "amx", "vnni" or "avx2" fix one (see vivace.model.quant).
        kv_cache_dtype: "auto" (dtype) or a dtype for the KV caches: "bfloat16" under a float32 engine halves the
        bytes every decode step reads and the memory per cached token (the C++ attention kernel widens them as it
        reads); "int8" stores each (token, head) row as int8 values and one float32 scale (vivace.kernels.kv_int8),
        0.27 of float32's bytes at head_dim 64. Tokens then differ from float32 caches' as any rounding does, and
        stay the same whatever else runs. A kv_cache_dtype other than dtype runs on the CPU only.
        native_layers: on the CPU with float32 activations, where every linear of a stage's layers runs a native
        kernel (int8 on vivace's own kernels with quantize="int8"; float32 on a CPU with AVX-512), its decode steps
        run all the layers in one native call (vivace.model.decoder_stack; hidden states agree with the Python
        layers to float32 rounding, tokens stay independent of the batch); False keeps the layers in Python.
        adaptive_threads: between steps, run on torch's thread count or on one, whichever measures faster
        (vivace.threads.ThreadGovernor: for hosts shared with other work; tokens are unchanged, audio may differ in
        its last bits between the two counts). It sets the process's thread count: one such engine per process.
        device: "cpu", "cuda" or "cuda:N" (a string or a torch.device). Every argument, the device included, is
        checked before the pack loads; kv_cache_gb too small for one longest sequence of a stage is refused once the
        pack's stage shapes are known, before the pools are allocated."""
        if dtype not in DTYPES:
            raise VivaceError(f"unknown dtype {dtype!r} (choose one of {sorted(set(DTYPES))})")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise VivaceError(f"block_size must be a positive integer, got {block_size!r}")
        if not is_real(kv_cache_gb) or not is_finite(kv_cache_gb) or not kv_cache_gb > 0:
            raise VivaceError(f"kv_cache_gb must be a finite number > 0, got {kv_cache_gb!r}")
        limits = CoreLimits(max_running, max_waiting)
        limits.validate()
        torch_device = check_device(device)
        check_quantize(quantize, torch_device, DTYPES[dtype])
        check_linear_products(linear_products)
        check_int8_kernel(int8_kernel, DTYPES[dtype])
        kv_dtype = check_kv_cache_dtype(kv_cache_dtype, DTYPES[dtype], torch_device)
        check_bool(adaptive_threads, "adaptive_threads")
        check_bool(native_layers, "native_layers")
        decode = DecodeOptions(steps_per_sync, cuda_graphs)
        decode.validate(torch_device)
        family_cls = family_of(path)
        pack = family_cls.load_pack(path, DTYPES[dtype], torch_device)
        family = family_cls(pack, select_backend(pack, codec_backend, torch_device, family_cls.cpu_codec_backend))
        models = [spec.model for spec in family.stages().values()]
        int8_kernels = {}
        if quantize is not None:
            for model in models:
                quantize_stage(model, quantize)
            if torch_device.type == "cpu":
                int8_kernels = choose_kernels(models, int8_kernel, activations=DTYPES[dtype], native_only=native_layers)
        if native_layers and torch_device.type == "cpu":
            use_native_stacks(models)
        plan = plan_linears(models, linear_products)
        governor = ThreadGovernor(torch.get_num_threads()) if adaptive_threads else None
        return cls(
            family, torch_device, DTYPES[dtype], block_size, kv_cache_gb, decode, limits, linear_plan=plan,
            thread_governor=governor, int8_kernels=int8_kernels, kv_dtype=kv_dtype,
        )

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    def requests(self, prompt: PromptLike, duration_s: float | None, seed: int | Sequence[int], options: dict[str, Any]) -> list[Any]:
        """Validates a call's arguments and turns them into one request spec per row (the family's); every check runs
        before any work, and a bad argument raises VivaceError with one line naming it."""
        return self.family.requests(prompt, duration_s, seed, options)

    # -- calls -------------------------------------------------------------------------------------------------
    def events(self, prompt: PromptLike, duration_s: float | None = None, seed: int | Sequence[int] = 0, **options: Any) -> Iterator[Event]:
        """Every event of a generation: window starts/ends, per-stage progress and audio chunks. The arguments
        (see Engine: a list of (prompt, seconds) pairs is one story, a list of strings or of Story objects a batch)
        are validated now; the rows join the engine's running batch when the iterator is first advanced."""
        return self._events(self.requests(prompt, duration_s, seed, options))

    def stream(self, prompt: PromptLike, duration_s: float | None = None, seed: int | Sequence[int] = 0, **options: Any) -> Iterator[AudioChunk]:
        """Audio chunks (row, index, start sample, float32 PCM) in order per row, each as soon as it is decoded.
        MusicGen: chunk_s seconds each (default 1.0; None: one whole decode); MusicLM: the pack's fine-stage chunks.
        The arguments are those of events (validated now, before the iterator is first advanced)."""
        specs = self.requests(prompt, duration_s, seed, self.family.stream_options(options))
        return (event for event in self._events(specs) if isinstance(event, AudioChunk))

    def generate(
        self, prompt: PromptLike, duration_s: float | None = None, seed: int | Sequence[int] = 0, *,
        return_codes: bool = False, **options: Any,
    ) -> np.ndarray | tuple[np.ndarray, list[np.ndarray]]:
        """Float32 PCM [rows, samples] at engine.sample_rate: one row per prompt of a batch (a list of strings or of
        Story objects), one row for a story (a Story, or a list of (prompt, seconds) pairs). Each row lasts its
        duration rounded to whole codec frames; rows shorter than the longest end in zeros. The arguments are
        validated before any work; a chunk_s other than None is refused (chunks are stream's and events').
        return_codes: return (audio, codes), codes a list with each row's codec codes, int64 [levels, frames]
        (Engine.decode turns them back into the row's audio)."""
        check_bool(return_codes, "return_codes")
        specs = self.requests(prompt, duration_s, seed, self.family.whole_options(options))
        return assemble((event for event in self._events(specs) if isinstance(event, AudioChunk)), return_codes)

    def encode(self, audio: Any, sample_rate: int | None = None) -> np.ndarray:
        """Audio (a sound file path, or PCM [samples] / [channels, samples] at sample_rate) -> the codec codes the pack's
        encoder gives, int64 [levels, frames] (downmixed to mono and resampled to the codec's rate first). MusicGen
        packs carry EnCodec's encoder (packs converted by this version); MusicLM packs carry their SoundStream encoder
        where pack.json says codec_encoder (the bundled demo pack does)."""
        return self.family.encode(audio, sample_rate)

    def decode(self, codes: Any) -> np.ndarray:
        """Codec codes -> float32 PCM at engine.sample_rate, decoded whole by the engine's codec backend: [levels,
        frames] (one clip, as generate(return_codes=True) or AudioChunk.codes give them) -> [frames * hop];
        [rows, levels, frames] -> [rows, frames * hop]. A MusicGen clip decodes to exactly the audio generate
        returned; MusicLM's generate decodes chunk by chunk with carried state (the same up to float rounding)."""
        batch = self.codec.check_codes(codes)
        # row by row, as the pipelines decode: a batched convolution may sum in another order
        pcm = np.stack([self.codec.decode(row[None])[0].float().cpu().numpy() for row in batch])
        return pcm if codes.ndim == 3 else pcm[0]

    def _events(self, specs: list[Any]) -> Iterator[Event]:
        inbox: deque[RequestOutput] = deque()
        call = Call(self.submit(specs, inbox.append))
        try:
            while call.pending:
                if not inbox:
                    if not self.step() and not inbox:  # outputs arrive under the lock, so none can be in flight
                        raise RuntimeError(f"requests {sorted(call.pending)} ended without a final output")
                    continue
                yield from call.events(inbox.popleft())
        finally:
            self.abort(call.pending)

    # -- the core, shared by every caller ----------------------------------------------------------------------
    def submit(self, specs: list[Any], sink: Sink) -> list[int]:
        """Adds every spec as a request whose outputs go to sink (called under the engine's lock); all or none
        (EngineBusy when they do not fit)."""
        with self._lock:
            self.core.check_capacity(len(specs))
            ids = [self.core.add_request(spec) for spec in specs]
            for request_id in ids:
                self._sinks[request_id] = sink
            return ids

    def abort(self, request_ids: Sequence[int] | set[int]) -> None:
        with self._lock:
            for request_id in request_ids:
                self.core.abort(request_id)
                self._sinks.pop(request_id, None)

    def step(self) -> bool:
        """One core step, its outputs handed to their requests' sinks; False when there was nothing to run."""
        with self._lock:
            if not self.core.has_unfinished():
                return False
            try:
                outputs = self.core.step() if self.thread_governor is None else self._governed_step(self.thread_governor)
            except Exception as error:  # the step itself failed: every request in it ends with the error
                outputs = self.core.fail_all(f"engine step failed: {type(error).__name__}: {error}")
            self.deliver(outputs)
            return True

    def _governed_step(self, governor: ThreadGovernor) -> list[RequestOutput]:
        """One core step on the thread count the governor chooses, timed for it."""
        threads = governor.threads_for_next_step()
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        started = time.perf_counter()
        outputs = self.core.step()
        governor.step_took(threads, time.perf_counter() - started)
        return outputs

    def deliver(self, outputs: list[RequestOutput]) -> None:
        """Hands each output to its request's sink (under the engine's lock)."""
        with self._lock:
            for output in outputs:
                sink = self._sinks.pop(output.request_id, None) if output.finished else self._sinks.get(output.request_id)
                if sink is None:
                    continue
                try:
                    sink(output)
                except Exception:  # a consumer that cannot take output any more (its event loop closed): drop it
                    self.abort([output.request_id])

    def info(self) -> dict[str, Any]:
        c = self.config
        return {
            "name": c.name,
            "family": c.family,
            "sample_rate": c.sample_rate,
            "frame_rate": c.sample_rate / c.codec.hop_length,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "kv_cache_dtype": str(self.kv_dtype).removeprefix("torch."),
            "quantize": quantize_mode(spec.model for spec in self.family.stages().values()),
            **self.family.info(),
            "codec": {"levels": c.codec.num_levels, "codebook_size": c.codec.codebook_size, "hop_length": c.codec.hop_length},
            "codec_backend": self.codec.describe(),
            "linear_matmul_rows": {
                f"{i}x{o}": sorted(rows) for (i, o), rows in sorted(self.linear_plan.matmul_buckets.items()) if rows
            },
            "int8_kernels": {f"{i}x{o}": kernel for (i, o), kernel in sorted(self.int8_kernels.items())},
            "int8_amx_from_rows": amx_from_rows(spec.model for spec in self.family.stages().values()),
            "native_layers": {stage: spec.model.native_decoder is not None for stage, spec in self.family.stages().items()},
            "kv_blocks": {stage: runner.pool.num_blocks for stage, runner in self.core.runners.items()},
            "threads": torch.get_num_threads(),
            "adaptive_threads": self.thread_governor is not None,
            "max_running": self.core.limits.max_running,
            "max_waiting": self.core.limits.max_waiting,
        }


class Call:
    """The requests of one call as its caller reads them: which are pending, and the rows' progress summed into one
    StageProgress per stage (as one bar)."""

    def __init__(self, request_ids: list[int]) -> None:
        self.request_ids = request_ids
        self.pending = set(request_ids)
        self._progress: dict[tuple[int, str], tuple[int, int]] = {}

    def events(self, output: RequestOutput) -> list[Event]:
        """The events of one output for the caller; raises VivaceError when the request failed."""
        if output.finished:
            self.pending.discard(output.request_id)
        if output.error is not None:
            raise VivaceError(output.error)
        if len(self.request_ids) == 1:
            return output.events
        events = []
        for event in output.events:
            if isinstance(event, StageProgress):
                self._progress[output.request_id, event.stage] = (event.done, event.total)
                mine = [value for (_, stage), value in self._progress.items() if stage == event.stage]
                event = StageProgress(event.stage, sum(d for d, _ in mine), sum(t for _, t in mine))
            events.append(event)
        return events


def assemble(chunks: Iterable[AudioChunk], return_codes: bool = False) -> np.ndarray | tuple[np.ndarray, list[np.ndarray]]:
    """Concatenates streamed chunks into [rows, samples]; with return_codes also each row's codes [levels, frames]."""
    per_row: dict[int, list[AudioChunk]] = {}
    for chunk in chunks:
        per_row.setdefault(chunk.row, []).append(chunk)
    ordered = [sorted(per_row[r], key=lambda c: c.index) for r in sorted(per_row)]
    rows = [np.concatenate([c.pcm for c in row]) for row in ordered]
    length = max(len(r) for r in rows)
    out = np.zeros((len(rows), length), dtype=np.float32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    if not return_codes:
        return out
    return out, [np.concatenate([c.codes for c in row], axis=1) for row in ordered]
