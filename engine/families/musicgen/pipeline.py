"""The MusicGen family: one decoder over delay-interleaved EnCodec codebooks, with classifier-free guidance.

`MusicGen` is the family an engine holds for a MusicGen pack; each admitted request runs as one `MusicGenPipeline`,
a state machine over its continuation windows and its audio.

Per request row the prompt is encoded once (text encoder -> projection -> cross-attention keys/values of every
layer) and kept for the whole generation. With guidance (scale > 1) the row runs as a conditional sequence and
a null-condition twin in the same batch and KV pool; their logits mix as null + (cond - null) * scale and one
token per codebook is drawn for the pair, as transformers' generate does.

MusicGen-Melody (vivace.families.musicgen.melody) is conditioned by a prefix of input embeddings instead of cross-attention:
the chroma of a reference audio and the text states, in front of the codes; the null twin reads the null chroma
and zeroed text states. The prefix occupies the first positions and cache slots of every window's sequence.

Delay pattern: codebook k is shifted right by k steps behind a BOS column, so a window of T frames is T + K - 1
steps; positions before codebook k starts and after it ends hold the pad/BOS id and are forced, whatever the
heads draw (transformers' build_delay_pattern_mask / apply_delay_pattern_mask).

Longer than one window (the model's trained context, window_s = 30 s): windowed continuation as in audiocraft.
The first window generates window_s; every later one is a fresh sequence (positions from 0) whose prompt is the
last window_s - stride_s of audio so far (12 s with the default 18 s stride), and generates up to stride_s more.
By default a request's audio is decoded once all of its frames exist: the 32 kHz EnCodec decoder is not causal, so
a whole decode is what transformers' decode returns. With chunk_frames set (Engine.stream), the audio comes in
chunks as soon as each chunk's frames and `context_frames` after it are drawn, each decoded with up to
`context_frames` on either side (vivace.codecs.context_decoder; its error bound applies).
"""
from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vivace._C import delay_pattern, undelay_pattern
from vivace.arguments import (
    SAMPLING_KEYS,
    Story,
    check_duration,
    check_guidance_scale,
    check_prompt,
    is_story_list,
    negative_prompts,
    per_row,
    seeds,
    stage_sampling,
    unknown_arguments,
)
from vivace.codecs.backend import CodecBackend
from vivace.codecs.context_decoder import ContextDecoder
from vivace.codecs.encodec_encoder import encode_audio
from vivace.core.family import RequestContext, StageSpec
from vivace.core.sampling import SamplingParams, is_finite, is_real
from vivace.core.sequence import CrossCondition, DelaySchedule, Sequence
from vivace.core.windows import Window, plan_windows
from vivace.errors import VivaceError
from vivace.events import AudioChunk, Event, StageProgress, WindowFinished, WindowStarted
from vivace.families.musicgen.melody import MelodyPrefixes, load_melody
from vivace.families.musicgen.pack import MusicGenPack, load_musicgen_codec, load_musicgen_pack
from vivace.kernels.sampling import stream_id
from vivace.packs.schema import to_dict

STAGE = "decoder"
CONTEXT_FRAMES = 16  # overlap on each side of a streamed chunk (0.32 s at 50 frames/s)
STREAM_CHUNK_S = 1.0  # Engine.stream's default chunk
PREFIX_TEXT_TOKENS = 64  # text tokens of a melody prefix the decoder's pool is sized for (longer prompts still fit
# while the pool has room)


@dataclass(frozen=True)
class MusicGenRequest:
    row: int
    prompt: str | None  # None: unconditional (the null condition, no guidance)
    duration_s: float
    seed: int
    sampling: SamplingParams
    guidance_scale: float  # > 1: classifier-free guidance; 1: the conditional logits alone
    melody: torch.Tensor | None = field(default=None, compare=False)  # melody packs: mono, at the chroma extractor's rate
    chunk_frames: int | None = None  # stream the audio in chunks of this many frames (None: one whole decode)
    prompt_codes: np.ndarray | None = field(default=None, compare=False)  # an audio prompt's codes [K, frames]
    negative_prompt: str | None = None  # guidance's null row reads this text instead of the null text


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



