"""Generation from real tokens partway down the hierarchy: rows that start with a clip's semantic tokens, or its
semantic tokens and coarse codes, in place, and generate only the stages below (adherence_by_stage.py)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np

from vivace.families.musiclm import pipeline


@contextlib.contextmanager
def real_tokens(fill: dict[str, tuple[np.ndarray, np.ndarray | None]]) -> Iterator[None]:
    """Rows whose prompt is a key of fill start with its semantic tokens (and coarse codes [frames, levels], where
    given) in place, as an audio prompt's are. The engine has no semantic-token prompt, so the pipeline's row state is
    filled in here, for the duration of the block."""
    row_state = pipeline.MusicLMPipeline._row_state

    def filled(self: pipeline.MusicLMPipeline, request: pipeline.Request) -> pipeline.RowState:
        state = row_state(self, request)
        semantic, coarse = fill.get(request.segments[0][0], (None, None))
        if semantic is not None:
            n = min(len(state.semantic), len(semantic))
            state.semantic[:n], state.semantic_done = semantic[:n], n
            state.next_semantic = sum(w.new_end <= n for w in state.semantic_plan)
        if coarse is not None:
            frames = min(len(state.coarse), len(coarse))
            state.coarse[:frames], state.coarse_done = coarse[:frames, : state.coarse.shape[1]], frames
            state.next_coarse = sum(w.new_end <= frames for w in state.coarse_plan)
        return state

    pipeline.MusicLMPipeline._row_state = filled
    try:
        yield
    finally:
        pipeline.MusicLMPipeline._row_state = row_state
