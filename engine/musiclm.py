"""The MusicLM hierarchy as a dataflow: semantic -> coarse -> fine -> codec, all stages advancing together.

Each tick every stage with work runs one batched step. A coarse window starts as soon as the semantic
tokens it reads exist, a fine chunk as soon as its coarse frames exist, and a chunk's audio is decoded as
soon as its fine tokens are done. Time to first audio is therefore bounded by the first windows and does
not grow with the clip's duration; fine chunks that become ready together decode as one batch.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from vivace.codec_backend import CodecBackend, FrameStream, TorchBackend
from vivace.config import SamplingParams
from vivace.events import AudioChunk, Event, StageProgress, WindowFinished, WindowStarted
from vivace.layout import MusicLMLayout
from vivace.pack import Pack
from vivace.sampling import stream_id
from vivace.sequence import Sequence, TimeMajorSchedule
from vivace.stage_runner import StageRunner
from vivace.windows import Window, plan_chunks, plan_windows

STAGE_INDEX = {"semantic": 0, "coarse": 1, "fine": 2}


@dataclass(frozen=True)
class Request:
    """One row of a generation: its story segments (one for a plain prompt), seed and per-stage sampling."""

    row: int
    segments: tuple[tuple[str, float], ...]
    seed: int
    sampling: dict[str, SamplingParams]


@dataclass
class RowState:
    request: Request
    conditions: list[list[int]]  # MT codes per segment
    semantic_plan: list[Window]
    coarse_plan: list[Window]
    fine_plan: list[Window]
    semantic: np.ndarray  # [semantic tokens], -1 until generated
    coarse: np.ndarray  # [frames, coarse_levels]
    fine: np.ndarray  # [frames, fine_levels]
    semantic_done: int = 0
    coarse_done: int = 0  # frames
    next_semantic: int = 0
    next_coarse: int = 0
    active: dict[str, tuple[Sequence, Window] | None] = field(default_factory=lambda: {"semantic": None, "coarse": None})
    fine_started: set[int] = field(default_factory=set)
    fine_finished: set[int] = field(default_factory=set)
    next_audio: int = 0
    audio: FrameStream | None = None  # the codec stream, fed the fine chunks in order


class MusicLMPipeline:
    def __init__(self, pack: Pack, runners: dict[str, StageRunner], codec: CodecBackend | None = None) -> None:
        self.pack = pack
        self.codec = codec or TorchBackend(pack.codec)
        self.config = pack.config
        self.layout = MusicLMLayout.of(pack.config)
        self.runners = runners
        self.frame_rate = pack.config.sample_rate // pack.config.codec.hop_length
        self.frames_per_semantic = self.frame_rate // pack.config.musiclm.semantic_rate
        self.hop = pack.config.codec.hop_length
        self._next_seq_id = 0
        self._fine_owner: dict[int, tuple[RowState, Window]] = {}

    def _frames(self, seconds: float) -> int:
        return round(seconds * self.frame_rate)

    def _semantic_tokens(self, seconds: float) -> int:
        return round(seconds * self.config.musiclm.semantic_rate)

    def _row_state(self, request: Request) -> RowState:
        m = self.config.musiclm
        starts_s = np.cumsum([0.0] + [seconds for _, seconds in request.segments[:-1]])
        semantic_starts = [self._semantic_tokens(t) for t in starts_s]
        duration = sum(seconds for _, seconds in request.segments)
        frames = self._frames(duration)
        semantic_total = -(-frames // self.frames_per_semantic)
        codes = self.pack.text.tokens([prompt for prompt, _ in request.segments]).tolist()
        return RowState(
            request=request,
            conditions=codes,
            semantic_plan=plan_windows(
                semantic_total, self._semantic_tokens(m.semantic_window_s), self._semantic_tokens(m.semantic_stride_s),
                semantic_starts,
            ),
            coarse_plan=plan_windows(
                frames, self._frames(m.coarse_window_s), self._frames(m.coarse_stride_s),
                [s * self.frames_per_semantic for s in semantic_starts],
            ),
            fine_plan=plan_chunks(frames, self._frames(m.fine_chunk_s)),
            semantic=np.full(semantic_total, -1, dtype=np.int64),
            coarse=np.full((frames, m.coarse_levels), -1, dtype=np.int64),
            fine=np.full((frames, m.fine_levels), -1, dtype=np.int64),
        )

    def _sequence(
        self, stage: str, state: RowState, window: Window, prompt: list[int], num_new: int, schedule: TimeMajorSchedule
    ) -> Sequence:
        self._next_seq_id += 1
        request = state.request
        return Sequence(
            seq_id=self._next_seq_id,
            prompt=prompt,
            max_new_tokens=num_new,
            schedule=schedule,
            sampling=request.sampling[stage],
            seed=request.seed,
            stream=stream_id(STAGE_INDEX[stage], window.index),
            priority=(window.new_start, request.row),
        )

    def _start_semantic(self, state: RowState, window: Window) -> tuple[Sequence, WindowStarted]:
        layout = self.layout
        condition = state.conditions[window.segment]
        prompt = layout.mt_tokens(condition)
        prompt += (state.semantic[window.prefix_start : window.new_start] + layout.semantic_offset).tolist()
        schedule = TimeMajorSchedule(1, layout.semantic_vocab, layout.semantic_offset)
        seq = self._sequence("semantic", state, window, prompt, window.num_new, schedule)
        return seq, self._started("semantic", state, window, condition)

    def _start_coarse(self, state: RowState, window: Window) -> tuple[Sequence, WindowStarted]:
        layout = self.layout
        condition = state.conditions[window.segment]
        first_semantic = window.prefix_start // self.frames_per_semantic
        last_semantic = -(-window.new_end // self.frames_per_semantic)
        prompt = layout.mt_tokens(condition)
        prompt += (state.semantic[first_semantic:last_semantic] + layout.semantic_offset).tolist()
        prefix = state.coarse[window.prefix_start : window.new_start]
        prompt += self._time_major(prefix, layout.coarse_offset)
        schedule = TimeMajorSchedule(layout.coarse_levels, layout.acoustic_codebook, layout.coarse_offset)
        seq = self._sequence("coarse", state, window, prompt, window.num_new * layout.coarse_levels, schedule)
        return seq, self._started("coarse", state, window, condition)

    def _start_fine(self, state: RowState, window: Window) -> tuple[Sequence, WindowStarted]:
        layout = self.layout
        prompt = self._time_major(state.coarse[window.new_start : window.new_end], 0)
        schedule = TimeMajorSchedule(layout.fine_levels, layout.acoustic_codebook, layout.fine_offset)
        seq = self._sequence("fine", state, window, prompt, window.num_new * layout.fine_levels, schedule)
        return seq, self._started("fine", state, window, [])

    def _time_major(self, codes: np.ndarray, offset: int) -> list[int]:
        levels = np.arange(codes.shape[1]) * self.layout.acoustic_codebook
        return (codes + levels + offset).reshape(-1).tolist()

    @staticmethod
    def _started(stage: str, state: RowState, window: Window, condition: list[int]) -> WindowStarted:
        return WindowStarted(
            stage, state.request.row, window.index, window.prefix_start, window.new_start, window.new_end, tuple(condition)
        )

    def _schedule(self, states: list[RowState]) -> list[Event]:
        """Starts every window and chunk whose inputs exist."""
        events: list[Event] = []
        for state in states:
            if state.active["semantic"] is None and state.next_semantic < len(state.semantic_plan):
                window = state.semantic_plan[state.next_semantic]
                events.append(self._launch("semantic", state, window, self._start_semantic))
                state.next_semantic += 1
            if state.active["coarse"] is None and state.next_coarse < len(state.coarse_plan):
                window = state.coarse_plan[state.next_coarse]
                needed = -(-window.new_end // self.frames_per_semantic)
                if state.semantic_done >= needed and state.coarse_done >= window.new_start:
                    events.append(self._launch("coarse", state, window, self._start_coarse))
                    state.next_coarse += 1
            for window in state.fine_plan:
                if window.index not in state.fine_started and state.coarse_done >= window.new_end:
                    seq, event = self._start_fine(state, window)
                    self.runners["fine"].add(seq)
                    self._fine_owner[seq.seq_id] = (state, window)
                    state.fine_started.add(window.index)
                    events.append(event)
        return events

    def _launch(self, stage: str, state: RowState, window: Window, start) -> WindowStarted:
        seq, event = start(state, window)
        self.runners[stage].add(seq)
        state.active[stage] = (seq, window)
        return event

    def _collect(self, states: list[RowState], finished: dict[str, list[Sequence]]) -> list[Event]:
        """Copies generated tokens into the row states; reports finished windows."""
        events: list[Event] = []
        layout = self.layout
        cb = layout.acoustic_codebook
        for state in states:
            active = state.active["semantic"]
            if active is not None:
                seq, window = active
                new = seq.output_array()
                state.semantic[window.new_start : window.new_start + len(new)] = new
                state.semantic_done = window.new_start + len(new)
                if seq in finished["semantic"]:
                    state.active["semantic"] = None
                    events.append(WindowFinished("semantic", state.request.row, window.index, tuple(new.tolist())))
            active = state.active["coarse"]
            if active is not None:
                seq, window = active
                drawn = seq.output_array()
                frames = len(drawn) // layout.coarse_levels
                new = drawn[: frames * layout.coarse_levels].reshape(frames, layout.coarse_levels) % cb
                state.coarse[window.new_start : window.new_start + frames] = new
                state.coarse_done = window.new_start + frames
                if seq in finished["coarse"]:
                    state.active["coarse"] = None
                    events.append(WindowFinished("coarse", state.request.row, window.index, tuple(drawn.tolist())))
        for seq in finished["fine"]:
            state, window = self._fine_owner.pop(seq.seq_id)
            drawn = seq.output_array()
            state.fine[window.new_start : window.new_end] = drawn.reshape(window.num_new, -1) % cb
            state.fine_finished.add(window.index)
            events.append(WindowFinished("fine", state.request.row, window.index, tuple(drawn.tolist())))
        return events

    @torch.inference_mode()
    def _decode_audio(self, states: list[RowState]) -> list[AudioChunk]:
        chunks = []
        for state in states:
            while state.next_audio in state.fine_finished:
                window = state.fine_plan[state.next_audio]
                frames = slice(window.new_start, window.new_end)
                codes = np.concatenate([state.coarse[frames], state.fine[frames]], axis=1)
                codes_t = torch.from_numpy(codes.T.copy()).unsqueeze(0).to(self.pack.codec.codebooks.device)
                if state.audio is None:
                    state.audio = self.codec.stream()
                pcm = state.audio.push(codes_t)[0]
                chunks.append(AudioChunk(state.request.row, window.index, window.new_start * self.hop, pcm.float().cpu().numpy()))
                state.next_audio += 1
        return chunks

    def run(self, requests: list[Request]) -> Iterator[Event]:
        states = [self._row_state(request) for request in requests]
        totals = {
            "semantic": sum(len(s.semantic) for s in states),
            "coarse": sum(s.coarse.size for s in states),
            "fine": sum(s.fine.size for s in states),
        }
        try:
            while any(s.next_audio < len(s.fine_plan) for s in states):
                yield from self._schedule(states)
                stepped = [stage for stage in ("fine", "coarse", "semantic") if self.runners[stage].has_work]
                if not stepped:
                    raise RuntimeError("MusicLM pipeline stalled: no stage has work but audio is missing")
                finished = {stage: self.runners[stage].step() if stage in stepped else [] for stage in self.runners}
                yield from self._collect(states, finished)
                for stage in stepped:
                    yield StageProgress(stage, self._progress(stage, states), totals[stage])
                yield from self._decode_audio(states)
        finally:
            for runner in self.runners.values():
                runner.cancel_all()

    def _progress(self, stage: str, states: list[RowState]) -> int:
        if stage == "fine":
            runner = self.runners["fine"]
            in_flight = sum(seq.num_new for seq in runner.running + runner.waiting)
            return in_flight + sum(int((s.fine >= 0).sum()) for s in states)
        arrays = [s.semantic if stage == "semantic" else s.coarse for s in states]
        return sum(int((array >= 0).sum()) for array in arrays)