class MusicGen:
    """The MusicGen family of an engine: its decoder stage, its requests' validation, and a pipeline per request."""

    load_pack = staticmethod(load_musicgen_pack)
    load_codec = staticmethod(load_musicgen_codec)
    # on the CPU, onnxruntime decodes EnCodec faster than torch (measured in docs/codec_backends.md)
    cpu_codec_backend = "onnxruntime"

    def __init__(self, pack: MusicGenPack, codec: CodecBackend) -> None:
        self.pack = pack
        self.codec = codec
        # streamed chunks: CONTEXT_FRAMES of overlap on each side (EnCodec decodes whole; the overlap's error bound
        # is in docs/codec_backends.md)
        self.chunk_decoder = ContextDecoder(codec.decode, codec.hop_length, CONTEXT_FRAMES, CONTEXT_FRAMES)
        self.config = pack.config
        self.device = next(pack.decoder.parameters()).device
        self.melody = MelodyPrefixes(pack) if pack.config.melody is not None else None

    def max_sequence_tokens(self, prefix: int = 0) -> int:
        """Positions of the longest window: a melody prefix, its frames, the delay pattern's K - 1 steps and the BOS
        column."""
        return prefix + self.config.frames(self.config.musicgen.window_s) + self.config.num_codebooks

    def prefix_tokens(self, prompt: str) -> int:
        """Positions a melody pack's prefix takes for this prompt (chroma_length + its text tokens); 0 otherwise."""
        melody = self.config.melody
        return 0 if melody is None else melody.chroma_length + self.pack.text.num_tokens(prompt)

    def stages(self) -> dict[str, StageSpec]:
        melody = self.config.melody
        prefix = 0 if melody is None else melody.chroma_length + PREFIX_TEXT_TOKENS
        return {STAGE: StageSpec(self.pack.decoder, self.max_sequence_tokens(prefix), rows_per_sequence=2)}

    def plan(self, frames: int, prompt_frames: int = 0) -> list[Window]:
        """audiocraft's continuation: a full first window, then stride-sized steps, each with a fixed-length prompt.
        An audio prompt of prompt_frames (shorter than one window) is the first window's prompt."""
        m = self.config.musicgen
        window, stride = self.config.frames(m.window_s), self.config.frames(m.stride_s)
        keep = window - stride
        windows = [
            Window(w.index, max(w.prefix_start, w.new_start - keep), w.new_start, w.new_end, 0)
            for w in plan_windows(frames, window, stride, [0])
        ]
        first = windows[0]
        windows[0] = Window(first.index, first.prefix_start, prompt_frames, first.new_end, first.segment)
        return windows

    # -- a call's arguments ------------------------------------------------------------------------------------
    def stream_options(self, options: dict[str, Any]) -> dict[str, Any]:
        return {"chunk_s": STREAM_CHUNK_S, **options}

    def whole_options(self, options: dict[str, Any]) -> dict[str, Any]:
        if options.get("chunk_s") is not None:
            raise VivaceError(
                f"chunk_s {options['chunk_s']!r} is for stream() and events(): generate() decodes each clip whole"
            )
        return {**options, "chunk_s": None}

    def _chunk_frames(self, chunk_s: Any) -> int | None:
        if chunk_s is None:
            return None
        if not is_real(chunk_s) or not is_finite(chunk_s) or chunk_s <= 0:
            raise VivaceError(f"chunk_s must be a positive number of seconds, got {chunk_s!r}")
        return max(1, round(chunk_s * self.config.frame_rate))

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
        return per_row(melody, rows, "melodies", lambda item: load_melody(item, sample_rate, melody_config.chroma))

    def _audio_prompts(self, audio: Any, sample_rate: Any, rows: int, frames: int) -> list[np.ndarray | None]:
        """Each row's audio prompt as codes [num_codebooks, prompt frames] (None: none); a single prompt serves every
        row, a list gives each row its own. A prompt must be shorter than the clip and than one window."""
        if audio is None:
            if sample_rate is not None:
                raise VivaceError("audio_prompt_sample_rate was given without an audio_prompt")
            return [None] * rows
        window = self.config.frames(self.config.musicgen.window_s)
        vocabulary = self.config.decoder.output_vocab_size

        def codes(item: Any) -> np.ndarray:
            encoded = self.encode(item, sample_rate, "audio_prompt")
            if int(encoded.max()) >= vocabulary:
                raise VivaceError(
                    f"audio_prompt encodes to code {int(encoded.max())}, past the {vocabulary} codes this pack's decoder "
                    f"reads (its codec has {self.config.codec.codebook_size}): the decoder cannot continue it"
                )
            seconds = encoded.shape[1] / self.config.frame_rate
            if encoded.shape[1] >= min(frames, window):
                limit = "the duration (the whole clip, the prompt included)" if frames <= window else "one window (window_s)"
                raise VivaceError(
                    f"audio_prompt of {seconds:g} s must be shorter than {limit}: "
                    f"{min(frames, window) / self.config.frame_rate:g} s"
                )
            return encoded

        return per_row(audio, rows, "audio prompts", codes)

    def encode(self, audio: Any, sample_rate: Any = None, what: str = "audio") -> np.ndarray:
        """Audio (a sound file, or PCM [samples] / [channels, samples] at sample_rate) -> the codes transformers'
        EnCodec encode gives, int64 [num_codebooks, ceil(samples / hop)] (vivace.codecs.encodec_encoder.encode_audio)."""
        encoder = self.pack.codec_encoder
        if encoder is None:
            raise VivaceError(
                f"pack {self.config.name!r} carries no EnCodec encoder (musicgen.codec_encoder is false: it was converted "
                "before packs carried one, or its codec normalizes its input): it cannot encode audio"
            )
        return encode_audio(encoder, self.pack.codec.codebooks, audio, sample_rate, what)

    def requests(self, prompt: Any, duration_s: Any, seed: Any, options: dict[str, Any]) -> list[MusicGenRequest]:
        """Validates a call's arguments and turns them into one request per row. prompt: a string, or a list of them
        (a batch); None (or a None row) generates unconditionally, from the null condition without guidance, as
        transformers' get_unconditional_inputs does; stories are MusicLM's. options: guidance_scale, temperature,
        top_k, top_p, chunk_s (streamed chunks; None: one whole decode), stage_sampling ({"decoder": {key: value} or
        SamplingParams}: the one stage's sampling, over temperature / top_k / top_p, as MusicLM's per-stage entries
        are), melody, melody_sample_rate for melody packs, and audio_prompt, audio_prompt_sample_rate (a sound file or
        PCM per row or for all: the clip continues it, and begins with it, re-decoded from its codes, as transformers'
        generate(input_values=...) does; duration_s is the whole clip's, the prompt included). The clip's length
        rounds to whole codec frames; an audio prompt's to ceil(samples / hop) frames."""
        m = self.config.musicgen
        options = dict(options)
        guidance_scale = options.pop("guidance_scale", None)
        melody, melody_rate = options.pop("melody", None), options.pop("melody_sample_rate", None)
        audio_prompt, audio_prompt_rate = options.pop("audio_prompt", None), options.pop("audio_prompt_sample_rate", None)
        negative_prompt = options.pop("negative_prompt", None)
        per_stage = options.pop("stage_sampling", None)
        chunk_frames = self._chunk_frames(options.pop("chunk_s", None))
        if isinstance(prompt, Story) or is_story_list(prompt) or (
            isinstance(prompt, (list, tuple)) and any(isinstance(p, Story) or is_story_list(p) for p in prompt)
        ):
            raise VivaceError("story mode (segments with their own prompts) is not supported by MusicGen packs")
        rows = [prompt] if prompt is None or isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else []
        if not rows:
            raise VivaceError(f"prompt must be a non-empty string, None (unconditional) or a list of them, got {prompt!r}")
        if duration_s is None:
            raise VivaceError("duration_s is required")
        duration = check_duration(duration_s, "duration", m.max_duration_s, self.config.frame_rate)
        scale = check_guidance_scale(guidance_scale, m.guidance_scale)
        melody_keys = ("melody", "melody_sample_rate") if self.config.melody else ()
        expected = (
            "guidance_scale", *SAMPLING_KEYS, "stage_sampling", "chunk_s", *melody_keys,
            "audio_prompt", "audio_prompt_sample_rate", "negative_prompt",
        )
        unknown_arguments(options, expected)
        params = stage_sampling({STAGE: m.sampling}, options, per_stage)[STAGE]
        row_seeds = seeds(seed, len(rows))
        texts = [None if text is None else check_prompt(text) for text in rows]
        melodies = self._melodies(melody, melody_rate, len(rows))
        # a row with neither text nor a melody has no condition: guidance would mix the null condition with itself
        unconditional = [text is None and melodies[row] is None for row, text in enumerate(texts)]
        if all(unconditional) and guidance_scale is not None and scale > 1:
            raise VivaceError(f"guidance_scale {guidance_scale!r} has nothing to guide: prompt None is unconditional")
        negatives = negative_prompts(negative_prompt, len(rows), [1.0 if u else scale for u in unconditional])
        prompt_codes = self._audio_prompts(audio_prompt, audio_prompt_rate, len(rows), self.config.frames(duration))
        return [
            MusicGenRequest(
                row, text, duration, row_seeds[row], params, 1.0 if unconditional[row] else scale, melodies[row],
                chunk_frames, prompt_codes[row], negatives[row],
            )
            for row, text in enumerate(texts)
        ]

    def start(self, request: MusicGenRequest, context: RequestContext) -> MusicGenPipeline:
        return MusicGenPipeline(self, request, context)

    def info(self) -> dict[str, Any]:
        c, d, m = self.config, self.config.decoder, self.config.musicgen
        return {
            "decoder": {
                "layers": d.num_layers, "d_model": d.d_model, "heads": d.num_heads, "d_ff": d.d_ff,
                "codebooks": d.num_codebooks, "codebook_size": d.output_vocab_size,
                "params": sum(p.numel() for p in self.pack.decoder.parameters()),
            },
            "text": type(self.pack.text.encoder).__name__,
            **({"melody": to_dict(c.melody)} if c.melody is not None else {}),
            "guidance_scale": m.guidance_scale,
            "sampling": {"temperature": m.sampling.temperature, "top_k": m.sampling.top_k, "top_p": m.sampling.top_p},
            "window_s": m.window_s,
            "stride_s": m.stride_s,
            "max_duration_s": m.max_duration_s,
        }


