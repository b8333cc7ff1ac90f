"""A transformers `EncodecModel` directory (config.json + model.safetensors or pytorch_model.bin, as
`save_pretrained` writes it) -> the vivace decoder's and encoder's tensors in stored form, or a codec pack of both.

Read: the decoder and encoder layers and each quantizer level's codebook `embed` (the codebooks' training buffers are
ignored). Weight norm may be stored either way transformers has written it: the legacy `conv.weight_g` /
`conv.weight_v`, or the parametrization's `conv.parametrizations.weight.original0/1`. `normalize` (per-chunk input
scales) only concerns encoding: generated codes are decoded with scale None, and a normalizing codec is not encoded.
"""
from __future__ import annotations

import math
import pickle
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from vivace.codecs.encodec import EncodecConfig, EncodecDecoder, encodec_stored_form
from vivace.codecs.encodec_encoder import EncodecEncoder
from vivace.errors import PackError
from vivace.export.pack_output import check_output, source_config, write_pack

_LEGACY = {"weight_g": "weight_g", "weight_v": "weight_v"}
_PARAMETRIZED = {"weight_g": "parametrizations.weight.original0", "weight_v": "parametrizations.weight.original1"}
_FIELDS = {  # vivace field -> transformers config key; a missing key takes transformers' default, which is ours
    "codebook_size": "codebook_size", "num_filters": "num_filters", "upsampling_ratios": "upsampling_ratios",
    "num_residual_layers": "num_residual_layers", "residual_kernel_size": "residual_kernel_size",
    "dilation_growth_rate": "dilation_growth_rate", "compress": "compress", "use_conv_shortcut": "use_conv_shortcut",
    "kernel_size": "kernel_size", "last_kernel_size": "last_kernel_size", "num_lstm_layers": "num_lstm_layers",
    "causal": "use_causal_conv", "pad_mode": "pad_mode", "norm_type": "norm_type", "trim_right_ratio": "trim_right_ratio",
    "audio_channels": "audio_channels", "sampling_rate": "sampling_rate",
}


