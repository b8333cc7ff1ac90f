"""The MusicLM token layout: which segments each stage reads, at which vocabulary offsets, and what it predicts.

semantic: [MT (levels x cb)] [S]            -> S
coarse:   [MT] [S] [A levels 1..4, time-major] -> A coarse
fine:     [A coarse] [A levels 5..12, time-major] -> A fine

A stage trained for classifier-free guidance (config.musiclm.guided_stages) has one more input id, its null token,
which a null row reads in place of each MT token.
"""
from __future__ import annotations

from dataclasses import dataclass

from vivace.families.musiclm.config import PackConfig


@dataclass(frozen=True)
class MusicLMLayout:
    mt_levels: int
    mt_codebook: int
    semantic_vocab: int
    acoustic_codebook: int
    coarse_levels: int
    fine_levels: int
    guided_stages: tuple[str, ...] = ()

    @classmethod
    def of(cls, config: PackConfig) -> MusicLMLayout:
        return cls(
            mt_levels=config.text.num_levels,
            mt_codebook=config.text.codebook_size,
            semantic_vocab=config.musiclm.semantic_vocab,
            acoustic_codebook=config.codec.codebook_size,
            coarse_levels=config.musiclm.coarse_levels,
            fine_levels=config.musiclm.fine_levels,
            guided_stages=config.musiclm.guided_stages,
        )

    @property
    def mt_vocab(self) -> int:
        return self.mt_levels * self.mt_codebook

    @property
    def coarse_vocab(self) -> int:
        return self.coarse_levels * self.acoustic_codebook

    @property
    def fine_vocab(self) -> int:
        return self.fine_levels * self.acoustic_codebook

    @property
    def semantic_offset(self) -> int:
        """Where S tokens start in the semantic and coarse stages' input vocabularies."""
        return self.mt_vocab

    @property
    def coarse_offset(self) -> int:
        """Where coarse acoustic tokens start in the coarse stage's input vocabulary."""
        return self.mt_vocab + self.semantic_vocab

    @property
    def fine_offset(self) -> int:
        """Where fine acoustic tokens start in the fine stage's input vocabulary (coarse tokens sit at 0)."""
        return self.coarse_vocab

    def vocab_sizes(self, stage: str) -> tuple[int, int]:
        """(input vocabulary, output vocabulary) of a stage; a guided stage's null token is its last input id."""
        null = int(stage in self.guided_stages)
        return {
            "semantic": (self.mt_vocab + self.semantic_vocab + null, self.semantic_vocab),
            "coarse": (self.mt_vocab + self.semantic_vocab + self.coarse_vocab + null, self.coarse_vocab),
            "fine": (self.coarse_vocab + self.fine_vocab, self.fine_vocab),
        }[stage]

    def null_tokens(self, stage: str) -> list[int]:
        """A guided stage's null condition: its null token in place of each MT token, so that the rows of a guided
        pair have equal lengths and positions."""
        if stage not in self.guided_stages:
            raise ValueError(f"the {stage} stage is not trained for guidance: it has no null condition")
        return [self.vocab_sizes(stage)[0] - 1] * self.mt_levels

    def mt_tokens(self, codes: list[int]) -> list[int]:
        return [level * self.mt_codebook + code for level, code in enumerate(codes)]
