"""Encodes every clip with the trained codec's encoder and RVQ: DATA/codes.npy, int16 [pieces, frames, 12]. The codec
is a codec_train.py checkpoint or a pack directory (its encoder and codebooks: retraining stages over a shipped
pack's codec)."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from codec_train import ResidualVQ
from common import CODEC, Dataset

from vivace.codecs.soundstream import rvq_quantize
from vivace.codecs.soundstream_encoder import SoundStreamEncoder
from vivace.families.musiclm.pack import load_pack


def load_codec_parts(checkpoint: Path) -> tuple[SoundStreamEncoder, ResidualVQ]:
    if checkpoint.is_dir():
        pack = load_pack(checkpoint)
        quantizer = ResidualVQ()
        quantizer.codebooks.copy_(pack.codec.codebooks.float())
        return pack.codec_encoder.eval(), quantizer.eval()
    state = torch.load(checkpoint, map_location="cpu")
    encoder, quantizer = SoundStreamEncoder(CODEC), ResidualVQ()
    encoder.load_state_dict(state["encoder"])
    quantizer.load_state_dict(state["quantizer"])
    return encoder.eval(), quantizer.eval()


@torch.no_grad()
def encode(encoder: SoundStreamEncoder, quantizer: ResidualVQ, audio: torch.Tensor) -> torch.Tensor:
    """[B, samples] -> codes [B, levels, frames], with the engine's quantizer (vivace.codecs.soundstream_encoder)."""
    return rvq_quantize(quantizer.codebooks, encoder(audio))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data", type=Path)
    parser.add_argument("codec", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = Dataset.load(args.data)
    encoder, quantizer = load_codec_parts(args.codec)
    codes = [encode(encoder, quantizer, torch.stack([data.audio(i) for i in range(s, min(s + 8, len(data.captions)))]))
             for s in range(0, len(data.captions), 8)]
    out = torch.cat(codes).transpose(1, 2).numpy().astype(np.int16)
    np.save(args.data / "codes.npy", out)
    print(f"codes {out.shape}")


if __name__ == "__main__":
    main()