class MusicGenPipeline:
    """One request's continuation windows through the decoder, and its audio (whole, or streamed in chunks)."""

    def __init__(self, family: MusicGen, request: MusicGenRequest, context: RequestContext) -> None:
        self.family = family
        self.config = family.config
        self.context = context
        self.state = self._row_state(request)

    @property
    def done(self) -> bool:
        return self.state.decoded

    @torch.inference_mode()
    def _cross(self, states: torch.Tensor, salt: Hashable, attend: bool) -> Condition:
        """Cross-attention keys/values of encoder states; masked out (attend False) for the null condition."""
        decoder = self.family.pack.decoder
        device = self.family.device
        states = states.to(device, next(decoder.parameters()).dtype)
        keys, values = decoder.encode_cross(states.unsqueeze(0))
        mask = torch.full((states.shape[0],), attend, dtype=torch.bool, device=device)
        return Condition(salt, cross=CrossCondition([k[0] for k in keys], [v[0] for v in values], mask))

    def _prefix(self, chroma: torch.Tensor, states: torch.Tensor, salt: Hashable) -> Condition:
        melody = self.family.melody
        assert melody is not None
        return Condition((*salt, melody.key(chroma)), prefix=melody.prefix(chroma, states))

    @staticmethod
    def _text_salt(request: MusicGenRequest, states: torch.Tensor) -> Hashable:
        """What the text part of a condition is: the prompt, or the null text of so many tokens."""
        return ("text", request.prompt) if request.prompt is not None else ("null", states.shape[0])

    def _row_state(self, request: MusicGenRequest) -> RowState:
        """The text is encoded once per request. The null condition is transformers': zeroed encoder states under an
        all-zero attention mask (MusicGen), the null chroma and zeroed text states (MusicGen-Melody). No text (prompt
        None) reads the null text condition, as long as the empty text's tokens (transformers' and audiocraft's)."""
        melody = self.family.melody
        frames = self.config.frames(request.duration_s)
        text = self.family.pack.text
        if request.prompt is None:
            states, ids = torch.zeros(text.num_tokens(""), self.config.decoder.d_model), []
        else:
            states, ids = text.encode(request.prompt)
        salt = self._text_salt(request, states)
        # guidance's null row: the null text (zeroed states, masked out of cross-attention), or a negative prompt's
        null_states, null_salt, null_attends = torch.zeros_like(states), ("null", states.shape[0]), False
        if request.negative_prompt is not None:
            null_states, _ = text.encode(request.negative_prompt)
            null_salt, null_attends = ("text", request.negative_prompt), True
        guided = request.guidance_scale > 1
        prompt_codes = request.prompt_codes
        prompt_frames = 0 if prompt_codes is None else prompt_codes.shape[1]
        plan = self.family.plan(frames, prompt_frames)
        condition: Condition | None
        if melody is None:
            condition = self._cross(states, salt, request.prompt is not None)
            null = self._cross(null_states, null_salt, null_attends) if guided else None
        else:
            null = self._prefix(melody.chroma(None, None), null_states, null_salt) if guided else None
            per_window = request.melody is not None and len(plan) > 1
            condition = None if per_window else self._prefix(melody.chroma(request.melody, None), states, salt)
        codes = np.full((self.config.num_codebooks, frames), -1, dtype=np.int64)
        if prompt_codes is not None:
            codes[:, :prompt_frames] = prompt_codes
        return RowState(
            request, plan, codes, tuple(ids), states, condition, null, done_frames=prompt_frames, ready_frames=prompt_frames,
        )

    def _condition(self, window: Window) -> Condition:
        state, melody = self.state, self.family.melody
        if state.condition is not None:
            return state.condition
        assert melody is not None
        chroma = melody.chroma(state.request.melody, window.prefix_start / self.config.frame_rate)
        return self._prefix(chroma, state.text_states, self._text_salt(state.request, state.text_states))

    def _sequence(self, window: Window) -> Sequence:
        state = self.state
        request = state.request
        prompt_frames = window.new_start - window.prefix_start
        codes = state.codes[:, window.prefix_start : window.new_end].copy()
        grid = delayed_grid(codes, self.config.pad_id)
        prompt = [tuple(int(i) for i in column) for column in grid[:, : prompt_frames + 1].T]
        schedule = DelaySchedule(grid, prompt_frames + 1, self.config.pad_id)

        def make(condition: Condition) -> Sequence:
            return Sequence(
                seq_id=self.context.next_seq_id(), prompt=prompt, max_new_tokens=grid.shape[1] - len(prompt),
                schedule=schedule, sampling=request.sampling, seed=request.seed, stream=stream_id(window.index),
                priority=(self.context.request_id, window.new_start), cross=condition.cross, cache_salt=condition.salt,
                prefix=condition.prefix,
            )

        seq = make(self._condition(window))
        if state.null is not None:
            seq.guide(make(state.null), request.guidance_scale)
        return seq

    def schedule(self) -> tuple[list[tuple[str, Sequence]], list[Event]]:
        state = self.state
        if state.active is not None or state.next_window >= len(state.plan):
            return [], []
        window = state.plan[state.next_window]
        seq = self._sequence(window)
        state.active = (seq, window)
        state.next_window += 1
        started = WindowStarted(
            STAGE, state.request.row, window.index, window.prefix_start, window.new_start, window.new_end, state.text_ids,
        )
        return [(STAGE, seq)], [started]

    def collect(self, finished: Mapping[str, list[Sequence]], stepped: list[str]) -> list[Event]:
        events = self._collect(finished.get(STAGE, []))
        if stepped:
            events.append(self._progress())
        events += self._decode() if self.state.request.chunk_frames is None else self._stream()
        return events

    def _collect(self, finished: list[Sequence]) -> list[Event]:
        """Copies a finished window's codes into the request; WindowFinished carries the new codes frame by frame."""
        state = self.state
        if state.active is None or state.active[0] not in finished:
            return []
        seq, window = state.active
        codes = undelayed(seq.token_array(seq.prefix_len).T)
        new = codes[:, window.new_start - window.prefix_start :]
        state.codes[:, window.new_start : window.new_end] = new
        state.done_frames = window.new_end
        state.active = None
        return [WindowFinished(STAGE, state.request.row, window.index, tuple(new.T.reshape(-1).tolist()))]

    @torch.inference_mode()
    def _decode(self) -> list[AudioChunk]:
        state = self.state
        if state.decoded or state.done_frames < state.codes.shape[1]:
            return []
        pcm = self.family.codec.decode(self._codes(0, state.codes.shape[1]))[0]
        state.decoded = True
        return [AudioChunk(state.request.row, 0, 0, pcm.float().cpu().numpy(), state.codes.copy())]

    def _codes(self, start: int, end: int) -> torch.Tensor:
        codes = torch.from_numpy(self.state.codes[:, start:end].copy()).unsqueeze(0)
        return codes.to(self.family.pack.codec.codebooks.device)

    def _track(self) -> None:
        """Copies the frames the active window completed since the last call: frame t of a window is complete once
        the delay pattern's last codebook has drawn it, K - 1 steps after the first."""
        state = self.state
        k = self.config.num_codebooks
        state.ready_frames = max(state.ready_frames, state.done_frames)
        if state.active is None:
            return
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
    def _stream(self) -> list[AudioChunk]:
        """Every chunk whose frames and right context exist, decoded with its context on both sides."""
        self._track()
        state = self.state
        chunk_frames = state.request.chunk_frames
        assert chunk_frames is not None
        chunks = []
        hop, decoder = self.config.codec.hop_length, self.family.chunk_decoder
        total = state.codes.shape[1]
        while state.emitted_frames < total:
            start = state.emitted_frames
            end = min(start + chunk_frames, total)
            low, high = decoder.span(start, end, total)
            if state.ready_frames < high:
                break
            pcm = decoder.decode_span(self._codes(low, high), low, start, end)[0].float().cpu().numpy()
            chunks.append(AudioChunk(state.request.row, state.next_chunk, start * hop, pcm, state.codes[:, start:end].copy()))
            state.emitted_frames, state.next_chunk = end, state.next_chunk + 1
        state.decoded = state.emitted_frames == total
        return chunks

    def _progress(self) -> StageProgress:
        """Steps drawn so far against all steps of all windows."""
        state = self.state
        k = self.config.num_codebooks
        total = sum(w.num_new + k - 1 for w in state.plan)
        done = sum(w.num_new + k - 1 for w in state.plan[: state.next_window])
        in_flight = state.active[0].max_len - state.active[0].length if state.active is not None else 0
        return StageProgress(STAGE, done - in_flight, total)
