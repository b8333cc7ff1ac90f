"""Encodes every clip with the trained codec's encoder and RVQ: DATA/codes.npy, int16 [pieces, frames, 12]. The codec
is a codec_train.py checkpoint or a pack directory (its encoder and codebooks: retraining stages over a shipped
pack's codec). With a pack and --tokens it also writes the pack's own semantic tokens (its tokenizer) and caption MT
(its text tower) as DATA/semantic.npy and DATA/mt_text_codes.npy, which a stage trained further from that pack
(stages_train.py --from-pack PACK --text-share 1) must read: a re-made data directory has other k-means units and other
MuLan codebooks. The pack has no audio tower, so DATA/mt_codes.npy (the audio tower's MT) is removed, not left stale."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from codec_train import ResidualVQ
from common import CODEC, Dataset

from vivace.codecs.soundstream import rvq_quantize
from vivace.codecs.soundstream_encoder import SoundStreamEncoder
from vivace.families.musiclm.pack import Pack, load_pack


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
    parser.add_argument("--tokens", action="store_true", help="also write the pack's semantic tokens and caption MT")
    args = parser.parse_args()
    if args.tokens and not args.codec.is_dir():
        raise SystemExit("--tokens needs a pack directory, not a codec checkpoint")
    torch.set_num_threads(args.threads)
    data = Dataset.load(args.data)
    encoder, quantizer = load_codec_parts(args.codec)
    codes = [encode(encoder, quantizer, torch.stack([data.audio(i) for i in range(s, min(s + 8, len(data.captions)))]))
             for s in range(0, len(data.captions), 8)]
    out = torch.cat(codes).transpose(1, 2).numpy().astype(np.int16)
    np.save(args.data / "codes.npy", out)
    print(f"codes {out.shape}")
    if args.tokens:
        write_pack_tokens(data, load_pack(args.codec), args.data)


@torch.no_grad()
def write_pack_tokens(data: Dataset, pack: Pack, out: Path) -> None:
    clip_tokens = len(pack.semantic_tokenizer(data.audio(0)))
    # rows written into one array as they come: 2000 kept tokenizer outputs (4 KB each) pinned 24 GB of glibc's heap
    semantic = np.empty((len(data.captions), clip_tokens), dtype=np.int16)
    for i in range(len(data.captions)):
        semantic[i] = pack.semantic_tokenizer(data.audio(i)).numpy()
    np.save(out / "semantic.npy", semantic)
    # in batches: the text encoder pads a batch to its longest caption and holds attention for all of it at once
    text = torch.cat([pack.text.tokens(data.captions[i : i + 64]) for i in range(0, len(data.captions), 64)])
    np.save(out / "mt_text_codes.npy", text.numpy().astype(np.int16))
    (out / "mt_codes.npy").unlink(missing_ok=True)
    print(f"semantic tokens {semantic.shape} and caption MT of the pack's tokenizer and text tower")


if __name__ == "__main__":
    main()
