"""Small random transformers MusicGen and MusicGen-Melody checkpoints (config, weights, tokenizer, feature extractor)
for the MusicGen tests, and transformers' greedy generation as the reference; no download."""
from __future__ import annotations

import inspect
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from torchaudio_standin import melody_feature_extractor

WORDS = "a the slow fast piano drums jazz rock ambient pads with and in of bass guitar strings choir loud soft".split()


@dataclass(frozen=True)
class TinyMusicGen:
    codebook_size: int = 64
    num_codebooks: int = 4
    hidden: int = 48
    layers: int = 2
    heads: int = 4
    ffn: int = 96
    text_hidden: int = 32  # != hidden: enc_to_dec_proj
    cross_hidden: int | None = None  # transformers' cross_attention_hidden_size
    sampling_rate: int = 3200
    ratios: tuple[int, ...] = (4, 4)
    seed: int = 0
    melody: bool = False  # MusicgenMelodyForConditionalGeneration (cross_hidden does not apply)
    num_chroma: int = 12
    chroma_length: int = 20
    n_fft: int = 512  # the feature extractor's STFT
    hop_length: int = 128
    chunk_length: int = 2  # seconds of reference the feature extractor keeps
    decoder_vocab: int | None = None  # the decoder's vocabulary, when smaller than the codebook (transformers' tests)


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_input_names=["input_ids", "attention_mask"]
    )


def build_model(spec: TinyMusicGen):
    from transformers import (
        EncodecConfig, MusicgenConfig, MusicgenDecoderConfig, MusicgenForConditionalGeneration, MusicgenMelodyConfig,
        MusicgenMelodyDecoderConfig, MusicgenMelodyForConditionalGeneration, T5Config,
    )

    torch.manual_seed(spec.seed)
    hop = math.prod(spec.ratios)
    frame_rate = math.ceil(spec.sampling_rate / hop)
    bits = math.ceil(math.log2(spec.codebook_size))
    text = T5Config(
        vocab_size=len(WORDS) + 3, d_model=spec.text_hidden, d_kv=8, d_ff=2 * spec.text_hidden, num_layers=2,
        num_heads=spec.text_hidden // 8, relative_attention_num_buckets=8,
    )
    audio = EncodecConfig(
        codebook_size=spec.codebook_size, num_filters=4, upsampling_ratios=list(spec.ratios), sampling_rate=spec.sampling_rate,
        target_bandwidths=[(spec.num_codebooks * frame_rate * bits + 0.5) / 1000], use_causal_conv=False, hidden_size=16,
        codebook_dim=16, num_lstm_layers=1,
    )
    vocab = spec.decoder_vocab or spec.codebook_size
    pad = vocab
    decoder = dict(
        vocab_size=vocab, hidden_size=spec.hidden, num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
        ffn_dim=spec.ffn, num_codebooks=spec.num_codebooks, pad_token_id=pad, bos_token_id=pad, decoder_start_token_id=pad,
        max_position_embeddings=256,
    )
    if spec.melody:
        config = MusicgenMelodyConfig(  # sub-configs as dicts: what transformers 4.x and 5.x both take
            text_encoder=text.to_dict(), audio_encoder=audio.to_dict(), decoder=MusicgenMelodyDecoderConfig(**decoder).to_dict(),
            num_chroma=spec.num_chroma, chroma_length=spec.chroma_length,
        )
        model = MusicgenMelodyForConditionalGeneration(config).eval()
    else:
        decoder_config = MusicgenDecoderConfig(**decoder, cross_attention_hidden_size=spec.cross_hidden)
        config = MusicgenConfig(text_encoder=text.to_dict(), audio_encoder=audio.to_dict(), decoder=decoder_config.to_dict())
        model = MusicgenForConditionalGeneration(config).eval()
    with torch.no_grad():
        # unit-gain projections instead of the 0.02 init: the condition must visibly move the logits, and larger
        # logits keep greedy choices away from near-ties
        projections = [getattr(model, name) for name in ("enc_to_dec_proj", "audio_enc_to_dec_proj") if hasattr(model, name)]
        linears = [m for m in model.decoder.modules() if isinstance(m, torch.nn.Linear)]
        for linear in linears + projections:
            linear.weight.normal_(0, linear.in_features**-0.5)
        for head in model.decoder.lm_heads:
            head.weight.normal_(0, 0.5)
        for level in model.audio_encoder.quantizer.layers:  # transformers leaves the codebooks at zero
            level.codebook.embed.normal_()
    return model


