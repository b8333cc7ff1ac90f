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
from common import CODEC, SAMPLE_RATE, Dataset, frame_rate_modulation, log_mel
from mulan import CROP_S, MEL_RATE, AudioTower, retrieval_accuracy, trained_text

from vivace import Engine
from vivace.codecs.soundstream_encoder import soundstream_codes
from vivace.families.musiclm.pack import Pack, load_pack

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


def mel_distance(estimate: torch.Tensor, target: torch.Tensor) -> float:
    """Mean absolute difference of natural-log mel energies (80 bands, 2048-point FFT, 10 ms hop)."""
    return float((log_mel(estimate, n_fft=2048, hop=240, n_mels=80) - log_mel(target, n_fft=2048, hop=240, n_mels=80)).abs().mean())


def envelope_correlation(clips: np.ndarray) -> float:
    """Mean Pearson correlation over all pairs of rows of their log energy envelopes (RMS over 50 ms frames)."""
    frame = SAMPLE_RATE // 20
    audio = torch.from_numpy(np.asarray(clips, dtype=np.float32))
    envelope = audio[:, : audio.shape[1] // frame * frame].reshape(len(audio), -1, frame).square().mean(-1)
    envelope = torch.log(envelope + 1e-8)
    correlation = torch.corrcoef(envelope)
    pairs = torch.triu_indices(len(audio), len(audio), 1)
    return float(correlation[pairs[0], pairs[1]].mean())


@torch.no_grad()
def pack_codes(pack: Pack, audio: torch.Tensor) -> torch.Tensor:
    """[B, samples] -> codes [B, levels, frames] through the pack's encoder and codebooks: the engine's audio-prompt
    path, which build_pack.py checks gives the codes the acoustic stages trained on."""
    return torch.stack([soundstream_codes(pack.codec_encoder, pack.codec.codebooks, clip) for clip in audio])


@torch.no_grad()
def decode(pack: Pack, codes: torch.Tensor) -> torch.Tensor:
    """codes [B, levels, frames] -> PCM [B, samples] through the pack's decoder in float32, four clips at a time."""
    decoder = pack.codec.float()
    return torch.cat([decoder(codes[i : i + 4]) for i in range(0, len(codes), 4)])


@torch.no_grad()
def codec_report(data: Dataset, pack_path: Path) -> dict:
    pack = load_pack(pack_path)
    report = {}
    audio = torch.stack([data.audio(int(i)) for i in data.evaluation_indices])
    codes = pack_codes(pack, audio)
    real_modulation = frame_rate_modulation(audio)
    for levels in (4, 8, 12):
        pcm = decode(pack, codes[:, :levels])
        modulation, snr = frame_rate_modulation(pcm), si_snr(pcm, audio)
        report[f"{levels}_levels"] = {
            "si_snr_db": float(snr.mean()),
            "si_snr_db_median": float(snr.median()),
            "clips_si_snr_at_least_0_db": int((snr >= 0).sum()),
            "stft_distance": stft_distance(pcm, audio),
            "mel_distance": mel_distance(pcm, audio),
            "frame_rate_modulation_mean": float(modulation.mean()),
            "frame_rate_modulation_median": float(modulation.median()),
            "frame_rate_modulation_max": float(modulation.max()),
            "clips_modulation_at_most_1_5": int((modulation <= 1.5).sum()),
            # some real clips are above 1.5 themselves (their music moves at 50 Hz), and a faithful codec keeps that
            "clips_modulation_at_most_1_5_or_real": int((modulation <= real_modulation.clamp(min=1.5)).sum()),
            "dc_offset_mean": float(pcm.mean(1).abs().mean()),
            "level_ratio_median": float((pcm.square().mean(1).sqrt() / audio.square().mean(1).sqrt()).median()),
            "kbps": levels * np.log2(CODEC.codebook_size) * SAMPLE_RATE / CODEC.hop_length / 1000,
        }
        if levels == CODEC.num_levels:
            report["per_clip"] = [
                {"caption": data.captions[int(i)], "si_snr_db": round(float(clip_snr), 2),
                 "frame_rate_modulation": round(float(clip_modulation), 2), "real_frame_rate_modulation": round(float(real), 2)}
                for i, clip_snr, clip_modulation, real in zip(data.evaluation_indices, snr, modulation, real_modulation)
            ]
    report["real_frame_rate_modulation_mean"] = float(real_modulation.mean())
    report["real_frame_rate_modulation_max"] = float(real_modulation.max())
    report["clips"] = len(audio)
    report["seconds_each"] = audio.shape[1] / SAMPLE_RATE
    return report


def top_k_accuracy(audio: torch.Tensor, text: torch.Tensor, k: int) -> float:
    nearest = (audio @ text.T).topk(min(k, len(text)), dim=1).indices
    return float((nearest == torch.arange(len(audio))[:, None]).any(1).float().mean())


def caption_ranks(audio: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Rank of each clip's true caption among the captions by the judge's similarity, 0 = nearest: row i of the audio
    embeddings belongs to caption i mod len(text). Its mean moves by less than a top-1 count does from one clip."""
    similarity = audio @ text.T
    own = similarity[torch.arange(len(audio)), torch.arange(len(audio)) % len(text)]
    return (similarity > own[:, None]).sum(1)


def tower_embeddings(tower: AudioTower, audio: np.ndarray) -> torch.Tensor:
    mel = log_mel(torch.from_numpy(audio).float(), n_fft=2048, hop=SAMPLE_RATE // MEL_RATE)
    return tower(mel[:, : round(CROP_S * MEL_RATE)])


def held_out_captions(data: Dataset) -> list[str]:
    return list(dict.fromkeys(data.captions[i] for i in data.evaluation_indices))


def real_clips(data: Dataset, captions: list[str], seconds: float) -> torch.Tensor:
    """[captions, samples]: the first seconds of each caption's first held-out piece."""
    first_piece: dict[str, int] = {}
    for i in data.evaluation_indices:
        first_piece.setdefault(data.captions[int(i)], int(i))
    return torch.stack([data.audio(first_piece[c], 0, int(seconds * SAMPLE_RATE)) for c in captions])


@torch.no_grad()
def load_judge(data: Dataset, work: Path) -> tuple[AudioTower, torch.Tensor]:
    """WORK/mulan.pt's audio tower and its own text tower's embeddings of the held-out captions: the judge of every
    pack measured."""
    tower = AudioTower()
    tower.load_state_dict(torch.load(work / "mulan.pt", map_location="cpu")["tower"])
    tower.eval()
    return tower, trained_text(work).embed(held_out_captions(data))


@torch.no_grad()
def adherence_report(
    data: Dataset, engine: Engine, judge: tuple[AudioTower, torch.Tensor], codec_ceiling: bool, seconds: float,
    batch: int, options: dict,
) -> tuple[dict, np.ndarray, list[str]]:
    """MuLan cycle consistency: is each generated clip's audio embedding nearest its own caption's text embedding?
    judge: WORK/mulan.pt's audio tower and its text embeddings of the held-out captions, the same for every pack.
    Ceilings: the real held-out clips, and the same clips through the codec (encode, decode with the pack's codec)."""
    tower, text = judge
    captions = held_out_captions(data)
    generated = np.concatenate([
        engine.generate(captions[i : i + batch], duration_s=seconds, seed=1000 + i, **options)
        for i in range(0, len(captions), batch)
    ])
    real = real_clips(data, captions, CROP_S)
    generated_emb, real_emb = tower_embeddings(tower, generated), tower_embeddings(tower, real.numpy())
    report = {
        "captions": len(captions),
        "chance": 1 / len(captions),
        "generated_top1": retrieval_accuracy(generated_emb, text),
        "real_top1": retrieval_accuracy(real_emb, text),
        "generated_top5": top_k_accuracy(generated_emb, text, 5),
        "real_top5": top_k_accuracy(real_emb, text, 5),
        "generated_mean_rank": float(caption_ranks(generated_emb, text).float().mean()),
        "seconds": seconds,
    }
    if codec_ceiling:
        resynthesised = decode(engine.pack, pack_codes(engine.pack, real))
        resynthesised_emb = tower_embeddings(tower, resynthesised.numpy())
        report["codec_resynthesised_top1"] = retrieval_accuracy(resynthesised_emb, text)
        report["codec_resynthesised_top5"] = top_k_accuracy(resynthesised_emb, text, 5)
        report["codec_resynthesised_mean_rank"] = float(caption_ranks(resynthesised_emb, text).float().mean())
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


# The three prompts of the original complaint, then six in the data's vocabulary that differ in tempo,
# instrumentation and drums
PROMPTS = (
    "slow solo piano",
    "upbeat piano with acoustic bass and rock drums",
    "ambient pads",
    "slow solo piano in D minor",
    "upbeat piano with acoustic bass and rock drums in C major",
    "slow soft flute with synth pad in A minor",
    "fast loud trumpet with organ and electric bass and jazz drums in F major",
    "moderate marimba with harp and brushed drums in G major",
    "upbeat clean electric guitar with strings and synth bass and electronic drums in E minor",
)
SEEDS = (0, 1, 2)


@torch.no_grad()
def prompt_report(engine: Engine, seconds: float, options: dict) -> dict:
    """Does the prompt or the seed decide the time structure? The mean log energy-envelope correlation over all
    pairs of prompts generated with one seed (averaged over the seeds; every row gets that seed: an integer seed
    would give row i seed + i) against the same prompt across seeds, and the frame-rate modulation of the clips."""
    clips = {seed: engine.generate(list(PROMPTS), duration_s=seconds, seed=[seed] * len(PROMPTS), **options) for seed in SEEDS}
    across_prompts = [envelope_correlation(clips[seed]) for seed in SEEDS]
    across_seeds = [envelope_correlation(np.stack([clips[seed][p] for seed in SEEDS])) for p in range(len(PROMPTS))]
    modulation = frame_rate_modulation(torch.from_numpy(np.concatenate(list(clips.values()))).float())
    return {
        "prompts": list(PROMPTS),
        "seeds": list(SEEDS),
        "envelope_correlation_across_prompts": float(np.mean(across_prompts)),
        "envelope_correlation_across_prompts_per_seed": across_prompts,
        "envelope_correlation_across_seeds": float(np.mean(across_seeds)),
        "envelope_correlation_first_three_prompts_seed0": envelope_correlation(clips[0][:3]),
        "frame_rate_modulation_mean": float(modulation.mean()),
        "frame_rate_modulation_max": float(modulation.max()),
        "seconds": seconds,
    }


def pack_report(data: Dataset, pack: Path, judge: tuple[AudioTower, torch.Tensor], codec_ceiling: bool, args: argparse.Namespace,
                pictures: Path | None, options: dict) -> dict:
    """Adherence (float32 and the int8 weights make demo runs) and the prompt-versus-seed figures of one pack;
    options: generate's (guidance_scale)."""
    report = {"pack": str(pack), **options}
    for quantize in args.modes:
        mode = quantize or "float32"
        engine = Engine.from_pack(pack, quantize=quantize)
        report.setdefault("guidance_scale", engine.info()["guidance_scale"])
        adherence, generated, captions = adherence_report(data, engine, judge, codec_ceiling, args.seconds, args.batch, options)
        report[f"adherence_{mode}"] = adherence
        if quantize == "int8":
            report["prompts_int8"] = prompt_report(engine, args.seconds, options)
            if pictures is not None:
                report["pictures"] = spectrograms(generated[:4], captions[:4], pictures)
    return report


def measure_parser(description: str) -> argparse.ArgumentParser:
    """The arguments every measure of a pack takes: DATA (the held-out clips and captions), WORK (the judge,
    WORK/mulan.pt), PACK and RESULTS (the JSON written)."""
    parser = argparse.ArgumentParser(description=description)
    for name in ("data", "work", "pack", "results"):
        parser.add_argument(name, type=Path)
    return parser


def main() -> None:
    parser = measure_parser(__doc__)
    parser.add_argument("--pictures", type=Path, default=None)
    parser.add_argument("--baseline-pack", type=Path, default=None,
                        help="an earlier pack to measure beside PACK with the same audio tower, captions and seeds")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="the guidance scale PACK generates with (default: the pack's own)")
    parser.add_argument("--int8-only", action="store_true", help="leave out the float32 adherence run")
    parser.add_argument("--no-codec", action="store_true", help="leave out the codec report")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    args.modes = ("int8",) if args.int8_only else (None, "int8")
    torch.set_num_threads(args.threads)
    data = Dataset.load(args.data)
    judge = load_judge(data, args.work)
    options = {} if args.guidance_scale is None else {"guidance_scale": args.guidance_scale}
    results = {
        "date": datetime.date.today().isoformat(),
        "device": cpu_model(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        **({} if args.no_codec else {"codec": codec_report(data, args.pack)}),
        **pack_report(data, args.pack, judge, True, args, args.pictures, options),
    }
    if args.baseline_pack is not None:
        results["baseline"] = pack_report(data, args.baseline_pack, judge, False, args, None, {})
        if not args.no_codec and load_pack(args.baseline_pack).codec_encoder is not None:  # else no codes of the clips
            results["baseline"]["codec"] = codec_report(data, args.baseline_pack)
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
