"""Measures the demo pack: codec reconstruction on held-out clips, prompt adherence of generated music (MuLan
cycle consistency) and spectrogram pictures. Writes RESULTS (JSON) and prints a summary. Speed is measured by
`python -m benchmarks demo`."""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import CODEC, SAMPLE_RATE, Dataset, log_mel
from encode import encode, load_codec_parts
from mulan import CROP_S, MEL_RATE, AudioTower, retrieval_accuracy

from vivace import Engine
from vivace.families.musiclm.pack import load_codec

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for its benchmarks package
from benchmarks.common import cpu_model


def si_snr(estimate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Scale-invariant signal-to-noise ratio in dB per row."""
    estimate = estimate - estimate.mean(-1, keepdim=True)
    target = target - target.mean(-1, keepdim=True)
    projection = (estimate * target).sum(-1, keepdim=True) / target.square().sum(-1, keepdim=True) * target
    noise = estimate - projection
    return 10 * torch.log10(projection.square().sum(-1) / noise.square().sum(-1))


def stft_distance(estimate: torch.Tensor, target: torch.Tensor) -> float:
    """Multi-resolution STFT distance: mean over FFT sizes 512/1024/2048 of spectral convergence + L1 log-magnitude."""
    total = 0.0
    for n_fft in (512, 1024, 2048):
        window = torch.hann_window(n_fft)
        est, ref = (torch.stft(x, n_fft, n_fft // 4, window=window, return_complex=True).abs() for x in (estimate, target))
        convergence = torch.linalg.norm(ref - est) / torch.linalg.norm(ref)
        total += float(convergence) + float(F.l1_loss(torch.log(est + 1e-5), torch.log(ref + 1e-5)))
    return total / 3


@torch.no_grad()
def codec_report(data: Dataset, codec_checkpoint: Path, pack: Path) -> dict:
    encoder, quantizer = load_codec_parts(codec_checkpoint)
    decoder = load_codec(pack).float()
    report = {}
    audio = torch.stack([data.audio(int(i)) for i in data.test_indices])
    codes = torch.cat([encode(encoder, quantizer, audio[i : i + 4]) for i in range(0, len(audio), 4)])
    for levels in (4, 8, 12):
        pcm = decoder(codes[:, :levels])
        report[f"{levels}_levels"] = {
            "si_snr_db": float(si_snr(pcm, audio).mean()),
            "stft_distance": stft_distance(pcm, audio),
            "kbps": levels * np.log2(CODEC.codebook_size) * SAMPLE_RATE / CODEC.hop_length / 1000,
        }
    report["clips"] = len(audio)
    report["seconds_each"] = audio.shape[1] / SAMPLE_RATE
    return report


def top_k_accuracy(audio: torch.Tensor, text: torch.Tensor, k: int) -> float:
    nearest = (audio @ text.T).topk(min(k, len(text)), dim=1).indices
    return float((nearest == torch.arange(len(audio))[:, None]).any(1).float().mean())


def tower_embeddings(tower: AudioTower, audio: np.ndarray) -> torch.Tensor:
    mel = log_mel(torch.from_numpy(audio).float(), n_fft=2048, hop=SAMPLE_RATE // MEL_RATE)
    return tower(mel[:, : round(CROP_S * MEL_RATE)])


@torch.no_grad()
def adherence_report(
    data: Dataset, engine: Engine, tower: AudioTower, codec_checkpoint: Path, seconds: float, batch: int
) -> tuple[dict, np.ndarray, list[str]]:
    """MuLan cycle consistency: is each generated clip's audio embedding nearest its own caption's text embedding?
    Ceilings: the real held-out clips, and the same clips through the codec (encode, decode with the pack's codec)."""
    captions = list(dict.fromkeys(data.captions[i] for i in data.test_indices))
    first_piece: dict[str, int] = {}
    for i in data.test_indices:
        first_piece.setdefault(data.captions[i], int(i))
    text = engine.pack.text.embed(captions)
    generated = np.concatenate([
        engine.generate(captions[i : i + batch], duration_s=seconds, seed=1000 + i) for i in range(0, len(captions), batch)
    ])
    real = torch.stack([data.audio(first_piece[c], 0, int(CROP_S * SAMPLE_RATE)) for c in captions])
    encoder, quantizer = load_codec_parts(codec_checkpoint)
    decoder = engine.pack.codec.float()
    resynthesised = torch.cat([decoder(encode(encoder, quantizer, real[i : i + 4])) for i in range(0, len(real), 4)])
    generated_emb, real_emb = tower_embeddings(tower, generated), tower_embeddings(tower, real.numpy())
    resynthesised_emb = tower_embeddings(tower, resynthesised.numpy())
    report = {
        "captions": len(captions),
        "chance": 1 / len(captions),
        "generated_top1": retrieval_accuracy(generated_emb, text),
        "real_top1": retrieval_accuracy(real_emb, text),
        "generated_top5": top_k_accuracy(generated_emb, text, 5),
        "real_top5": top_k_accuracy(real_emb, text, 5),
        "codec_resynthesised_top1": retrieval_accuracy(resynthesised_emb, text),
        "codec_resynthesised_top5": top_k_accuracy(resynthesised_emb, text, 5),
        "seconds": seconds,
    }
    return report, generated, captions


def spectrograms(clips: np.ndarray, captions: list[str], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    names = []
    for i, (clip, caption) in enumerate(zip(clips, captions)):
        mel = log_mel(torch.from_numpy(clip).float(), n_fft=2048, hop=240, n_mels=96).T.numpy()
        fig, ax = plt.subplots(figsize=(8, 2.4), dpi=80)
        ax.imshow(mel, origin="lower", aspect="auto", cmap="magma", extent=(0, len(clip) / SAMPLE_RATE, 0, 96), vmin=mel.max() - 12)
        ax.set_title(f'"{caption}"', fontsize=9)
        ax.set_xlabel("seconds")
        ax.set_ylabel("mel band")
        fig.tight_layout()
        name = f"demo_{i}.png"
        fig.savefig(out / name)
        plt.close(fig)
        names.append(name)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data", type=Path)
    parser.add_argument("work", type=Path)
    parser.add_argument("pack", type=Path)
    parser.add_argument("results", type=Path)
    parser.add_argument("--pictures", type=Path, default=None)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(2)
    data = Dataset.load(args.data)
    tower = AudioTower()
    tower.load_state_dict(torch.load(args.work / "mulan.pt", map_location="cpu")["tower"])
    tower.eval()
    results = {
        "date": datetime.date.today().isoformat(),
        "device": cpu_model(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "codec": codec_report(data, args.work / "codec.pt", args.pack),
    }
    for quantize in (None, "int8"):
        mode = quantize or "float32"
        engine = Engine.from_pack(args.pack, quantize=quantize)
        adherence, generated, captions = adherence_report(data, engine, tower, args.work / "codec.pt", args.seconds, args.batch)
        results[f"adherence_{mode}"] = adherence
        if args.pictures is not None and quantize == "int8":  # what make demo runs
            results["pictures"] = spectrograms(generated[:4], captions[:4], args.pictures)
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
