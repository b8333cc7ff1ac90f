"""The Python API: Engine.from_pack(...).generate / stream / events."""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vivace.codec_backend import CodecBackend, TorchBackend, select_backend
from vivace.config import SamplingParams
from vivace.errors import VivaceError
from vivace.events import AudioChunk, Event
from vivace.kv_cache import KVCachePool
from vivace.musiclm import MusicLMPipeline, Request
from vivace.pack import STAGES, Pack, load_pack
from vivace.quant import check_quantize, quantize_pack
from vivace.device_decode import DeviceLoops
from vivace.pool_leases import PoolLease, PoolLeases
from vivace.stage_runner import DecodeOptions, StageRunner
from vivace.transformer import StageTransformer

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
SAMPLING_KEYS = ("temperature", "top_k", "top_p")


@dataclass(frozen=True)
class Story:
    """A clip whose text condition changes over time: (prompt, seconds) segments played in order."""

    segments: tuple[tuple[str, float], ...]


PromptLike = str | Story | Sequence[str] | Sequence[Story] | Sequence[tuple[str, float]]


def _is_story_list(value: Any) -> bool:
    return (
        isinstance(value, (list, tuple)) and len(value) > 0
        and all(isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str) for item in value)
    )


def _check_prompt(prompt: Any) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise VivaceError(f"prompt must be a non-empty string, got {prompt!r}")
    return prompt


def _check_seconds(value: Any, what: str, limit: float) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise VivaceError(f"{what} must be a number of seconds, got {value!r}") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise VivaceError(f"{what} must be > 0 seconds, got {value!r}")
    if seconds > limit:
        raise VivaceError(f"{what} of {seconds} s exceeds this pack's limit of {limit} s")
    return seconds


