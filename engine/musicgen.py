"""The MusicGen pipeline: one decoder over delay-interleaved EnCodec codebooks, with classifier-free guidance.

Per request row the prompt is encoded once (text encoder -> projection -> cross-attention keys/values of every
layer) and kept for the whole generation. With guidance (scale > 1) the row runs as a conditional sequence and
a null-condition twin in the same batch and KV pool; their logits mix as null + (cond - null) * scale and one
token per codebook is drawn for the pair, as transformers' generate does.

MusicGen-Melody (vivace.musicgen_melody) is conditioned by a prefix of input embeddings instead of cross-attention:
the chroma of a reference audio and the text states, in front of the codes; the null twin reads the null chroma
and zeroed text states. The prefix occupies the first positions and cache slots of every window's sequence.

Delay pattern: codebook k is shifted right by k steps behind a BOS column, so a window of T frames is T + K - 1
steps; positions before codebook k starts and after it ends hold the pad/BOS id and are forced, whatever the
heads draw (transformers' build_delay_pattern_mask / apply_delay_pattern_mask).

Longer than one window (the model's trained context, window_s = 30 s): windowed continuation as in audiocraft.
The first window generates window_s; every later one is a fresh sequence (positions from 0) whose prompt is the
last window_s - stride_s of audio so far (12 s with the default 18 s stride), and generates up to stride_s more.
By default every row's audio is decoded once all of its frames exist: the 32 kHz EnCodec decoder is not causal, so
a whole decode is what transformers' decode returns. With chunk_frames set (Engine.stream), a row's audio comes in
chunks as soon as each chunk's frames and `context_frames` after it are drawn, each decoded with up to
`context_frames` on either side (vivace.encodec_stream's overlap; its error bound applies).
"""
from __future__ import annotations

from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from vivace._C import delay_pattern, undelay_pattern
from vivace.codec_backend import CodecBackend, TorchBackend
from vivace.config import SamplingParams
from vivace.events import AudioChunk, Event, StageProgress, WindowFinished, WindowStarted
from vivace.musicgen_melody import MelodyPrefixes
from vivace.musicgen_pack import MusicGenPack
from vivace.sampling import stream_id
from vivace.sequence import CrossCondition, DelaySchedule, Sequence
from vivace.stage_runner import StageRunner
from vivace.windows import Window, plan_windows

STAGE = "decoder"


@dataclass(frozen=True)
class MusicGenRequest:
    row: int
    prompt: str
    duration_s: float
    seed: int
    sampling: SamplingParams
    guidance_scale: float  # > 1: classifier-free guidance; 1: the conditional logits alone
    melody: torch.Tensor | None = field(default=None, compare=False)  # melody packs: mono, at the chroma extractor's rate


@dataclass(frozen=True)
class Condition:
    """What a row's sequences read besides their codes (cross-attention keys/values, or a prefix of input
    embeddings) and the cache salt that keeps cached blocks of other conditions apart."""

    salt: Hashable
    cross: CrossCondition | None = None
    prefix: torch.Tensor | None = None


@dataclass
class RowState:
    request: MusicGenRequest
    plan: list[Window]
    codes: np.ndarray  # [num_codebooks, frames], -1 until generated
    text_ids: tuple[int, ...]
    text_states: torch.Tensor  # [tokens, d_model], projected, float32
    condition: Condition | None  # the same for every window (None: a melody that changes per window)
    null: Condition | None  # guidance's null condition
    next_window: int = 0
    active: tuple[Sequence, Window] | None = None
    done_frames: int = 0
    decoded: bool = False
    ready_frames: int = 0  # leading frames whose codes are all drawn (finished windows and the active one's prefix)
    emitted_frames: int = 0  # streamed audio so far
    next_chunk: int = 0


def delayed_grid(codes: np.ndarray, pad_id: int) -> np.ndarray:
    """codes [K, T] (-1 = not yet drawn) -> the window's positions [K, T + K]: a BOS column, then the delay pattern."""
    shifted = delay_pattern(np.ascontiguousarray(codes, dtype=np.int64), pad_id)
    return np.concatenate([np.full((codes.shape[0], 1), pad_id, dtype=np.int64), shifted], axis=1)


def undelayed(grid: np.ndarray) -> np.ndarray:
    """Inverse of delayed_grid: [K, T + K] -> codes [K, T]."""
    return undelay_pattern(np.ascontiguousarray(grid[:, 1:], dtype=np.int64))