def config_from_transformers(data: dict[str, Any], where: str = "config.json") -> EncodecConfig:
    """A transformers EncodecConfig (as its config.json dict) -> the decoder's EncodecConfig."""
    if not isinstance(data, dict) or data.get("model_type") != "encodec":
        kind = data.get("model_type") if isinstance(data, dict) else None
        raise PackError(f"{where}: model_type is {kind!r}, expected 'encodec' (a transformers EncodecModel)")
    if data.get("chunk_length_s") is not None:
        raise PackError(f"{where}: chunked EnCodec (chunk_length_s {data['chunk_length_s']}, overlap-add decode) is not supported")
    defaults = EncodecConfig()
    values: dict[str, Any] = {field: data.get(key, getattr(defaults, field)) for field, key in _FIELDS.items()}
    if isinstance(values["upsampling_ratios"], list):
        values["upsampling_ratios"] = tuple(values["upsampling_ratios"])
    hidden_size = data.get("hidden_size", defaults.codebook_dim)
    codebook_dim = data.get("codebook_dim") or hidden_size
    if codebook_dim != hidden_size:
        raise PackError(f"{where}: codebook_dim {codebook_dim} differs from hidden_size {hidden_size}; EnCodec's decoder reads the codebook sum")
    bandwidths = data.get("target_bandwidths", (1.5, 3.0, 6.0, 12.0, 24.0))
    if not isinstance(bandwidths, (list, tuple)) or not bandwidths or not all(isinstance(b, (int, float)) for b in bandwidths):
        raise PackError(f"{where}: target_bandwidths must be a non-empty list of numbers, got {bandwidths!r}")
    config = EncodecConfig(codebook_dim=codebook_dim, **values)
    config.validate()
    # transformers' num_quantizers: the levels that fit the largest bandwidth at ceil(frame rate), log2(size) bits each
    bits = math.ceil(math.log2(config.codebook_size))
    num_levels = int(1000 * bandwidths[-1] // (math.ceil(config.frame_rate) * bits))
    if num_levels <= 0:
        raise PackError(f"{where}: target_bandwidths {list(bandwidths)} leave no codebook level")
    return replace(config, num_levels=num_levels)


def _read_weights(src: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    file = src / "model.safetensors"
    if file.is_file():
        try:
            return file, load_file(file)
        except (SafetensorError, OSError) as exc:
            raise PackError(f"{file}: unreadable ({exc})") from None
    file = src / "pytorch_model.bin"
    if file.is_file():
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, pickle.UnpicklingError) as exc:
            raise PackError(f"{file}: unreadable ({exc})") from None
        if not isinstance(state, dict):
            raise PackError(f"{file}: expected a state dict, got {type(state).__name__}")
        return file, state
    raise PackError(f"{src}: no model.safetensors or pytorch_model.bin (a sharded checkpoint is not supported)")


def _decoder_sources(config: EncodecConfig) -> dict[str, str]:
    """vivace module prefix -> transformers layer prefix (EncodecDecoder.layers counts the ELUs too)."""
    sources = {"conv_in": "decoder.layers.0", "lstm": "decoder.layers.1"}
    index = 2
    for i in range(len(config.upsampling_ratios)):
        sources[f"blocks.{i}.upsample"] = f"decoder.layers.{index + 1}"
        index += 2
        for j in range(config.num_residual_layers):
            sources.update(_residual_sources(f"blocks.{i}.residuals.{j}", f"decoder.layers.{index}"))
            index += 1
    sources["conv_out"] = f"decoder.layers.{index + 1}"
    return sources


def _encoder_sources(config: EncodecConfig) -> dict[str, str]:
    """The same for EncodecEncoder.layers: conv, per ratio its residual blocks, an ELU and the strided conv, then
    the LSTM, an ELU and the last conv."""
    sources = {"conv_in": "encoder.layers.0"}
    index = 1
    for i in range(len(config.upsampling_ratios)):
        for j in range(config.num_residual_layers):
            sources.update(_residual_sources(f"blocks.{i}.residuals.{j}", f"encoder.layers.{index}"))
            index += 1
        sources[f"blocks.{i}.downsample"] = f"encoder.layers.{index + 1}"
        index += 2
    sources["lstm"] = f"encoder.layers.{index}"
    sources["conv_out"] = f"encoder.layers.{index + 2}"
    return sources


def _residual_sources(ours: str, theirs: str) -> dict[str, str]:
    return {f"{ours}.conv1": f"{theirs}.block.1", f"{ours}.conv2": f"{theirs}.block.3", f"{ours}.shortcut": f"{theirs}.shortcut"}


def _source_names(name: str, sources: dict[str, str], weight_norm_names: dict[str, str]) -> list[str]:
    """Candidate transformers names of one stored vivace tensor, the checkpoint's own weight-norm spelling first."""
    module, leaf = name.rsplit(".", 1)
    if module == "lstm":
        return [f"{sources['lstm']}.lstm.{leaf}"]
    if module.endswith(".norm"):
        return [f"{sources[module[: -len('.norm')]]}.norm.{leaf}"]
    if leaf in weight_norm_names:
        other = _LEGACY if weight_norm_names is _PARAMETRIZED else _PARAMETRIZED
        return [f"{sources[module]}.conv.{weight_norm_names[leaf]}", f"{sources[module]}.conv.{other[leaf]}"]
    return [f"{sources[module]}.conv.{leaf}"]


def _take(file: Path, state: dict[str, torch.Tensor], candidates: list[str], shape: tuple[int, ...]) -> tuple[str, torch.Tensor]:
    found = next((c for c in candidates if c in state), None)
    if found is None:
        raise PackError(f"{file}: missing tensor {candidates[0]!r}")
    tensor = state[found]
    if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
        got = list(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise PackError(f"{file}: tensor {found!r} has shape {got}, expected {list(shape)}")
    if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
        raise PackError(f"{file}: tensor {found!r} is not a finite floating-point tensor")
    return found, tensor


def convert_encodec(src_dir: str | Path, dtype: torch.dtype = torch.float32) -> tuple[EncodecConfig, dict[str, torch.Tensor]]:
    """Reads a transformers EncodecModel directory; every decoder tensor is checked and a bad one named."""
    src = Path(src_dir)
    manifest, raw = source_config(src)
    config = config_from_transformers(raw, str(manifest))
    file, state = _read_weights(src)
    return config, decoder_tensors(config, state, file, dtype=dtype)


def convert_encodec_pack(src: str | Path, out: str | Path, name: str = "") -> Path:
    """A transformers EncodecModel directory -> a codec pack at out (which must not exist or be empty): the decoder
    and codebooks of every level the largest bandwidth uses, and the encoder. Written to OUT.partial and renamed at
    the end, so a failed conversion leaves nothing."""
    from vivace.codecs.codec_pack import save_codec_pack

    src, out = Path(src), check_output(out)
    manifest, raw = source_config(src)
    config = config_from_transformers(raw, str(manifest))
    if raw.get("normalize"):
        raise PackError(f"{manifest}: normalize is true (a per-clip input scale), which vivace's encoder does not apply")
    file, state = _read_weights(src)
    decoder = decoder_tensors(config, state, file)
    encoder = encoder_tensors(config, state, file)
    return write_pack(out, lambda directory: save_codec_pack(directory, config, name or src.name, decoder, encoder))


def decoder_tensors(
    config: EncodecConfig, state: dict[str, torch.Tensor], file: Path, prefix: str = "", dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """The decoder's stored-form tensors from a transformers EncodecModel state dict whose keys start with prefix
    (MusicGen checkpoints nest the codec under "audio_encoder."); every tensor is checked and a bad one named."""
    with torch.device("meta"):
        module = EncodecDecoder(config)
    stored, used = _tensors(module, _decoder_sources(config), state, file, prefix, dtype)
    shape = tuple(module.codebooks.shape[1:])
    levels = [_take(file, state, [f"{prefix}quantizer.layers.{i}.codebook.embed"], shape) for i in range(config.num_levels)]
    used.update(source for source, _ in levels)
    stored["codebooks"] = torch.stack([tensor for _, tensor in levels]).to(dtype).contiguous()
    _refuse_unused(state, used, file, prefix, ("decoder.",), lambda local: local.startswith("quantizer.layers.") and local.endswith(".codebook.embed"))
    return stored


def encoder_tensors(
    config: EncodecConfig, state: dict[str, torch.Tensor], file: Path, prefix: str = "", dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """The encoder's stored-form tensors (vivace.codecs.encodec_encoder; its codebooks are the decoder's), every
    tensor checked as decoder_tensors checks them."""
    with torch.device("meta"):
        module = EncodecEncoder(config)
    stored, used = _tensors(module, _encoder_sources(config), state, file, prefix, dtype)
    _refuse_unused(state, used, file, prefix, ("encoder.",), lambda local: False)
    return stored


def _tensors(
    module: torch.nn.Module, sources: dict[str, str], state: dict[str, torch.Tensor], file: Path, prefix: str, dtype: torch.dtype,
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Every stored-form tensor of module but its codebooks, taken from state, and the state names used."""
    weight_norm_names = _PARAMETRIZED if any(".parametrizations.weight." in k for k in state) else _LEGACY
    used: set[str] = set()
    stored: dict[str, torch.Tensor] = {}
    for name, tensor in encodec_stored_form(module).items():
        if name == "codebooks":
            continue
        candidates = [prefix + c for c in _source_names(name, sources, weight_norm_names)]
        source, value = _take(file, state, candidates, tuple(tensor.shape))
        used.add(source)
        stored[name] = value.to(dtype).contiguous()
    return stored, used


def _refuse_unused(
    state: dict[str, torch.Tensor], used: set[str], file: Path, prefix: str, parts: tuple[str, ...], also: Callable[[str], bool],
) -> None:
    for key in state:
        local = key.removeprefix(prefix)
        if key.startswith(prefix) and (local.startswith(parts) or also(local)) and key not in used:
            raise PackError(f"{file}: unexpected tensor {key!r} (config.json does not describe these weights)")