class Engine:
    def __init__(
        self, pack: Pack, device: torch.device, dtype: torch.dtype, block_size: int, kv_cache_gb: float,
        codec: CodecBackend | None = None, decode: DecodeOptions = DecodeOptions(),
    ) -> None:
        self.pack = pack
        self.decode_options = decode
        self.codec = codec or TorchBackend(pack.codec)
        self.config = pack.config
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.kv_cache_gb = kv_cache_gb
        self.pool_leases = PoolLeases()

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
    ) -> Engine:
        """codec_backend: "auto" | "torch" | "onnxruntime" | "tensorrt" (see vivace.codec_backend.select_backend).
        quantize: None, or "int8" for int8 weight-only stage linears (see vivace.quant).
        steps_per_sync > 1: decode that many steps per host sync on the device (Triton sampling and advance, see
        vivace.device_decode); cuda_graphs: capture them as CUDA graphs. Both are for CUDA devices and are not yet
        verified on a GPU; the default (1, False) is the per-step path with the C++ decode batch."""
        if dtype not in DTYPES:
            raise VivaceError(f"unknown dtype {dtype!r} (choose one of {sorted(set(DTYPES))})")
        if not isinstance(block_size, int) or block_size <= 0:
            raise VivaceError(f"block_size must be a positive integer, got {block_size!r}")
        if not kv_cache_gb > 0:
            raise VivaceError(f"kv_cache_gb must be > 0, got {kv_cache_gb!r}")
        torch_device = torch.device(device)
        check_quantize(quantize)
        decode = DecodeOptions(steps_per_sync, cuda_graphs)
        decode.validate(torch_device)
        pack = load_pack(path, DTYPES[dtype], torch_device)
        quantize_pack(pack, quantize)
        if pack.config.family == "musicgen":
            from vivace.musicgen_engine import MusicGenEngine

            return MusicGenEngine(pack, torch_device, DTYPES[dtype], block_size, kv_cache_gb, codec_backend, decode)
        codec = select_backend(pack, codec_backend, torch_device)
        return cls(pack, torch_device, DTYPES[dtype], block_size, kv_cache_gb, codec, decode)

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    def max_sequence_tokens(self, stage: str) -> int:
        m = self.config.musiclm
        frame_rate = self.config.sample_rate // self.config.codec.hop_length
        mt = self.config.text.num_levels
        if stage == "semantic":
            return mt + round(m.semantic_window_s * m.semantic_rate)
        if stage == "coarse":
            return mt + round(m.coarse_window_s * m.semantic_rate) + round(m.coarse_window_s * frame_rate) * m.coarse_levels
        return round(m.fine_chunk_s * frame_rate) * self.config.codec.num_levels

    def _runners(self) -> tuple[dict[str, StageRunner], list[PoolLease]]:
        """A runner per stage on a leased KV pool (give the leases back when the generation ends)."""
        runners, leases = {}, []
        budget = self.kv_cache_gb * 2**30 / len(STAGES)
        for stage in STAGES:
            cfg = self.config.stages[stage]
            per_block = KVCachePool.bytes_per_block(cfg.num_layers, self.block_size, cfg.num_heads, cfg.head_dim, self.dtype)
            longest = -(-self.max_sequence_tokens(stage) // self.block_size)
            if budget // per_block < longest:
                raise VivaceError(
                    f"kv_cache_gb={self.kv_cache_gb} leaves stage {stage!r} room for {int(budget // per_block)} blocks; "
                    f"one window needs {longest}"
                )
            runners[stage], lease = self._leased_runner(stage, self.pack.stages[stage], int(min(budget // per_block, 64 * longest)))
            leases.append(lease)
        return runners, leases

    def _leased_runner(self, stage: str, model: StageTransformer, num_blocks: int) -> tuple[StageRunner, PoolLease]:
        """A runner on a pool of num_blocks blocks from the engine's leases (with the device loops built on it)."""
        cfg = model.config

        def make(blocks: int) -> tuple[KVCachePool, DeviceLoops]:
            pool = KVCachePool(cfg.num_layers, blocks, self.block_size, cfg.num_heads, cfg.head_dim, self.dtype, self.device)
            return pool, DeviceLoops(model, pool.layers(), self.block_size, self.device, self.decode_options.cuda_graphs)

        lease = self.pool_leases.take(stage, num_blocks, make)
        return StageRunner(stage, model, lease.pool, self.device, self.decode_options, lease.device_loops), lease

    def _sampling(self, overrides: dict[str, Any]) -> dict[str, SamplingParams]:
        stage_overrides = overrides.pop("stage_sampling", None) or {}
        if any(overrides.pop(key, None) is not None for key in ("melody", "melody_sample_rate")):
            raise VivaceError(f"pack {self.config.name!r} is a MusicLM pack: a melody needs a MusicGen-Melody pack")
        unknown = sorted(set(overrides) - set(SAMPLING_KEYS))
        if unknown:
            raise VivaceError(f"unknown sampling argument {unknown[0]!r} (expected {', '.join(SAMPLING_KEYS)} or stage_sampling)")
        m = self.config.musiclm
        defaults = {"semantic": m.semantic_sampling, "coarse": m.coarse_sampling, "fine": m.fine_sampling}
        result = {}
        for stage, params in defaults.items():
            params = replace(params, **{k: v for k, v in overrides.items() if v is not None})
            extra = stage_overrides.get(stage, {})
            params = replace(params, **(vars(extra) if isinstance(extra, SamplingParams) else extra))
            params.validate()
            result[stage] = params
        unknown_stages = sorted(set(stage_overrides) - set(defaults))
        if unknown_stages:
            raise VivaceError(f"stage_sampling names unknown stage {unknown_stages[0]!r}")
        return result

    def requests(self, prompt: PromptLike, duration_s: float | None, seed: int | Sequence[int], sampling: dict[str, Any]) -> list[Request]:
        """Validates a call's arguments and turns them into one Request per row."""
        limit = self.config.musiclm.max_duration_s
        if isinstance(prompt, Story) or _is_story_list(prompt):
            rows: list[Any] = [prompt]
        elif isinstance(prompt, str):
            rows = [prompt]
        elif isinstance(prompt, (list, tuple)) and prompt:
            rows = list(prompt)
        else:
            raise VivaceError(f"prompt must be a non-empty string, a list of them, or a story, got {prompt!r}")
        segments_per_row = []
        for row in rows:
            if isinstance(row, str):
                if duration_s is None:
                    raise VivaceError("duration_s is required for a plain prompt")
                segments = ((_check_prompt(row), _check_seconds(duration_s, "duration", limit)),)
            else:
                items = row.segments if isinstance(row, Story) else row
                if not _is_story_list(items):
                    raise VivaceError(f"a story is a non-empty list of (prompt, seconds), got {items!r}")
                segments = tuple((_check_prompt(p), _check_seconds(s, "story segment", limit)) for p, s in items)
                total = sum(s for _, s in segments)
                _check_seconds(total, "story duration", limit)
                if duration_s is not None and abs(float(duration_s) - total) > 1e-6:
                    raise VivaceError(f"duration_s {duration_s} differs from the story's total {total} s")
            segments_per_row.append(segments)
        seeds = self._seeds(seed, len(rows))
        params = self._sampling(dict(sampling))
        return [Request(row, segments, seeds[row], params) for row, segments in enumerate(segments_per_row)]

    @staticmethod
    def _seeds(seed: int | Sequence[int], rows: int) -> list[int]:
        """An integer seed s gives row i the seed s + i; a list gives each row its own."""
        values = list(seed) if isinstance(seed, (list, tuple)) else [seed + i if isinstance(seed, int) else seed for i in range(rows)]
        if len(values) != rows:
            raise VivaceError(f"got {len(values)} seeds for {rows} prompts")
        for value in values:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < 2**63:
                raise VivaceError(f"seed must be an integer in [0, 2**63), got {value!r}")
        return [int(v) for v in values]

    def events(self, prompt: PromptLike, duration_s: float | None = None, seed: int | Sequence[int] = 0, **sampling: Any) -> Iterator[Event]:
        """Every event of a generation: window starts/ends, per-stage progress and audio chunks."""
        requests = self.requests(prompt, duration_s, seed, sampling)  # validated before the first event
        runners, leases = self._runners()
        return self.pool_leases.returned_after(MusicLMPipeline(self.pack, runners, self.codec).run(requests), leases)

    def stream(self, prompt: PromptLike, duration_s: float | None = None, seed: int | Sequence[int] = 0, **sampling: Any) -> Iterator[AudioChunk]:
        """Audio chunks (row, start sample, float32 PCM) in order per row, each as soon as it is decoded."""
        events = self.events(prompt, duration_s, seed, **sampling)
        return (event for event in events if isinstance(event, AudioChunk))

    def generate(self, prompt: PromptLike, duration_s: float | None = None, seed: int | Sequence[int] = 0, **sampling: Any) -> np.ndarray:
        """Float32 PCM [batch, samples] at engine.sample_rate."""
        return assemble(self.stream(prompt, duration_s, seed, **sampling))

    def info(self) -> dict[str, Any]:
        c = self.config
        return {
            "name": c.name,
            "family": c.family,
            "sample_rate": c.sample_rate,
            "frame_rate": c.sample_rate / c.codec.hop_length,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "stages": {
                name: {
                    "layers": s.num_layers, "d_model": s.d_model, "heads": s.num_heads, "d_ff": s.d_ff,
                    "params": sum(p.numel() for p in self.pack.stages[name].parameters()),
                }
                for name, s in c.stages.items()
            },
            "codec": {"levels": c.codec.num_levels, "codebook_size": c.codec.codebook_size, "hop_length": c.codec.hop_length},
            "codec_backend": self.codec.describe(),
            "text": c.text.kind,
            "max_duration_s": c.musiclm.max_duration_s,
        }


def assemble(chunks: Iterator[AudioChunk]) -> np.ndarray:
    """Concatenates streamed chunks into [rows, samples]."""
    per_row: dict[int, list[AudioChunk]] = {}
    for chunk in chunks:
        per_row.setdefault(chunk.row, []).append(chunk)
    rows = [np.concatenate([c.pcm for c in sorted(per_row[r], key=lambda c: c.index)]) for r in sorted(per_row)]
    length = max(len(r) for r in rows)
    out = np.zeros((len(rows), length), dtype=np.float32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out