def feature_extractor(spec: TinyMusicGen):
    return melody_feature_extractor(
        feature_size=spec.num_chroma, num_chroma=spec.num_chroma, sampling_rate=spec.sampling_rate, n_fft=spec.n_fft,
        hop_length=spec.hop_length, chunk_length=spec.chunk_length,
    )


def write_checkpoint(path: Path, spec: TinyMusicGen = TinyMusicGen()) -> Path:
    model = build_model(spec)
    model.save_pretrained(path)
    tokenizer().save_pretrained(path)
    if spec.melody:
        feature_extractor(spec).save_pretrained(path)
    return path


def converted(root: Path, spec: TinyMusicGen, **convert: float) -> Path:
    """root/pack, converted from a random checkpoint written to root/src (transformers' config warnings silenced)."""
    import warnings

    from vivace.export.musicgen import convert_musicgen

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src = write_checkpoint(root / "src", spec)
    return convert_musicgen(src, root / "pack", **convert)


def converted_32khz_pack(root: Path, seed: int, **convert: float) -> Path:
    """A pack converted from a random checkpoint with MusicGen's 32 kHz / 50 frames-per-second codec layout."""
    return converted(root, TinyMusicGen(sampling_rate=32000, ratios=(8, 5, 4, 4), seed=seed), **convert)


def copy_of(source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(source, tmp_path / "src"))


def edit_weights(src: Path, edit: Callable[[dict[str, torch.Tensor]], object], file: str = "model.safetensors") -> None:
    """Edits a safetensors file of a checkpoint (or, with file, of a pack) in place."""
    state = load_file(src / file)
    edit(state)
    save_file(state, str(src / file), metadata={"format": "pt"})


def edit_config(src: Path, edit: Callable[[dict], object], file: str = "config.json") -> None:
    data = json.loads((src / file).read_text())
    edit(data)
    (src / file).write_text(json.dumps(data))


def keep_condition_on_first_step(model) -> None:
    """transformers 4.57 (huggingface/transformers#45647, fixed by #48679): generate creates an empty cache before the
    first step, and MusicGen-Melody's prepare_inputs_for_generation reads "a cache exists" as "past the first step"
    and drops the text and melody conditioning from every step. Put it back on the step whose cache is still empty.
    Versions with the fix name the cache argument `cache` and are left alone."""
    prepare = model.prepare_inputs_for_generation
    if "past_key_values" not in inspect.signature(prepare).parameters:
        return

    def first_step_keeps_condition(*args, **kwargs):
        inputs = prepare(*args, **kwargs)
        cache, condition = kwargs.get("past_key_values"), kwargs.get("encoder_hidden_states")
        if cache is not None and condition is not None and cache.get_seq_length() == 0:
            inputs["encoder_hidden_states"] = condition
        return inputs

    model.prepare_inputs_for_generation = first_step_keeps_condition


