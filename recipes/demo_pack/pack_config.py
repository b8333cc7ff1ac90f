"""The demo pack's configuration: token layout, stage sizes, windows and sampling defaults."""
from __future__ import annotations

from dataclasses import replace

from common import (
    CODEC,
    MT_CODEBOOK,
    MT_LEVELS,
    SAMPLE_RATE,
    SEMANTIC_RATE,
    SEMANTIC_VOCAB,
    TOKENIZER,
)
from mulan import TEXT_CONFIG

from vivace.core.sampling import SamplingParams
from vivace.families.musiclm.config import MusicLMConfig, PackConfig
from vivace.families.musiclm.layout import MusicLMLayout
from vivace.model.config import TransformerConfig

FRAME_RATE = SAMPLE_RATE // CODEC.hop_length
# Stages trained with a null condition (stages_train.py --cond-drop) and sampled with classifier-free guidance. The
# bundled pack has none: the one attempt with both guided (logs/guided-attempt/, README) did not beat it.
GUIDED_STAGES: tuple[str, ...] = ()
GUIDANCE_SCALE = 3.0 if GUIDED_STAGES else 1.0
CROP_SECONDS = {"semantic": 10.0, "coarse": 2.0, "fine": 1.0}
MUSICLM = MusicLMConfig(
    semantic_vocab=SEMANTIC_VOCAB, semantic_rate=SEMANTIC_RATE, coarse_levels=4, fine_levels=8,
    semantic_window_s=CROP_SECONDS["semantic"], semantic_stride_s=CROP_SECONDS["semantic"] / 2,
    coarse_window_s=CROP_SECONDS["coarse"], coarse_stride_s=CROP_SECONDS["coarse"] / 2,
    fine_chunk_s=CROP_SECONDS["fine"], max_duration_s=300.0,
    semantic_sampling=SamplingParams(temperature=1.0, top_k=50),
    # the coarse stage samples its whole distribution: at temperature 0.95 with top-k 50, or at 0.8, the continuation
    # windows fell into near-silent codes within a few seconds (the second recipe's pack; README), at 1.0 they keep the level
    coarse_sampling=SamplingParams(temperature=1.0, top_k=0),
    fine_sampling=SamplingParams(temperature=0.4),
    guided_stages=GUIDED_STAGES, guidance_scale=GUIDANCE_SCALE,
)
STAGE_SHAPE = dict(num_layers=4, d_model=256, num_heads=4, d_ff=1024, rel_num_buckets=32, rel_max_distance=128)


def pack_config(name: str = "vivace-demo") -> PackConfig:
    skeleton = PackConfig(
        family="musiclm", sample_rate=SAMPLE_RATE, stages={}, codec=CODEC, text=TEXT_CONFIG, musiclm=MUSICLM,
        codec_encoder=True, semantic_tokenizer=TOKENIZER,
    )
    layout = MusicLMLayout.of(skeleton)
    stages = {}
    for stage in ("semantic", "coarse", "fine"):
        vocab, output_vocab = layout.vocab_sizes(stage)
        stages[stage] = TransformerConfig(vocab_size=vocab, output_vocab_size=output_vocab, **STAGE_SHAPE)
    return replace(skeleton, stages=stages, name=name)


LAYOUT = MusicLMLayout.of(pack_config())
assert LAYOUT.mt_levels == MT_LEVELS and LAYOUT.mt_codebook == MT_CODEBOOK
