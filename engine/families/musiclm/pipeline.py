"""The MusicLM hierarchy as a dataflow: semantic -> coarse -> fine -> codec, every stage advancing at each step.

`MusicLM` is the family an engine holds for a MusicLM pack; each admitted request runs as one `MusicLMPipeline`, a
state machine over its windows. A coarse window starts as soon as the semantic tokens it reads exist, a fine chunk as
soon as its coarse frames exist, and a chunk's audio is decoded as soon as its fine tokens are done. Time to first
audio is therefore bounded by the first windows and does not grow with the clip's duration; fine chunks that become
ready together (of one request or of several) decode as one batch.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vivace.arguments import (
    SAMPLING_KEYS,
    Story,
    check_duration,
    check_guidance_scale,
    check_prompt,
    codec_frames,
    is_story_list,
    negative_prompts,
    per_row,
    seeds,
    stage_sampling,
    unknown_arguments,
)
from vivace.audio import read_pcm
from vivace.codecs.backend import CodecBackend, FrameStream
from vivace.codecs.soundstream_encoder import SoundStreamEncoder, encode_soundstream, soundstream_codes
from vivace.core.family import RequestContext, StageSpec
from vivace.core.sampling import SamplingParams
from vivace.core.sequence import Sequence, TimeMajorSchedule
from vivace.core.windows import Window, plan_chunks, plan_windows
from vivace.errors import VivaceError
from vivace.events import AudioChunk, Event, StageProgress, WindowFinished, WindowStarted
from vivace.families.musiclm.layout import MusicLMLayout
from vivace.families.musiclm.pack import STAGES, Pack, load_codec, load_pack
from vivace.families.musiclm.semantic_tokenizer import SemanticTokenizer
from vivace.kernels.sampling import stream_id
from vivace.resample import mono

STAGE_INDEX = {"semantic": 0, "coarse": 1, "fine": 2}


@dataclass(frozen=True)
class AudioPrompt:
    """A clip to continue, as the tokens of its first whole semantic tokens: semantic [tokens] and acoustic codes
    [frames, codec levels]."""

    semantic: np.ndarray
    acoustic: np.ndarray


@dataclass(frozen=True)
class Request:
    """One row of a generation: its story segments (one for a plain prompt), seed, per-stage sampling, the audio
    prompt it continues (None: none), and the classifier-free guidance of the pack's guided stages (scale 1: none;
    negative_prompt: the text whose MT tokens the null rows read instead of the null token)."""

    row: int
    segments: tuple[tuple[str, float], ...]
    seed: int
    sampling: dict[str, SamplingParams]
    audio_prompt: AudioPrompt | None = None
    guidance_scale: float = 1.0
    negative_prompt: str | None = None


@dataclass
class RowState:
    request: Request
    conditions: list[list[int]]  # MT codes per window segment (a story's segments, split where an audio prompt ends)
    null_condition: list[int] | None  # the MT codes of the negative prompt (None: the null token)
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
    fine_active: dict[Sequence, Window] = field(default_factory=dict)
    fine_filled: int = 0  # fine tokens in `fine` (finished chunks and the prompt's): progress without a scan per step
    next_audio: int = 0
    audio: FrameStream | None = None  # the codec stream, fed the fine chunks in order


class MusicLM:
    """The MusicLM family of an engine: its stages, its requests' validation, and a pipeline per request."""

    load_pack = staticmethod(load_pack)
    load_codec = staticmethod(load_codec)
    # torch streams the causal SoundStream codec with carried state; onnxruntime re-decodes each chunk's left
    # context and is no faster on the CPU (measured in docs/codec_backends.md)
    cpu_codec_backend = "torch"

    def __init__(self, pack: Pack, codec: CodecBackend) -> None:
        self.pack = pack
        self.codec = codec
        self.config = pack.config
        self.layout = MusicLMLayout.of(pack.config)
        self.frame_rate = pack.config.sample_rate // pack.config.codec.hop_length
        self.frames_per_semantic = self.frame_rate // pack.config.musiclm.semantic_rate
        self.hop = pack.config.codec.hop_length

    def frames(self, seconds: float) -> int:
        return codec_frames(seconds, self.frame_rate)

    def semantic_tokens(self, seconds: float) -> int:
        return round(seconds * self.config.musiclm.semantic_rate)

    def max_sequence_tokens(self, stage: str) -> int:
        m = self.config.musiclm
        mt = self.config.text.num_levels
        if stage == "semantic":
            return mt + self.semantic_tokens(m.semantic_window_s)
        if stage == "coarse":
            return mt + self.semantic_tokens(m.coarse_window_s) + self.frames(m.coarse_window_s) * m.coarse_levels
        return self.frames(m.fine_chunk_s) * self.config.codec.num_levels

    def stages(self) -> dict[str, StageSpec]:
        return {stage: StageSpec(self.pack.stages[stage], self.max_sequence_tokens(stage)) for stage in STAGES}

    # -- a call's arguments ------------------------------------------------------------------------------------
    def stream_options(self, options: dict[str, Any]) -> dict[str, Any]:
        return options

    def whole_options(self, options: dict[str, Any]) -> dict[str, Any]:
        # a whole clip is what generate returns whatever the chunks: chunk_s=None asks for nothing this cannot give
        return {k: v for k, v in options.items() if not (k == "chunk_s" and v is None)}

    def sampling(self, overrides: dict[str, Any]) -> dict[str, SamplingParams]:
        """Each stage's sampling: the pack's, then temperature / top_k / top_p for every stage, then
        stage_sampling's entry for that stage ({"semantic" | "coarse" | "fine": {key: value} or SamplingParams})."""
        overrides = dict(overrides)
        per_stage = overrides.pop("stage_sampling", None)
        if any(overrides.pop(key, None) is not None for key in ("melody", "melody_sample_rate")):
            raise VivaceError(f"pack {self.config.name!r} is a MusicLM pack: a melody needs a MusicGen-Melody pack")
        if "chunk_s" in overrides:
            raise VivaceError(
                f"chunk_s {overrides['chunk_s']!r} does not apply to MusicLM pack {self.config.name!r}: its audio "
                f"streams in the fine stage's chunks of {self.config.musiclm.fine_chunk_s} s, which the pack fixes"
            )
        unknown_arguments(overrides, (*SAMPLING_KEYS, "stage_sampling"))
        m = self.config.musiclm
        defaults = {"semantic": m.semantic_sampling, "coarse": m.coarse_sampling, "fine": m.fine_sampling}
        return stage_sampling(defaults, overrides, per_stage)

    def _prompt_parts(self) -> tuple[SoundStreamEncoder, SemanticTokenizer]:
        pack = self.pack
        if pack.codec_encoder is None or pack.semantic_tokenizer is None:
            missing = [name for name, part in (("a codec encoder", pack.codec_encoder),
                                               ("a semantic tokenizer", pack.semantic_tokenizer)) if part is None]
            raise VivaceError(
                f"MusicLM pack {self.config.name!r} carries no {' and no '.join(p.removeprefix('a ') for p in missing)}: "
                "an audio prompt's acoustic and semantic tokens need both (the demo recipe's build_pack.py ships them)"
            )
        return pack.codec_encoder, pack.semantic_tokenizer

    def encode(self, audio: Any, sample_rate: Any = None, what: str = "audio") -> np.ndarray:
        """Audio (a sound file, or PCM [samples] / [channels, samples] at sample_rate) -> the codec's codes, int64
        [levels, samples // hop], downmixed to mono and resampled to the pack's rate first."""
        if self.pack.codec_encoder is None:
            raise VivaceError(f"MusicLM pack {self.config.name!r} carries no codec encoder: it cannot encode audio")
        return encode_soundstream(
            self.pack.codec_encoder, self.pack.codec.codebooks, audio, sample_rate, self.config.sample_rate, what,
        )

    def _audio_prompts(self, audio: Any, sample_rate: Any, rows: int, frames: int) -> list[AudioPrompt | None]:
        """Each row's audio prompt (None: none); a single prompt serves every row, a list gives each row its own. A
        prompt is cut to whole semantic tokens and must be shorter than the clip."""
        if audio is None:
            if sample_rate is not None:
                raise VivaceError("audio_prompt_sample_rate was given without an audio_prompt")
            return [None] * rows
        encoder, tokenizer = self._prompt_parts()
        samples_per_token = self.hop * self.frames_per_semantic

        def tokens(item: Any) -> AudioPrompt:
            pcm, rate = read_pcm(item, sample_rate, "audio_prompt")
            wave = mono(pcm, rate, self.config.sample_rate).to(self.pack.codec.codebooks.device)
            count = wave.shape[-1] // samples_per_token
            if count == 0:
                raise VivaceError(
                    f"audio_prompt of {wave.shape[-1] / self.config.sample_rate:g} s is shorter than one semantic token "
                    f"({samples_per_token / self.config.sample_rate:g} s at this pack's {self.config.musiclm.semantic_rate}/s)"
                )
            if count * self.frames_per_semantic >= frames:
                raise VivaceError(
                    f"audio_prompt of {count * samples_per_token / self.config.sample_rate:g} s (whole semantic tokens) "
                    f"must be shorter than the duration (the whole clip, the prompt included): {frames / self.frame_rate:g} s"
                )
            wave = wave[: count * samples_per_token]
            acoustic = soundstream_codes(encoder, self.pack.codec.codebooks, wave)
            return AudioPrompt(tokenizer(wave).cpu().numpy(), acoustic.T.cpu().numpy())

        return per_row(audio, rows, "audio prompts", tokens)

    def requests(self, prompt: Any, duration_s: Any, seed: Any, options: dict[str, Any]) -> list[Request]:
        """Validates a call's arguments and turns them into one Request per row. A Story, or a list of (prompt,
        seconds) pairs, is one story (one row); a list of strings or of Story objects is a batch, one row each.
        A clip's length rounds to whole codec frames, a story's segment boundaries to whole semantic tokens.
        options: the sampling keys, stage_sampling, and audio_prompt, audio_prompt_sample_rate (a sound file or PCM
        per row or for all, where the pack carries a codec encoder and a semantic tokenizer: its semantic and acoustic
        tokens become the first windows' prefix, as in AudioLM's continuation, and the clip begins with the prompt
        re-decoded from its codes; duration_s is the whole clip's, the prompt included)."""
        options = dict(options)
        limit = self.config.musiclm.max_duration_s
        guidance_scale = self._guidance_scale(options.pop("guidance_scale", None))
        negative_prompt = options.pop("negative_prompt", None)
        if negative_prompt is not None and not self.config.musiclm.guided_stages:
            raise VivaceError(
                f"negative_prompt conditions the null row of classifier-free guidance: MusicLM pack {self.config.name!r} "
                "runs without guidance (it has no guided stage)"
            )
        if prompt is None or (isinstance(prompt, (list, tuple)) and any(row is None for row in prompt)):
            raise VivaceError(
                "prompt None (unconditional generation) is MusicGen's: every MusicLM stage reads the prompt's MuLan tokens, "
                "and no MusicLM pack is trained without them"
            )
        if isinstance(prompt, Story) or is_story_list(prompt):
            rows: list[Any] = [prompt]
        elif isinstance(prompt, str):
            rows = [prompt]
        elif isinstance(prompt, (list, tuple)) and prompt:
            rows = list(prompt)
        else:
            raise VivaceError(f"prompt must be a non-empty string, a list of them, or a story, got {prompt!r}")
        if duration_s is not None:
            duration_s = check_duration(duration_s, "duration", limit, self.frame_rate)
        segments_per_row = []
        for row in rows:
            if isinstance(row, str):
                if duration_s is None:
                    raise VivaceError("duration_s is required for a plain prompt")
                segments = ((check_prompt(row), duration_s),)
            else:
                segments = self._story(row.segments if isinstance(row, Story) else row)
                total = sum(s for _, s in segments)
                if duration_s is not None and abs(duration_s - total) > 1e-6:
                    raise VivaceError(f"duration_s {duration_s} differs from the story's total {total} s")
            segments_per_row.append(segments)
        row_seeds = seeds(seed, len(rows))
        audio = self._audio_prompts(
            options.pop("audio_prompt", None), options.pop("audio_prompt_sample_rate", None), len(rows),
            min(self.frames(sum(s for _, s in segments)) for segments in segments_per_row),
        )
        params = self.sampling(options)
        negatives = negative_prompts(negative_prompt, len(rows), [guidance_scale] * len(rows))
        return [
            Request(row, segments, row_seeds[row], params, audio[row], guidance_scale, negatives[row])
            for row, segments in enumerate(segments_per_row)
        ]

    def _guidance_scale(self, value: Any) -> float:
        """A call's guidance of the pack's guided stages (None: the pack's default)."""
        m = self.config.musiclm
        scale = check_guidance_scale(value, m.guidance_scale)
        if scale > 1 and not m.guided_stages:
            raise VivaceError(
                f"guidance_scale {value!r} needs a pack trained for classifier-free guidance: MusicLM pack "
                f"{self.config.name!r} has no guided stage (its stages never saw the null condition)"
            )
        return scale

    def _story(self, items: Any) -> tuple[tuple[str, float], ...]:
        """A story's segments, each at least one codec frame long and each holding at least one semantic token once
        its boundaries round to whole tokens (a segment that rounds to none would never be heard)."""
        limit = self.config.musiclm.max_duration_s
        if not is_story_list(items):
            raise VivaceError(f"a story is a non-empty list of (prompt, seconds), got {items!r}")
        segments = tuple(
            (check_prompt(p), check_duration(s, f"story segment {i + 1}", limit, self.frame_rate))
            for i, (p, s) in enumerate(items)
        )
        total = check_duration(sum(s for _, s in segments), "story duration", limit, self.frame_rate)
        rate = self.config.musiclm.semantic_rate
        starts = self.segment_starts(segments)
        ends = [*starts[1:], -(-self.frames(total) // self.frames_per_semantic)]
        for i, (start, end) in enumerate(zip(starts, ends)):
            if end <= start:
                prompt, seconds = segments[i]
                raise VivaceError(
                    f"story segment {i + 1} ({prompt!r}, {seconds} s) rounds to no semantic token: a story's prompts "
                    f"change on whole tokens of {1 / rate:g} s at this pack's {rate} tokens/s"
                )
        return segments

    def segment_starts(self, segments: tuple[tuple[str, float], ...]) -> list[int]:
        """The semantic token each segment starts at."""
        starts_s = np.cumsum([0.0] + [seconds for _, seconds in segments[:-1]])
        return [self.semantic_tokens(t) for t in starts_s]

    def start(self, request: Request, context: RequestContext) -> MusicLMPipeline:
        return MusicLMPipeline(self, request, context)

    def info(self) -> dict[str, Any]:
        c = self.config
        return {
            "stages": {
                name: {
                    "layers": s.num_layers, "d_model": s.d_model, "heads": s.num_heads, "d_ff": s.d_ff,
                    "params": sum(p.numel() for p in self.pack.stages[name].parameters()),
                }
                for name, s in c.stages.items()
            },
            "text": c.text.kind,
            "max_duration_s": c.musiclm.max_duration_s,
            "audio_prompts": c.encodes_audio,  # carries the codec encoder and the semantic tokenizer
            "guided_stages": list(c.musiclm.guided_stages),
            "guidance_scale": c.musiclm.guidance_scale,
        }


class MusicLMPipeline:
    """One request's windows through the three stages and the codec."""

    def __init__(self, family: MusicLM, request: Request, context: RequestContext) -> None:
        self.family = family
        self.layout = family.layout
        self.context = context
        self.state = self._row_state(request)
        self.totals = {"semantic": self.state.semantic.size, "coarse": self.state.coarse.size, "fine": self.state.fine.size}
        self.prompt_events = self._prompt_events()  # reported by the first schedule()

    @property
    def done(self) -> bool:
        return self.state.next_audio >= len(self.state.fine_plan)

    def _row_state(self, request: Request) -> RowState:
        family = self.family
        m = family.config.musiclm
        fps = family.frames_per_semantic
        story_starts = family.segment_starts(request.segments)
        duration = sum(seconds for _, seconds in request.segments)
        frames = family.frames(duration)
        semantic_total = -(-frames // fps)
        prompt = request.audio_prompt
        prompt_tokens = 0 if prompt is None else len(prompt.semantic)
        # windows break where the prompt ends, so the first generated window starts right after it
        starts = sorted({*story_starts, prompt_tokens})
        story_codes = family.pack.text.tokens([text for text, _ in request.segments]).tolist()
        negative = request.negative_prompt  # encoded alone: the prompt's codes never depend on it
        null_condition = None if negative is None else family.pack.text.tokens([negative])[0].tolist()
        conditions = [story_codes[int(np.searchsorted(story_starts, s, side="right")) - 1] for s in starts]
        prompt_frames = prompt_tokens * fps
        prompt_chunks = plan_chunks(prompt_frames, family.frames(m.fine_chunk_s)) if prompt_frames else []
        later_chunks = [
            Window(len(prompt_chunks) + w.index, w.prefix_start + prompt_frames, w.new_start + prompt_frames,
                   w.new_end + prompt_frames, w.segment)
            for w in plan_chunks(frames - prompt_frames, family.frames(m.fine_chunk_s))
        ]
        state = RowState(
            request=request,
            conditions=conditions,
            null_condition=null_condition,
            semantic_plan=plan_windows(
                semantic_total, family.semantic_tokens(m.semantic_window_s), family.semantic_tokens(m.semantic_stride_s),
                starts,
            ),
            coarse_plan=plan_windows(
                frames, family.frames(m.coarse_window_s), family.frames(m.coarse_stride_s), [s * fps for s in starts],
            ),
            fine_plan=prompt_chunks + later_chunks,
            semantic=np.full(semantic_total, -1, dtype=np.int64),
            coarse=np.full((frames, m.coarse_levels), -1, dtype=np.int64),
            fine=np.full((frames, m.fine_levels), -1, dtype=np.int64),
        )
        if prompt is not None:
            state.semantic[:prompt_tokens] = prompt.semantic
            state.coarse[:prompt_frames] = prompt.acoustic[:, : m.coarse_levels]
            state.fine[:prompt_frames] = prompt.acoustic[:, m.coarse_levels :]
            state.fine_filled = state.fine[:prompt_frames].size
            state.semantic_done, state.coarse_done = prompt_tokens, prompt_frames
            state.next_semantic = sum(w.new_end <= prompt_tokens for w in state.semantic_plan)
            state.next_coarse = sum(w.new_end <= prompt_frames for w in state.coarse_plan)
            state.fine_started.update(w.index for w in prompt_chunks)
            state.fine_finished.update(w.index for w in prompt_chunks)
        return state

    def _prompt_events(self) -> list[Event]:
        """The windows and chunks an audio prompt fills, reported as started and finished with the prompt's tokens
        (in the ids a generated window reports)."""
        state, row = self.state, self.state.request.row
        events: list[Event] = []
        for window in state.semantic_plan[: state.next_semantic]:
            tokens = state.semantic[window.new_start : window.new_end].tolist()
            events += [self._started("semantic", window, state.conditions[window.segment]),
                       WindowFinished("semantic", row, window.index, tuple(tokens))]
        for window in state.coarse_plan[: state.next_coarse]:
            tokens = self._time_major(state.coarse[window.new_start : window.new_end], 0)
            events += [self._started("coarse", window, state.conditions[window.segment]),
                       WindowFinished("coarse", row, window.index, tuple(tokens))]
        for window in state.fine_plan:
            if window.index in state.fine_finished:
                tokens = self._time_major(state.fine[window.new_start : window.new_end], 0)
                events += [self._started("fine", window, []), WindowFinished("fine", row, window.index, tuple(tokens))]
        return events

    def _sequence(self, stage: str, window: Window, prompt: list[int], num_new: int, schedule: TimeMajorSchedule) -> Sequence:
        """A window's sequence; in a guided stage with guidance on, paired with its null row, which reads the null
        condition (or the negative prompt's MT tokens) in place of the MT tokens the prompt starts with."""
        request = self.state.request

        def make(tokens: list[int]) -> Sequence:
            return Sequence(
                seq_id=self.context.next_seq_id(),
                prompt=tokens,
                max_new_tokens=num_new,
                schedule=schedule,
                sampling=request.sampling[stage],
                seed=request.seed,
                stream=stream_id(STAGE_INDEX[stage], window.index),
                priority=(self.context.request_id, window.new_start),
            )

        seq = make(prompt)
        if request.guidance_scale > 1 and stage in self.layout.guided_stages:
            negative = self.state.null_condition
            null = self.layout.null_tokens(stage) if negative is None else self.layout.mt_tokens(negative)
            seq.guide(make(null + prompt[len(null):]), request.guidance_scale)
        return seq

    def _start_semantic(self, window: Window) -> tuple[Sequence, WindowStarted]:
        layout, state = self.layout, self.state
        condition = state.conditions[window.segment]
        prompt = layout.mt_tokens(condition)
        prompt += (state.semantic[window.prefix_start : window.new_start] + layout.semantic_offset).tolist()
        schedule = TimeMajorSchedule(1, layout.semantic_vocab, layout.semantic_offset)
        seq = self._sequence("semantic", window, prompt, window.num_new, schedule)
        return seq, self._started("semantic", window, condition)

    def _start_coarse(self, window: Window) -> tuple[Sequence, WindowStarted]:
        layout, state = self.layout, self.state
        condition = state.conditions[window.segment]
        first_semantic = window.prefix_start // self.family.frames_per_semantic
        last_semantic = -(-window.new_end // self.family.frames_per_semantic)
        prompt = layout.mt_tokens(condition)
        prompt += (state.semantic[first_semantic:last_semantic] + layout.semantic_offset).tolist()
        prefix = state.coarse[window.prefix_start : window.new_start]
        prompt += self._time_major(prefix, layout.coarse_offset)
        schedule = TimeMajorSchedule(layout.coarse_levels, layout.acoustic_codebook, layout.coarse_offset)
        seq = self._sequence("coarse", window, prompt, window.num_new * layout.coarse_levels, schedule)
        return seq, self._started("coarse", window, condition)

    def _start_fine(self, window: Window) -> tuple[Sequence, WindowStarted]:
        layout = self.layout
        prompt = self._time_major(self.state.coarse[window.new_start : window.new_end], 0)
        schedule = TimeMajorSchedule(layout.fine_levels, layout.acoustic_codebook, layout.fine_offset)
        seq = self._sequence("fine", window, prompt, window.num_new * layout.fine_levels, schedule)
        return seq, self._started("fine", window, [])

    def _time_major(self, codes: np.ndarray, offset: int) -> list[int]:
        levels = np.arange(codes.shape[1]) * self.layout.acoustic_codebook
        return (codes + levels + offset).reshape(-1).tolist()

    def _started(self, stage: str, window: Window, condition: list[int]) -> WindowStarted:
        return WindowStarted(
            stage, self.state.request.row, window.index, window.prefix_start, window.new_start, window.new_end,
            tuple(condition),
        )

    def schedule(self) -> tuple[list[tuple[str, Sequence]], list[Event]]:
        """Every window and chunk whose inputs exist."""
        state = self.state
        ready: list[tuple[str, Sequence]] = []
        events, self.prompt_events = self.prompt_events, []
        if state.active["semantic"] is None and state.next_semantic < len(state.semantic_plan):
            window = state.semantic_plan[state.next_semantic]
            seq, event = self._start_semantic(window)
            state.active["semantic"] = (seq, window)
            state.next_semantic += 1
            ready.append(("semantic", seq))
            events.append(event)
        if state.active["coarse"] is None and state.next_coarse < len(state.coarse_plan):
            window = state.coarse_plan[state.next_coarse]
            needed = -(-window.new_end // self.family.frames_per_semantic)
            if state.semantic_done >= needed and state.coarse_done >= window.new_start:
                seq, event = self._start_coarse(window)
                state.active["coarse"] = (seq, window)
                state.next_coarse += 1
                ready.append(("coarse", seq))
                events.append(event)
        for window in state.fine_plan:
            if window.index not in state.fine_started and state.coarse_done >= window.new_end:
                seq, event = self._start_fine(window)
                state.fine_active[seq] = window
                state.fine_started.add(window.index)
                ready.append(("fine", seq))
                events.append(event)
        return ready, events

    def collect(self, finished: Mapping[str, list[Sequence]], stepped: list[str]) -> list[Event]:
        """Copies generated tokens into the row state; reports finished windows, progress and decoded audio."""
        events = self._collect(finished)
        events += [StageProgress(stage, self._progress(stage), self.totals[stage]) for stage in stepped]
        events += self._decode_audio()
        return events

    def _collect(self, finished: Mapping[str, list[Sequence]]) -> list[Event]:
        events: list[Event] = []
        state, layout = self.state, self.layout
        cb = layout.acoustic_codebook
        row = state.request.row
        active = state.active["semantic"]
        if active is not None:
            seq, window = active
            new = seq.output_array()
            state.semantic[window.new_start : window.new_start + len(new)] = new
            state.semantic_done = window.new_start + len(new)
            if seq in finished.get("semantic", ()):
                state.active["semantic"] = None
                events.append(WindowFinished("semantic", row, window.index, tuple(new.tolist())))
        active = state.active["coarse"]
        if active is not None:
            seq, window = active
            drawn = seq.output_array()
            frames = len(drawn) // layout.coarse_levels
            new = drawn[: frames * layout.coarse_levels].reshape(frames, layout.coarse_levels) % cb
            state.coarse[window.new_start : window.new_start + frames] = new
            state.coarse_done = window.new_start + frames
            if seq in finished.get("coarse", ()):
                state.active["coarse"] = None
                events.append(WindowFinished("coarse", row, window.index, tuple(drawn.tolist())))
        for seq in finished.get("fine", ()):
            window = state.fine_active.pop(seq)
            drawn = seq.output_array()
            state.fine[window.new_start : window.new_end] = drawn.reshape(window.num_new, -1) % cb
            state.fine_filled += len(drawn)
            state.fine_finished.add(window.index)
            events.append(WindowFinished("fine", row, window.index, tuple(drawn.tolist())))
        return events

    @torch.inference_mode()
    def _decode_audio(self) -> list[AudioChunk]:
        state, family = self.state, self.family
        chunks = []
        while state.next_audio in state.fine_finished:
            window = state.fine_plan[state.next_audio]
            frames = slice(window.new_start, window.new_end)
            codes = np.concatenate([state.coarse[frames], state.fine[frames]], axis=1).T.copy()  # [levels, frames]
            codes_t = torch.from_numpy(codes).unsqueeze(0).to(family.pack.codec.codebooks.device)
            if state.audio is None:
                state.audio = family.codec.stream()
            pcm = state.audio.push(codes_t)[0].float().cpu().numpy()
            chunks.append(AudioChunk(state.request.row, window.index, window.new_start * family.hop, pcm, codes))
            state.next_audio += 1
        return chunks

    def _progress(self, stage: str) -> int:
        """Tokens of a stage drawn so far (the stages fill their arrays front to back, whole frames at a time)."""
        state = self.state
        if stage == "fine":
            return sum(seq.num_new for seq in state.fine_active) + state.fine_filled
        if stage == "semantic":
            return state.semantic_done
        return state.coarse_done * self.layout.coarse_levels