def reference(src: Path, prompt: str | None, frames: int, **inputs) -> tuple[np.ndarray, np.ndarray]:
    """transformers' greedy guided codes [K, frames] (prompt frames included) and its decoded audio. inputs:
    decoder_input_ids (prompt codes [K, T]), input_values (an audio prompt [1, 1, samples]) or input_features (a
    melody checkpoint's chroma). prompt None: get_unconditional_inputs (its guidance scale 1)."""
    from transformers import AutoConfig, MusicgenForConditionalGeneration, MusicgenMelodyForConditionalGeneration

    melody = AutoConfig.from_pretrained(src).model_type == "musicgen_melody"
    model = (MusicgenMelodyForConditionalGeneration if melody else MusicgenForConditionalGeneration).from_pretrained(src).eval()
    if melody:
        keep_condition_on_first_step(model)
    captured = {}
    decode = model.audio_encoder.decode

    def spy(codes: torch.Tensor, *args, **kwargs):
        captured["codes"] = codes[0, 0].clone()
        return decode(codes, *args, **kwargs)

    model.audio_encoder.decode = spy
    hop = math.prod(model.config.audio_encoder.upsampling_ratios)
    given = inputs["decoder_input_ids"].shape[1] if "decoder_input_ids" in inputs else 0
    given += inputs["input_values"].shape[-1] // hop if "input_values" in inputs else 0
    k = model.decoder.num_codebooks
    condition = {"guidance_scale": 3.0, **tokenizer()([prompt], return_tensors="pt")} if prompt is not None else model.get_unconditional_inputs(1)
    with torch.no_grad():
        audio = model.generate(**condition, **inputs, do_sample=False, max_new_tokens=frames - given + k - 1)
    return captured["codes"].numpy(), audio[0, 0].numpy()


def guided_greedy(src: Path, prompt: str, negative_prompt: str, frames: int, scale: float = 3.0) -> np.ndarray:
    """Greedy guided codes [K, frames] of a MusicGen checkpoint whose null row reads negative_prompt instead of the
    zeroed text: transformers' own steps (its forward on the cond / null pair, the delay pattern mask, its guidance
    mix of the logits), one full forward per step. transformers' generate builds the null row itself, so it has no
    negative prompt; with the zeroed text for the null row this loop gives generate's codes (tested)."""
    from transformers import MusicgenForConditionalGeneration

    model = MusicgenForConditionalGeneration.from_pretrained(src).eval()
    k, pad = model.decoder.num_codebooks, model.decoder.config.pad_token_id
    rows = []
    with torch.no_grad():
        for text in (prompt, negative_prompt):
            batch = tokenizer()([text], return_tensors="pt") if text else None
            if batch is None:  # the zeroed, masked-out text of transformers' null row
                rows.append((torch.zeros(1, 1, model.config.text_encoder.hidden_size), torch.zeros(1, 1, dtype=torch.long)))
            else:
                rows.append((model.text_encoder(**batch).last_hidden_state, batch["attention_mask"]))
    length = max(states.shape[1] for states, _ in rows)
    states = torch.cat([torch.nn.functional.pad(s, (0, 0, 0, length - s.shape[1])) for s, _ in rows])
    mask = torch.cat([torch.nn.functional.pad(m, (0, length - m.shape[1])) for _, m in rows])
    ids, pattern = model.decoder.build_delay_pattern_mask(torch.full((k, 1), pad), pad, frames + k)
    with torch.no_grad():
        for _ in range(frames + k - 1):
            logits = model(encoder_outputs=(states,), attention_mask=mask, decoder_input_ids=ids.repeat(2, 1)).logits[:, -1]
            cond, null = logits.float().split(k)
            drawn = (null + (cond - null) * scale).argmax(-1)
            ids = model.decoder.apply_delay_pattern_mask(torch.cat([ids, drawn[:, None]], dim=1), pattern)
    return ids[ids != pad].reshape(k, -1).numpy()


def vivace_codes(events: list, num_codebooks: int) -> np.ndarray:
    from vivace import WindowFinished

    windows = [e for e in events if isinstance(e, WindowFinished)]
    return np.concatenate([np.asarray(w.tokens).reshape(-1, num_codebooks).T for w in windows], axis=1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: a second intra-op thread only adds barrier waits, which cost seconds per call when
    the machine's cores are shared with other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