class MusicGenPipeline:
    def __init__(
        self, pack: MusicGenPack, runner: StageRunner, codec: CodecBackend | None = None,
        chunk_frames: int | None = None, context_frames: int = 16,
    ) -> None:
        """chunk_frames: stream each row's audio in chunks of this many frames (None: one whole decode per row)."""
        self.pack = pack
        self.codec = codec or TorchBackend(pack.codec)
        self.chunk_frames = chunk_frames
        self.context_frames = context_frames
        self.config = pack.config
        self.runner = runner
        self.device = runner.device
        self.melody = MelodyPrefixes(pack) if pack.config.melody is not None else None
        self._next_seq_id = 0

    def plan(self, frames: int) -> list[Window]:
        """audiocraft's continuation: a full first window, then stride-sized steps, each with a fixed-length prompt."""
        m = self.config.musicgen
        window, stride = self.config.frames(m.window_s), self.config.frames(m.stride_s)
        keep = window - stride
        return [
            Window(w.index, max(w.prefix_start, w.new_start - keep), w.new_start, w.new_end, 0)
            for w in plan_windows(frames, window, stride, [0])
        ]

    @torch.inference_mode()
    def _cross(self, states: torch.Tensor, salt: Hashable, attend: bool) -> Condition:
        """Cross-attention keys/values of encoder states; masked out (attend False) for the null condition."""
        decoder = self.pack.decoder
        states = states.to(self.device, next(decoder.parameters()).dtype)
        keys, values = decoder.encode_cross(states.unsqueeze(0))
        mask = torch.full((states.shape[0],), attend, dtype=torch.bool, device=self.device)
        return Condition(salt, cross=CrossCondition([k[0] for k in keys], [v[0] for v in values], mask))

    def _prefix(self, chroma: torch.Tensor, states: torch.Tensor, salt: Hashable) -> Condition:
        assert self.melody is not None
        return Condition((*salt, self.melody.key(chroma)), prefix=self.melody.prefix(chroma, states))

    def _row_state(self, request: MusicGenRequest) -> RowState:
        """The text is encoded once per row. The null condition is transformers': zeroed encoder states under an
        all-zero attention mask (MusicGen), the null chroma and zeroed text states (MusicGen-Melody)."""
        frames = self.config.frames(request.duration_s)
        states, ids = self.pack.text.encode(request.prompt)
        guided = request.guidance_scale > 1
        salt, null_salt = ("text", request.prompt), ("null", len(ids))
        plan = self.plan(frames)
        condition: Condition | None
        if self.melody is None:
            condition = self._cross(states, salt, True)
            null = self._cross(torch.zeros_like(states), null_salt, False) if guided else None
        else:
            null = self._prefix(self.melody.chroma(None, None), torch.zeros_like(states), null_salt) if guided else None
            per_window = request.melody is not None and len(plan) > 1
            condition = None if per_window else self._prefix(self.melody.chroma(request.melody, None), states, salt)
        codes = np.full((self.config.num_codebooks, frames), -1, dtype=np.int64)
        return RowState(request, plan, codes, tuple(ids), states, condition, null)

    def _condition(self, state: RowState, window: Window) -> Condition:
        if state.condition is not None:
            return state.condition
        assert self.melody is not None
        chroma = self.melody.chroma(state.request.melody, window.prefix_start / self.config.frame_rate)
        return self._prefix(chroma, state.text_states, ("text", state.request.prompt))

    def _sequence(self, state: RowState, window: Window) -> Sequence:
        request = state.request
        prompt_frames = window.new_start - window.prefix_start
        codes = state.codes[:, window.prefix_start : window.new_end].copy()
        grid = delayed_grid(codes, self.config.pad_id)
        prompt = [tuple(int(i) for i in column) for column in grid[:, : prompt_frames + 1].T]
        schedule = DelaySchedule(grid, prompt_frames + 1, self.config.pad_id)

        def make(condition: Condition) -> Sequence:
            self._next_seq_id += 1
            return Sequence(
                seq_id=self._next_seq_id, prompt=prompt, max_new_tokens=grid.shape[1] - len(prompt), schedule=schedule,
                sampling=request.sampling, seed=request.seed, stream=stream_id(window.index),
                priority=(window.new_start, request.row), cross=condition.cross, cache_salt=condition.salt,
                prefix=condition.prefix,
            )

        seq = make(self._condition(state, window))
        if state.null is not None:
            seq.guide(make(state.null), request.guidance_scale)
        return seq

    def _schedule(self, states: list[RowState]) -> list[Event]:
        events: list[Event] = []
        for state in states:
            if state.active is None and state.next_window < len(state.plan):
                window = state.plan[state.next_window]
                seq = self._sequence(state, window)
                self.runner.add(seq)
                state.active = (seq, window)
                state.next_window += 1
                events.append(WindowStarted(
                    STAGE, state.request.row, window.index, window.prefix_start, window.new_start, window.new_end,
                    state.text_ids,
                ))
        return events

    def _collect(self, states: list[RowState], finished: list[Sequence]) -> list[Event]:
        """Copies finished windows' codes into their rows; WindowFinished carries the new codes frame by frame."""
        events: list[Event] = []
        for state in states:
            if state.active is None or state.active[0] not in finished:
                continue
            seq, window = state.active
            codes = undelayed(seq.token_array(seq.prefix_len).T)
            new = codes[:, window.new_start - window.prefix_start :]
            state.codes[:, window.new_start : window.new_end] = new
            state.done_frames = window.new_end
            state.active = None
            events.append(WindowFinished(STAGE, state.request.row, window.index, tuple(new.T.reshape(-1).tolist())))
        return events

    @torch.inference_mode()
    def _decode(self, states: list[RowState]) -> list[AudioChunk]:
        chunks = []
        for state in states:
            if not state.decoded and state.done_frames == state.codes.shape[1]:
                pcm = self.codec.decode(self._codes(state, 0, state.codes.shape[1]))[0]
                chunks.append(AudioChunk(state.request.row, 0, 0, pcm.float().cpu().numpy()))
                state.decoded = True
        return chunks

    def _codes(self, state: RowState, start: int, end: int) -> torch.Tensor:
        return torch.from_numpy(state.codes[:, start:end].copy()).unsqueeze(0).to(self.pack.codec.codebooks.device)

    def _track(self, states: list[RowState]) -> None:
        """Copies the frames the active windows completed since the last call: frame t of a window is complete once
        the delay pattern's last codebook has drawn it, K - 1 steps after the first."""
        k = self.config.num_codebooks
        for state in states:
            state.ready_frames = max(state.ready_frames, state.done_frames)
            if state.active is None:
                continue
            seq, window = state.active
            complete = seq.length - seq.prefix_len - k  # grid columns filled, less the BOS column and the K - 1 lag
            begin = state.ready_frames - window.prefix_start  # the window's frames already in state.codes
            if complete > begin:
                # columns begin .. complete + K - 1 of the window's grid hold frames begin .. complete - 1 (undelayed
                # drops the first column as the BOS column)
                columns = seq.token_array(seq.prefix_len + begin)[: complete + k - begin].T
                state.codes[:, state.ready_frames : window.prefix_start + complete] = undelayed(columns)
                state.ready_frames = window.prefix_start + complete

    @torch.inference_mode()
    def _stream(self, states: list[RowState]) -> list[AudioChunk]:
        """Every chunk whose frames and right context exist, decoded with its context on both sides."""
        assert self.chunk_frames is not None
        self._track(states)
        chunks = []
        hop, context = self.config.codec.hop_length, self.context_frames
        for state in states:
            total = state.codes.shape[1]
            while state.emitted_frames < total:
                start = state.emitted_frames
                end = min(start + self.chunk_frames, total)
                high = min(total, end + context)
                if state.ready_frames < high:
                    break
                low = max(0, start - context)
                pcm = self.codec.decode(self._codes(state, low, high))[0, (start - low) * hop : (end - low) * hop]
                chunks.append(AudioChunk(state.request.row, state.next_chunk, start * hop, pcm.float().cpu().numpy()))
                state.emitted_frames, state.next_chunk = end, state.next_chunk + 1
            state.decoded = state.emitted_frames == total
        return chunks

    def _progress(self, states: list[RowState]) -> StageProgress:
        """Steps drawn so far against all steps of all windows of all rows."""
        k = self.config.num_codebooks
        total = sum(w.num_new + k - 1 for s in states for w in s.plan)
        done = sum(w.num_new + k - 1 for s in states for w in s.plan[: s.next_window])
        in_flight = sum(s.active[0].max_len - s.active[0].length for s in states if s.active is not None)
        return StageProgress(STAGE, done - in_flight, total)

    def run(self, requests: list[MusicGenRequest]) -> Iterator[Event]:
        states = [self._row_state(request) for request in requests]
        try:
            while not all(s.decoded for s in states):
                yield from self._schedule(states)
                if not self.runner.has_work:
                    raise RuntimeError("MusicGen pipeline stalled: no sequence to run but audio is missing")
                finished = self.runner.step()
                yield from self._collect(states, finished)
                yield self._progress(states)
                yield from (self._decode(states) if self.chunk_frames is None else self._stream(states))
        finally:
            self.runner.cancel_all()
