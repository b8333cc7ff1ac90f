"""The Engine API over a MusicGen pack: generate / stream / events with guidance_scale and the sampling overrides."""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import torch

from vivace.engine import SAMPLING_KEYS, Engine, PromptLike, Story, _check_prompt, _check_seconds
from vivace.errors import VivaceError
from vivace.events import Event
from vivace.kv_cache import KVCachePool
from vivace.musicgen import STAGE, MusicGenPipeline, MusicGenRequest
from vivace.musicgen_pack import MusicGenPack
from vivace.stage_runner import StageRunner


class MusicGenEngine(Engine):
    """Made by Engine.from_pack for a pack whose family is "musicgen"."""

    def __init__(
        self, pack: MusicGenPack, device: torch.device, dtype: torch.dtype, block_size: int, kv_cache_gb: float,
        codec_backend: str = "auto",
    ) -> None:
        if codec_backend not in ("auto", "torch"):
            raise VivaceError(f"codec_backend {codec_backend!r}: MusicGen packs decode EnCodec with torch ('auto' or 'torch')")
        self.pack = pack  # type: ignore[assignment]
        self.config = pack.config  # type: ignore[assignment]
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.kv_cache_gb = kv_cache_gb

    def max_sequence_tokens(self, stage: str = STAGE) -> int:
        """Positions of the longest window: its frames plus the delay pattern's K - 1 steps and the BOS column."""
        return self.config.frames(self.config.musicgen.window_s) + self.config.num_codebooks

    def _runner(self) -> StageRunner:
        cfg = self.config.decoder
        per_block = KVCachePool.bytes_per_block(cfg.num_layers, self.block_size, cfg.num_heads, cfg.head_dim, self.dtype)
        budget = int(self.kv_cache_gb * 2**30 // per_block)
        pair = 2 * -(-self.max_sequence_tokens() // self.block_size)  # a guided window runs as two rows
        if budget < pair:
            raise VivaceError(f"kv_cache_gb={self.kv_cache_gb} leaves room for {budget} KV blocks; one guided window needs {pair}")
        pool = KVCachePool(cfg.num_layers, min(budget, 64 * pair), self.block_size, cfg.num_heads, cfg.head_dim, self.dtype, self.device)
        return StageRunner(STAGE, self.pack.decoder, pool, self.device)

    def requests(
        self, prompt: PromptLike, duration_s: float | None, seed: int | Sequence[int], sampling: dict[str, Any]
    ) -> list[MusicGenRequest]:  # type: ignore[override]
        """Validates a call's arguments (sampling may hold guidance_scale) and turns them into one request per row."""
        m = self.config.musicgen
        sampling = dict(sampling)
        guidance_scale = sampling.pop("guidance_scale", None)
        if isinstance(prompt, Story) or (isinstance(prompt, (list, tuple)) and any(not isinstance(p, str) for p in prompt)):
            raise VivaceError("story mode (segments with their own prompts) is not supported by MusicGen packs")
        rows = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else []
        if not rows:
            raise VivaceError(f"prompt must be a non-empty string or a list of them, got {prompt!r}")
        if duration_s is None:
            raise VivaceError("duration_s is required")
        duration = _check_seconds(duration_s, "duration", m.max_duration_s)
        if self.config.frames(duration) < 1:
            raise VivaceError(f"duration {duration} s is shorter than one frame")
        scale = m.guidance_scale if guidance_scale is None else guidance_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 1:
            raise VivaceError(f"guidance_scale must be a finite number >= 1 (1 turns guidance off), got {guidance_scale!r}")
        unknown = sorted(set(sampling) - set(SAMPLING_KEYS))
        if unknown:
            raise VivaceError(f"unknown sampling argument {unknown[0]!r} (expected guidance_scale, {', '.join(SAMPLING_KEYS)})")
        params = replace(m.sampling, **{k: v for k, v in sampling.items() if v is not None})
        params.validate()
        seeds = self._seeds(seed, len(rows))
        return [
            MusicGenRequest(row, _check_prompt(text), duration, seeds[row], params, float(scale))
            for row, text in enumerate(rows)
        ]

    def events(self, prompt: PromptLike, duration_s: float | None = None, seed: int | Sequence[int] = 0, **sampling: Any) -> Iterator[Event]:
        """WindowStarted / WindowFinished per continuation window (stage "decoder", in frames), StageProgress per
        step and one AudioChunk per row once all its frames exist. sampling: guidance_scale (the pack's default
        3.0; 1 turns guidance off), temperature (0 = greedy), top_k, top_p."""
        requests = self.requests(prompt, duration_s, seed, sampling)
        return MusicGenPipeline(self.pack, self._runner()).run(requests)

    def info(self) -> dict[str, Any]:
        c, d, m = self.config, self.config.decoder, self.config.musicgen
        return {
            "name": c.name,
            "family": c.family,
            "sample_rate": c.sample_rate,
            "frame_rate": c.frame_rate,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "decoder": {
                "layers": d.num_layers, "d_model": d.d_model, "heads": d.num_heads, "d_ff": d.d_ff,
                "codebooks": d.num_codebooks, "codebook_size": d.output_vocab_size,
                "params": sum(p.numel() for p in self.pack.decoder.parameters()),
            },
            "codec": {"levels": c.codec.num_levels, "codebook_size": c.codec.codebook_size, "hop_length": c.codec.hop_length},
            "text": type(self.pack.text.encoder).__name__,
            "guidance_scale": m.guidance_scale,
            "sampling": {"temperature": m.sampling.temperature, "top_k": m.sampling.top_k, "top_p": m.sampling.top_p},
            "window_s": m.window_s,
            "stride_s": m.stride_s,
            "max_duration_s": m.max_duration_s,
        }
