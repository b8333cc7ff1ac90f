"""Packs with random weights, for tests and benchmarks (no download, deterministic per seed)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from vivace.codecs.soundstream import CodecConfig, SoundStreamDecoder
from vivace.codecs.soundstream_encoder import SoundStreamEncoder
from vivace.errors import VivaceError
from vivace.families.musiclm.config import MusicLMConfig, PackConfig, TextConfig
from vivace.families.musiclm.layout import MusicLMLayout
from vivace.families.musiclm.pack import STAGES, save_pack
from vivace.families.musiclm.semantic_tokenizer import SemanticTokenizer, SemanticTokenizerConfig
from vivace.families.musiclm.text import BuiltinTextEncoder, TextConditioner, TransformersTextEncoder
from vivace.model.config import TransformerConfig
from vivace.model.transformer import StageTransformer


def preset_config(preset: str, guided_stages: tuple[str, ...] = ()) -> PackConfig:
    """A preset's configuration; guided_stages: the stages given a null token for classifier-free guidance (the
    pack's default guidance_scale is then 3)."""
    if preset == "tiny":
        text = TextConfig(hash_buckets=512, hidden_dim=32, embed_dim=16, num_levels=12, codebook_size=32)
        codec = CodecConfig(num_levels=12, codebook_size=32, codebook_dim=16, channels=4)
        musiclm = MusicLMConfig(
            semantic_vocab=64, semantic_window_s=2.0, semantic_stride_s=1.0, coarse_window_s=1.0,
            coarse_stride_s=0.6, fine_chunk_s=0.5, max_duration_s=60.0,
        )
        stage = dict(num_layers=2, d_model=32, num_heads=2, d_ff=64, rel_num_buckets=8, rel_max_distance=32)
    elif preset == "paper":
        text = TextConfig(hash_buckets=8192, hidden_dim=256, embed_dim=128, num_levels=12, codebook_size=1024)
        codec = CodecConfig(num_levels=12, codebook_size=1024, codebook_dim=128, channels=32)
        musiclm = MusicLMConfig()
        stage = dict(num_layers=24, d_model=1024, num_heads=16, d_ff=4096, rel_num_buckets=32, rel_max_distance=128)
    else:
        raise VivaceError(f"unknown preset {preset!r} (choose 'tiny' or 'paper')")
    if guided_stages:
        musiclm = replace(musiclm, guided_stages=tuple(guided_stages), guidance_scale=3.0)
    skeleton = PackConfig(family="musiclm", sample_rate=24000, stages={}, codec=codec, text=text, musiclm=musiclm)
    layout = MusicLMLayout.of(skeleton)
    stages = {}
    for name in STAGES:
        vocab, output_vocab = layout.vocab_sizes(name)
        stages[name] = TransformerConfig(vocab_size=vocab, output_vocab_size=output_vocab, **stage)
    return PackConfig(
        family="musiclm", name=f"random-{preset}", sample_rate=24000, stages=stages, codec=codec, text=text, musiclm=musiclm
    )


def random_pack(
    path: str | Path,
    family: str = "musiclm",
    preset: str = "tiny",
    seed: int = 0,
    dtype: torch.dtype | None = None,
    text_model: str | Path | None = None,
    force: bool = False,
    encodes_audio: bool = False,
    guided_stages: tuple[str, ...] = (),
) -> Path:
    """Writes a pack with random weights. Paper-size packs are stored in bfloat16 unless dtype says otherwise.

    text_model: a local transformers encoder directory (model + tokenizer) to use as the text tower instead of
    the built-in hashed one; it is copied into the pack and its projection and codebooks are random.
    force: write into a directory that is not empty (its pack files are replaced, other files are left alone).
    encodes_audio: also a random codec encoder and semantic tokenizer (random centroids over its standardised
    features), so that audio prompts and encode() run.
    guided_stages: stages ("semantic", "coarse") given a null token, so that classifier-free guidance runs.
    """
    if family != "musiclm":
        raise VivaceError(f"random_pack: unknown family {family!r}")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise VivaceError(f"{path}: already exists and is not a directory")
    if path.exists() and any(path.iterdir()) and not force:
        raise VivaceError(f"{path}: already exists and is not an empty directory (--force, or force=True, writes over it)")
    config = preset_config(preset, guided_stages)
    encoder: torch.nn.Module = BuiltinTextEncoder(config.text)
    if text_model is not None:
        probe = TransformersTextEncoder(config.text, Path(text_model))
        text_config = replace(config.text, kind="transformers", hidden_dim=probe.model.config.hidden_size)
        config = replace(config, text=text_config)
        encoder = TransformersTextEncoder(text_config, Path(text_model))
    if encodes_audio:
        tokenizer_config = SemanticTokenizerConfig(vocab=config.musiclm.semantic_vocab, rate=config.musiclm.semantic_rate)
        config = replace(config, codec_encoder=True, semantic_tokenizer=tokenizer_config)
    storage = dtype or (torch.bfloat16 if preset == "paper" else torch.float32)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        with torch.no_grad():
            stages = {name: StageTransformer(config.stages[name]) for name in STAGES}
            codec = SoundStreamDecoder(config.codec)
            codec.codebooks.normal_(0.0, 1.0)
            if text_model is None:
                encoder = BuiltinTextEncoder(config.text)
            text = TextConditioner(config.text, encoder)
            text.codebooks.normal_(0.0, config.text.embed_dim**-0.5)
            codec_encoder = tokenizer = None
            if encodes_audio:
                codec_encoder = SoundStreamEncoder(config.codec)
                tokenizer = SemanticTokenizer(config.semantic_tokenizer, config.sample_rate)
                tokenizer.centroids.normal_(0.0, 1.0)
                tokenizer.mean.normal_(0.0, 1.0)
                tokenizer.std.uniform_(0.5, 2.0)
        return save_pack(
            path, config, stages, codec, text, storage_dtype=storage, codec_encoder=codec_encoder, semantic_tokenizer=tokenizer,
        )
    finally:
        torch.random.set_rng_state(generator_state)
