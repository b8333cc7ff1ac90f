"""A transformers MusicgenForConditionalGeneration or MusicgenMelodyForConditionalGeneration checkpoint -> a vivace
MusicGen pack (`vivace convert musicgen`).

The source is a directory as save_pretrained writes it: config.json, model.safetensors or pytorch_model.bin (either
may be sharded with an index), generation_config.json and the tokenizer files (and, for MusicGen-Melody, the feature
extractor's preprocessor_config.json; facebook/musicgen-melody's settings when it is absent). Every tensor is checked
by name, shape and finiteness and the first bad one is named; the output is written to a temporary folder and renamed
at the end, so a failed conversion leaves nothing behind.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from vivace.core.sampling import SamplingParams, is_finite, is_real
from vivace.errors import PackError, VivaceError
from vivace.export.encodec import _take, config_from_transformers, decoder_tensors, encoder_tensors
from vivace.export.pack_output import check_output, source_config, write_pack
from vivace.families.musicgen.chroma import ChromaConfig
from vivace.families.musicgen.config import MelodyConfig, MusicGenConfig, MusicGenPackConfig
from vivace.families.musicgen.pack import (
    save_musicgen_pack,
    validate_musicgen_config,
)
from vivace.kernels.sinusoid import sinusoidal_embedding
from vivace.model.config import TransformerConfig
from vivace.model.transformer import StageTransformer
from vivace.packs.manifest import stored_stage
from vivace.packs.schema import read_json_object

DECODER_PREFIX = "decoder.model.decoder."
_LAYER_PARTS = {  # vivace module inside layers.{i} -> transformers module inside decoder.model.decoder.layers.{i}
    "attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj", "attn.v_proj": "self_attn.v_proj",
    "attn.o_proj": "self_attn.out_proj", "attn_norm": "self_attn_layer_norm",
    "cross_attn.q_proj": "encoder_attn.q_proj", "cross_attn.k_proj": "encoder_attn.k_proj",
    "cross_attn.v_proj": "encoder_attn.v_proj", "cross_attn.o_proj": "encoder_attn.out_proj",
    "cross_norm": "encoder_attn_layer_norm", "ffn.fc1": "fc1", "ffn.fc2": "fc2", "ffn_norm": "final_layer_norm",
}
_POSITIONS = DECODER_PREFIX + "embed_positions.weights"  # written by older transformers; recomputed, but checked
_POSITION_TOLERANCE = 1e-4


def resolve_source(src: str | Path) -> Path:
    """A local directory, or a hub id fetched with huggingface_hub (needs the network)."""
    path = Path(src)
    if path.is_dir():
        return path
    if path.exists() or str(src).count("/") != 1:
        raise VivaceError(f"{src}: not a transformers model directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(src)))
    except Exception as exc:  # noqa: BLE001 - any hub failure is reported as one line
        raise VivaceError(f"{src}: not a local directory, and fetching it from the hub failed ({exc})") from None


def _load_weight_file(file: Path) -> dict[str, torch.Tensor]:
    try:
        if file.suffix == ".safetensors":
            return load_file(file)
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, pickle.UnpicklingError) as exc:
        raise PackError(f"{file}: unreadable ({exc})") from None
    if not isinstance(state, dict):
        raise PackError(f"{file}: expected a state dict, got {type(state).__name__}")
    return state


def read_checkpoint(src: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """(the file named in errors, every tensor): a single file or the shards listed by an index."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (src / name).is_file():
            return src / name, _load_weight_file(src / name)
        index = src / f"{name}.index.json"
        if index.is_file():
            weight_map = read_json_object(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise PackError(f"{index}: no weight_map")
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                if not (src / shard).is_file():
                    raise PackError(f"{index}: shard {shard!r} is missing")
                state.update(_load_weight_file(src / shard))
            return index, state
    raise PackError(f"{src}: no model.safetensors or pytorch_model.bin (nor a sharded index)")


def _is_melody(config: dict[str, Any], manifest: Path) -> bool:
    kind = config.get("model_type")
    if kind in ("musicgen", "musicgen_melody"):
        return kind == "musicgen_melody"
    raise PackError(
        f"{manifest}: unknown architecture (model_type {kind!r}, architectures {config.get('architectures')!r}); "
        "vivace converts transformers MusicgenForConditionalGeneration and MusicgenMelodyForConditionalGeneration "
        "checkpoints (model_type 'musicgen' or 'musicgen_melody')"
    )


def _special_ids(src: Path, decoder: Any, manifest: Path) -> None:
    """MusicGen's pad and decoder-start (BOS) ids must both be the extra embedding row, codebook_size."""
    generation = read_json_object(src / "generation_config.json") if (src / "generation_config.json").is_file() else {}
    start = generation.get("decoder_start_token_id", getattr(decoder, "decoder_start_token_id", None))
    start = decoder.bos_token_id if start is None else start
    pad = generation.get("pad_token_id", decoder.pad_token_id)
    for name, value in (("decoder_start_token_id", start), ("pad_token_id", pad)):
        if value != decoder.vocab_size:
            raise PackError(f"{manifest}: {name} is {value!r}; MusicGen's delay pattern needs it to be vocab_size {decoder.vocab_size}")


def generation_defaults(src: Path) -> tuple[float, SamplingParams]:
    """The pack's default guidance scale and sampling from generation_config.json, as transformers' generate reads
    them: do_sample false means greedy (temperature 0), a guidance_scale of 1 or less means none. A key the file does
    not set (or a missing file) keeps audiocraft's default: guidance 3.0, temperature 1.0, top-k 250, top-p 1.0."""
    file = src / "generation_config.json"
    data = read_json_object(file) if file.is_file() else {}
    defaults = MusicGenConfig(text_hidden=0, projection=False)
    guidance = data.get("guidance_scale", defaults.guidance_scale)
    if guidance is None or (is_real(guidance) and guidance <= 1):
        guidance = 1.0
    if not is_real(guidance) or not is_finite(guidance):
        raise PackError(f"{file}: guidance_scale must be a number, got {guidance!r}")
    base = defaults.sampling
    values = {key: data.get(key, getattr(base, key)) for key in ("temperature", "top_k", "top_p")}
    values = {key: getattr(base, key) if value is None else value for key, value in values.items()}
    if data.get("do_sample") is False:
        values["temperature"] = 0.0
    sampling = SamplingParams(**values)
    try:
        sampling.validate()
    except VivaceError as exc:
        raise PackError(f"{file}: {exc}") from None
    return float(guidance), sampling.plain()


TOKENIZER_FILES = ("tokenizer.json", "spiece.model")  # a fast tokenizer's, or T5's sentencepiece model


def load_tokenizer(src: Path, text_vocab_size: int) -> Any:
    """The checkpoint's tokenizer, refused in one line when its files are missing or broken: without them
    AutoTokenizer may build one that maps every prompt to unknown tokens, and every prompt would condition alike."""
    from transformers import AutoTokenizer

    missing = [name for name in ("tokenizer_config.json",) if not (src / name).is_file()]
    if not any((src / name).is_file() for name in TOKENIZER_FILES):
        missing.append(" or ".join(TOKENIZER_FILES))
    if missing:
        raise PackError(f"{src}: missing tokenizer files: {', '.join(missing)} (save the tokenizer with the checkpoint)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises TypeError, ValueError, OSError ... on broken files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PackError(f"{src}: the tokenizer does not load ({type(exc).__name__}: {first})") from None
    if len(tokenizer) > text_vocab_size:
        raise PackError(f"{src}: the tokenizer has {len(tokenizer)} tokens, the text encoder's vocabulary {text_vocab_size}")
    return tokenizer


def decoder_config(decoder: Any, manifest: Path, melody: bool = False) -> TransformerConfig:
    """The decoder as a vivace stage. MusicGen's cross-attention reads d_model-wide states (projected when the text
    differs); MusicGen-Melody's decoder has no cross-attention (its condition is a prefix of input embeddings)."""
    if decoder.audio_channels != 1:
        name = "MusicGen-Melody" if melody else "MusicGen"
        raise PackError(f"{manifest}: stereo {name} (audio_channels {decoder.audio_channels}) is not supported")
    if decoder.activation_function != "gelu":
        raise PackError(f"{manifest}: decoder activation {decoder.activation_function!r} is not supported (only 'gelu')")
    return TransformerConfig(
        num_layers=decoder.num_hidden_layers, d_model=decoder.hidden_size, num_heads=decoder.num_attention_heads,
        d_ff=decoder.ffn_dim, vocab_size=decoder.vocab_size + 1, output_vocab_size=decoder.vocab_size,
        num_codebooks=decoder.num_codebooks, num_output_heads=decoder.num_codebooks, position="sinusoidal",
        norm="layernorm", norm_eps=1e-5, activation="gelu", attn_bias=False, ffn_bias=False, final_norm=True,
        cross_attention=not melody, cross_dim=0 if melody else decoder.hidden_size,
    )


def _decoder_source(name: str) -> str:
    """transformers' name of one stored vivace decoder tensor."""
    module, leaf = name.rsplit(".", 1)
    kind, _, rest = module.partition(".")
    if kind == "embed":
        return f"{DECODER_PREFIX}embed_tokens.{rest}.{leaf}"
    if kind == "heads":
        return f"decoder.lm_heads.{rest}.{leaf}"
    if kind == "final_norm":
        return f"{DECODER_PREFIX}layer_norm.{leaf}"
    index, _, part = rest.partition(".")
    return f"{DECODER_PREFIX}layers.{index}.{_LAYER_PARTS[part]}.{leaf}"


def decoder_tensors_from(config: TransformerConfig, state: dict[str, torch.Tensor], file: Path) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in stored_stage(StageTransformer(config)).items()}
    stored = {name: _take(file, state, [_decoder_source(name)], shape)[1].float().contiguous() for name, shape in expected.items()}
    used = {_decoder_source(name) for name in expected} | {_POSITIONS}
    for key in state:
        if key.startswith("decoder.") and key not in used:
            raise PackError(f"{file}: unexpected tensor {key!r} (config.json does not describe these weights)")
    if _POSITIONS in state:
        table = state[_POSITIONS]
        ours = sinusoidal_embedding(torch.arange(table.shape[0]), config.d_model)
        if table.shape != ours.shape or not bool(((table.float() - ours).abs() <= _POSITION_TOLERANCE).all()):
            raise PackError(f"{file}: tensor {_POSITIONS!r} is not MusicGen's sinusoidal table")
    return stored


def text_encoder_from(text_config: Any, state: dict[str, torch.Tensor], file: Path) -> Any:
    """The transformers text encoder with the checkpoint's "text_encoder." tensors; tied copies may be stored once."""
    from transformers import AutoModelForTextEncoding

    model = AutoModelForTextEncoding.from_config(text_config).eval()
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    alias_of = {name: names for names in aliases.values() for name in names}
    loaded: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for name, tensor in model.state_dict().items():
        candidates = [f"text_encoder.{alias}" for alias in [name] + [a for a in alias_of.get(name, []) if a != name]]
        _, value = _take(file, state, candidates, tuple(tensor.shape))
        loaded[name] = value.float()
        used.update(c for c in candidates if c in state)
    for key in state:
        if key.startswith("text_encoder.") and key not in used:
            raise PackError(f"{file}: unexpected tensor {key!r} (config.json does not describe these weights)")
    model.load_state_dict(loaded, strict=True)
    return model


def projection_from(
    state: dict[str, torch.Tensor], file: Path, name: str, in_features: int, d_model: int, present: bool,
) -> dict[str, torch.Tensor] | None:
    """The nn.Linear `name` (enc_to_dec_proj, audio_enc_to_dec_proj), which transformers creates only when its input
    width differs from d_model."""
    if not present:
        stray = next((key for key in state if key.startswith(f"{name}.")), None)
        if stray is not None:
            raise PackError(f"{file}: unexpected tensor {stray!r} (its input is already d_model {d_model} wide)")
        return None
    shapes = {"weight": (d_model, in_features), "bias": (d_model,)}
    return {leaf: _take(file, state, [f"{name}.{leaf}"], shape)[1].float().contiguous() for leaf, shape in shapes.items()}


def melody_config(src: Path, config: Any, d_model: int, manifest: Path) -> MelodyConfig:
    """The chroma prefix's settings: config.json's num_chroma / chroma_length and the feature extractor's
    preprocessor_config.json (facebook/musicgen-melody's settings when the file is absent)."""
    file = src / "preprocessor_config.json"
    extractor = read_json_object(file) if file.is_file() else {}
    defaults = ChromaConfig()
    rate = extractor.get("sampling_rate", defaults.sample_rate)
    chunk = extractor.get("chunk_length", defaults.max_samples // defaults.sample_rate)
    chroma = ChromaConfig(
        sample_rate=rate, n_fft=extractor.get("n_fft", defaults.n_fft), hop_length=extractor.get("hop_length", defaults.hop_length),
        num_chroma=extractor.get("num_chroma", config.num_chroma),
        max_samples=chunk * rate if isinstance(chunk, int) and isinstance(rate, int) else chunk,
    )
    if chroma.num_chroma != config.num_chroma:
        raise PackError(f"{file}: num_chroma {chroma.num_chroma} differs from {manifest.name}'s {config.num_chroma}")
    return MelodyConfig(chroma_length=config.chroma_length, projection=config.num_chroma != d_model, chroma=chroma)


def convert_musicgen(
    src: str | Path, out: str | Path, name: str = "", window_s: float = 30.0, stride_s: float = 18.0,
) -> Path:
    """Converts a MusicGen or MusicGen-Melody checkpoint into a pack at out (which must not exist or be empty)."""
    from transformers import MusicgenConfig, MusicgenMelodyConfig

    source = resolve_source(src)
    out = check_output(out)
    manifest, raw = source_config(source)
    melody = _is_melody(raw, manifest)
    try:
        config = (MusicgenMelodyConfig if melody else MusicgenConfig).from_pretrained(source, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise PackError(f"{manifest}: not a valid {'MusicGen-Melody' if melody else 'MusicGen'} config ({exc})") from None
    decoder, text_hidden = config.decoder, config.text_encoder.hidden_size
    _special_ids(source, decoder, manifest)
    projection = text_hidden != decoder.hidden_size
    cross_hidden = getattr(decoder, "cross_attention_hidden_size", None)
    if projection and cross_hidden is not None:
        raise PackError(
            f"{manifest}: cross_attention_hidden_size {cross_hidden} with a text width "
            f"({text_hidden}) other than the decoder's ({decoder.hidden_size}): transformers cannot run this model either"
        )
    stage = decoder_config(decoder, manifest, melody)
    codec_config = config_from_transformers(raw.get("audio_encoder"), f"{manifest} (audio_encoder)")
    if codec_config.codebook_size < decoder.vocab_size or codec_config.num_levels < decoder.num_codebooks:
        raise PackError(
            f"{manifest}: the codec has {codec_config.num_levels} x {codec_config.codebook_size} codes, the decoder "
            f"predicts {decoder.num_codebooks} x {decoder.vocab_size}"
        )
    guidance_scale, sampling = generation_defaults(source)
    # audio prompts are encoded as transformers encodes them; a codec that normalizes its input would also rescale the
    # output by the prompt's loudness, which vivace does not do: such a pack takes no audio prompt
    with_encoder = not raw["audio_encoder"].get("normalize", False)
    pack_config = MusicGenPackConfig(
        decoder=stage,
        codec=codec_config,
        musicgen=MusicGenConfig(
            text_hidden=text_hidden, projection=projection, window_s=window_s, stride_s=stride_s,
            guidance_scale=guidance_scale, sampling=sampling, codec_encoder=with_encoder,
        ),
        name=name or source.name,
        melody=melody_config(source, config, decoder.hidden_size, manifest) if melody else None,
    )
    validate_musicgen_config(pack_config)
    tokenizer = load_tokenizer(source, config.text_encoder.vocab_size)
    file, state = read_checkpoint(source)
    known = ("decoder.", "text_encoder.", "audio_encoder.", "enc_to_dec_proj.") + (("audio_enc_to_dec_proj.",) if melody else ())
    stray = next((key for key in state if not key.startswith(known)), None)
    if stray is not None:
        raise PackError(f"{file}: unexpected tensor {stray!r}")
    decoder_stored = decoder_tensors_from(pack_config.decoder, state, file)
    codec_stored = decoder_tensors(codec_config, state, file, prefix="audio_encoder.")
    encoder_stored = encoder_tensors(codec_config, state, file, prefix="audio_encoder.") if with_encoder else None
    projection_stored = projection_from(state, file, "enc_to_dec_proj", text_hidden, decoder.hidden_size, projection)
    chroma_stored = None
    if pack_config.melody is not None:
        m = pack_config.melody
        chroma_stored = projection_from(state, file, "audio_enc_to_dec_proj", m.chroma.num_chroma, decoder.hidden_size, m.projection)
    text_encoder = text_encoder_from(config.text_encoder, state, file)
    return write_pack(out, lambda directory: save_musicgen_pack(
        directory, pack_config, decoder_stored, codec_stored, projection_stored, text_encoder, tokenizer, chroma_stored,
        encoder_stored,
    ))
