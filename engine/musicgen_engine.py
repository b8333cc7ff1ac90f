"""The Engine API over a MusicGen pack: generate / stream / events with guidance_scale, the sampling overrides and,
for MusicGen-Melody packs, a reference melody."""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from vivace.codec_backend import select_backend
from vivace.config import to_dict
from vivace.engine import SAMPLING_KEYS, Engine, PromptLike, Story, _check_prompt, _check_seconds, assemble
from vivace.errors import VivaceError
from vivace.events import AudioChunk, Event
from vivace.kv_cache import KVCachePool
from vivace.musicgen import STAGE, MusicGenPipeline, MusicGenRequest
from vivace.musicgen_melody import MelodyLike, load_melody
from vivace.musicgen_pack import MusicGenPack
from vivace.pool_leases import PoolLease, PoolLeases
from vivace.stage_runner import DecodeOptions, StageRunner


CONTEXT_FRAMES = 16  # overlap on each side of a streamed chunk (0.32 s at 50 frames/s)


class MusicGenEngine(Engine):
    """Made by Engine.from_pack for a pack whose family is "musicgen"."""

    def __init__(
        self, pack: MusicGenPack, device: torch.device, dtype: torch.dtype, block_size: int, kv_cache_gb: float,
        codec_backend: str = "auto", decode: DecodeOptions = DecodeOptions(),
    ) -> None:
        self.codec = select_backend(pack, codec_backend, device)
        self.decode_options = decode
        self.pack = pack  # type: ignore[assignment]
        self.config = pack.config  # type: ignore[assignment]
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.kv_cache_gb = kv_cache_gb
        self.pool_leases = PoolLeases()

    def max_sequence_tokens(self, stage: str = STAGE, prefix: int = 0) -> int:
        """Positions of the longest window: a melody prefix, its frames, the delay pattern's K - 1 steps and the BOS
        column."""
        return prefix + self.config.frames(self.config.musicgen.window_s) + self.config.num_codebooks

    def prefix_tokens(self, prompt: str) -> int:
        """Positions a melody pack's prefix takes for this prompt (chroma_length + its text tokens); 0 otherwise."""
        melody = self.config.melody
        return 0 if melody is None else melody.chroma_length + self.pack.text.num_tokens(prompt)

    def _runner(self, prefix: int = 0) -> tuple[StageRunner, PoolLease]:
        cfg = self.config.decoder
        per_block = KVCachePool.bytes_per_block(cfg.num_layers, self.block_size, cfg.num_heads, cfg.head_dim, self.dtype)
        budget = int(self.kv_cache_gb * 2**30 // per_block)
        pair = 2 * -(-self.max_sequence_tokens(prefix=prefix) // self.block_size)  # a guided window runs as two rows
        if budget < pair:
            raise VivaceError(f"kv_cache_gb={self.kv_cache_gb} leaves room for {budget} KV blocks; one guided window needs {pair}")
        return self._leased_runner(STAGE, self.pack.decoder, min(budget, 64 * pair))

    def _melodies(self, melody: Any, sample_rate: Any, rows: int) -> list[torch.Tensor | None]:
        """One reference per row (mono, at the chroma extractor's rate): a single melody serves every row, a list
        gives each row its own (None: text only)."""
        melody_config = self.config.melody
        if melody_config is None:
            if melody is not None or sample_rate is not None:
                raise VivaceError(f"pack {self.config.name!r} is not a MusicGen-Melody pack: it takes no melody")
            return [None] * rows
        if sample_rate is not None and melody is None:
            raise VivaceError("melody_sample_rate was given without a melody")
        per_row: list[MelodyLike | None] = list(melody) if isinstance(melody, (list, tuple)) else [melody] * rows
        if len(per_row) != rows:
            raise VivaceError(f"got {len(per_row)} melodies for {rows} prompts")
        loaded: dict[int, torch.Tensor] = {}  # the same melody object is read once
        for item in per_row:
            if item is not None and id(item) not in loaded:
                loaded[id(item)] = load_melody(item, sample_rate, melody_config.chroma)
        return [None if item is None else loaded[id(item)] for item in per_row]

    def requests(
        self, prompt: PromptLike, duration_s: float | None, seed: int | Sequence[int], sampling: dict[str, Any]
    ) -> list[MusicGenRequest]:  # type: ignore[override]
        """Validates a call's arguments (sampling may hold guidance_scale, melody and melody_sample_rate) and turns
        them into one request per row."""
        m = self.config.musicgen
        sampling = dict(sampling)
        guidance_scale = sampling.pop("guidance_scale", None)
        melody, melody_rate = sampling.pop("melody", None), sampling.pop("melody_sample_rate", None)
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
            expected = f"guidance_scale, {', '.join(SAMPLING_KEYS)}" + (", melody, melody_sample_rate" if self.config.melody else "")
            raise VivaceError(f"unknown sampling argument {unknown[0]!r} (expected {expected})")
        params = replace(m.sampling, **{k: v for k, v in sampling.items() if v is not None})
        params.validate()
        seeds = self._seeds(seed, len(rows))
        texts = [_check_prompt(text) for text in rows]
        melodies = self._melodies(melody, melody_rate, len(rows))
        return [
            MusicGenRequest(row, text, duration, seeds[row], params, float(scale), melodies[row])
            for row, text in enumerate(texts)
        ]

    def events(
        self, prompt: PromptLike, duration_s: float | None = None, seed: int | Sequence[int] = 0, *,
        melody: MelodyLike | Sequence[MelodyLike | None] | None = None, melody_sample_rate: int | None = None,
        chunk_s: float | None = None, **sampling: Any,
    ) -> Iterator[Event]:
        """WindowStarted / WindowFinished per continuation window (stage "decoder", in frames), StageProgress per
        step and the audio: one AudioChunk per row once all its frames exist (chunk_s None: the exact whole decode),
        or chunks of chunk_s seconds as soon as each one's frames and CONTEXT_FRAMES after it are drawn, each
        decoded with that context on both sides (vivace.encodec_stream's bound: within 1e-3 of the whole decode's
        peak at 16 frames on random decoders). sampling: guidance_scale (the pack's default 3.0; 1 turns guidance
        off), temperature (0 = greedy), top_k, top_p.

        melody (MusicGen-Melody packs only; optional there): a sound file, or PCM [samples] / [channels, samples]
        at melody_sample_rate, for every row, or a list with one per row (None: text only)."""
        chunk_frames = None if chunk_s is None else self._chunk_frames(chunk_s)
        requests = self.requests(prompt, duration_s, seed, {**sampling, "melody": melody, "melody_sample_rate": melody_sample_rate})
        prefix = max(self.prefix_tokens(r.prompt) for r in requests)
        runner, lease = self._runner(prefix)
        pipeline = MusicGenPipeline(self.pack, runner, self.codec, chunk_frames, CONTEXT_FRAMES)
        return self.pool_leases.returned_after(pipeline.run(requests), [lease])

    def _chunk_frames(self, chunk_s: Any) -> int:
        if isinstance(chunk_s, bool) or not isinstance(chunk_s, (int, float)) or not math.isfinite(chunk_s) or chunk_s <= 0:
            raise VivaceError(f"chunk_s must be a positive number of seconds, got {chunk_s!r}")
        return max(1, round(chunk_s * self.config.frame_rate))

    def stream(
        self, prompt: PromptLike, duration_s: float | None = None, seed: int | Sequence[int] = 0, *,
        chunk_s: float | None = 1.0, **sampling: Any,
    ) -> Iterator[AudioChunk]:
        """Audio chunks of chunk_s seconds per row, in order, each as soon as its frames (and the overlap after it)
        exist; chunk_s None gives one exact chunk per row at the end."""
        events = self.events(prompt, duration_s, seed, chunk_s=chunk_s, **sampling)
        return (event for event in events if isinstance(event, AudioChunk))

    def generate(self, prompt: PromptLike, duration_s: float | None = None, seed: int | Sequence[int] = 0, **sampling: Any) -> np.ndarray:
        """Float32 PCM [batch, samples]: every row decoded whole, as transformers decodes it."""
        return assemble(self.stream(prompt, duration_s, seed, chunk_s=None, **sampling))

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
            "codec_backend": self.codec.describe(),
            "text": type(self.pack.text.encoder).__name__,
            **({"melody": to_dict(c.melody)} if c.melody is not None else {}),
            "guidance_scale": m.guidance_scale,
            "sampling": {"temperature": m.sampling.temperature, "top_k": m.sampling.top_k, "top_p": m.sampling.top_p},
            "window_s": m.window_s,
            "stride_s": m.stride_s,
            "max_duration_s": m.max_duration_s,
        }
