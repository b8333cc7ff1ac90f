"""Codec packs: an EnCodec model on its own (pack.json family "encodec"), as `vivace convert encodec` writes it.

pack.json                  the header and "codec" (vivace.codecs.encodec.EncodecConfig: every level the checkpoint's
                           largest bandwidth uses)
codec.safetensors          the decoder and the codebooks, in stored form (vivace.codecs.encodec)
codec_encoder.safetensors  the encoder (vivace.codecs.encodec_encoder)

`Codec.from_pack(path)` encodes audio into codes and decodes codes into audio, as transformers' EncodecModel.encode
and decode do for unchunked mono models without input normalisation (facebook/encodec_24khz, facebook/encodec_32khz).
A codec pack generates nothing: Engine.from_pack refuses it, naming this class.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vivace.codecs.backend import check_codes
from vivace.codecs.encodec import (
    EncodecConfig,
    EncodecDecoder,
    encodec_config_from_dict,
    encodec_config_to_dict,
    encodec_stored_form,
    load_encodec_decoder,
)
from vivace.codecs.encodec_encoder import EncodecEncoder, encode_audio, read_encodec_encoder
from vivace.errors import PackError, VivaceError
from vivace.model.weights import expected_shapes
from vivace.packs.manifest import load_component, manifest_header, read_family_manifest, write_component, write_manifest
from vivace.packs.schema import naming

FAMILY = "encodec"
DECODER, ENCODER = "codec", "codec_encoder"


def save_codec_pack(
    path: str | Path, config: EncodecConfig, name: str, decoder: dict[str, torch.Tensor], encoder: dict[str, torch.Tensor],
) -> Path:
    """Writes both components, then pack.json (last: a pack without it is not a pack)."""
    config.validate()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_component(path, DECODER, decoder)
    write_component(path, ENCODER, encoder)
    write_manifest(path, {**manifest_header(FAMILY, name, config.sampling_rate), "codec": encodec_config_to_dict(config)})
    return path


@dataclass
class Codec:
    """An EnCodec codec pack's encoder and decoder (float32)."""

    config: EncodecConfig
    decoder: EncodecDecoder
    encoder: EncodecEncoder
    name: str = ""

    @classmethod
    def from_pack(cls, path: str | Path, device: str = "cpu") -> Codec:
        path = Path(path)
        data = read_family_manifest(path, FAMILY, ("sample_rate", "codec"))
        with naming(path / "pack.json"):
            config = encodec_config_from_dict(data["codec"], "codec")
            if data["sample_rate"] != config.sampling_rate:
                raise PackError(f"sample_rate {data['sample_rate']} differs from the codec's {config.sampling_rate}")
        with torch.device("meta"):
            expected = expected_shapes(encodec_stored_form(EncodecDecoder(config)))
        stored = load_component(path, DECODER, expected)
        decoder = load_encodec_decoder(config, stored, torch.float32, device, path / f"{DECODER}.safetensors")
        return cls(config, decoder, read_encodec_encoder(path, ENCODER, config, device), data.get("name", ""))

    def info(self) -> dict[str, Any]:
        c = self.config
        return {
            "name": self.name, "family": FAMILY, "sample_rate": c.sampling_rate, "frame_rate": c.frame_rate,
            "levels": c.num_levels, "codebook_size": c.codebook_size, "hop_length": c.hop_length, "causal": c.causal,
            "params": sum(p.numel() for m in (self.encoder, self.decoder) for p in m.parameters()),
        }

    @property
    def sample_rate(self) -> int:
        return self.config.sampling_rate

    @property
    def num_levels(self) -> int:
        return self.config.num_levels

    def _levels(self, levels: Any) -> int:
        if levels is None:
            return self.num_levels
        if isinstance(levels, bool) or not isinstance(levels, (int, np.integer)) or not 1 <= levels <= self.num_levels:
            raise VivaceError(f"levels must be an integer from 1 to {self.num_levels}, got {levels!r}")
        return int(levels)

    def encode(self, audio: Any, sample_rate: int | None = None, levels: int | None = None) -> np.ndarray:
        """Audio (a sound file path, or PCM [samples] / [channels, samples] at sample_rate) -> int64 codes [levels,
        ceil(samples / hop)] (downmixed to mono and resampled to the codec's rate first). levels: the first that many
        RVQ levels (default all: transformers' largest bandwidth)."""
        return encode_audio(self.encoder, self.decoder.codebooks[: self._levels(levels)], audio, sample_rate)

    @torch.inference_mode()
    def decode(self, codes: Any) -> np.ndarray:
        """int codes [levels, frames] (levels up to num_levels) -> float32 PCM [frames * hop] at sample_rate."""
        if getattr(codes, "ndim", 2) != 2:
            raise VivaceError(f"codes must be one clip, [levels, frames], got shape {list(codes.shape)}")
        return self.decoder(check_codes(codes, self.decoder.codebooks, all_levels=False))[0].float().cpu().numpy()
