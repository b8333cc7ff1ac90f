"""Trains the SoundStream-style codec: a convolutional encoder, 12-level residual VQ and vivace's own causal
SEANet decoder (vivace.codecs.soundstream.SoundStreamDecoder, the module the engine runs), on random crops of the
training clips. Losses (codec_losses.py): SNR and complex-spectrum terms that fix phase and level, log-magnitude and
mel terms, and with --adversarial a multi-scale STFT discriminator with feature matching. Every 500 steps the run
saves a checkpoint that --resume continues from (weights, optimizers, step count), so a long training is several
runs of a bounded length, and keeps the one with the best held-out SI-SNR beside it as OUT.best.pt: adversarial
training wanders between checks, so its last step need not be its best.
"""
from __future__ import annotations

import argparse
import copy
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from codec_losses import (
    MultiScaleSTFTDiscriminator,
    dc_loss,
    discriminator_loss,
    envelope_loss,
    frame_locked_loss,
    frame_rate_line_loss,
    generator_losses,
    snr_loss,
    spectral_loss,
)
from common import CODEC, HOP, SAMPLE_RATE, Dataset, add_run_options, frame_rate_modulation, start_run
from torch import nn

from vivace.codecs.soundstream import SoundStreamDecoder
from vivace.codecs.soundstream_encoder import SoundStreamEncoder
from vivace.families.musiclm.pack import load_pack


class ResidualVQ(nn.Module):
    """EMA codebooks, initialised from data, with dead codes restarted from the batch."""

    def __init__(self, decay: float = 0.99) -> None:
        super().__init__()
        levels, size, dim = CODEC.num_levels, CODEC.codebook_size, CODEC.codebook_dim
        self.decay = decay
        self.register_buffer("codebooks", torch.zeros(levels, size, dim))
        self.register_buffer("cluster_size", torch.ones(levels, size))
        self.register_buffer("embed_sum", torch.zeros(levels, size, dim))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    @staticmethod
    def nearest(vectors: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        distance = vectors.square().sum(1, keepdim=True) - 2 * vectors @ codebook.T + codebook.square().sum(1)
        return distance.argmin(1)

    def forward(self, latent: torch.Tensor, num_levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """latent [B, D, T] -> (quantised with straight-through gradient, codes [B, L, T], commitment loss)"""
        flat = latent.transpose(1, 2).reshape(-1, latent.shape[1])
        residual = flat.detach()
        quantised = torch.zeros_like(residual)
        codes = []
        if self.training and not bool(self.initialised):
            self._init(residual)
        for level in range(num_levels):
            codebook = self.codebooks[level]
            index = self.nearest(residual, codebook)
            chosen = codebook[index]
            if self.training:
                self._update(level, residual, index)
            quantised = quantised + chosen
            residual = residual - chosen
            codes.append(index)
        commitment = F.mse_loss(flat, quantised)
        out = flat + (quantised - flat).detach()
        batch, dim, frames = latent.shape
        return (
            out.view(batch, frames, dim).transpose(1, 2),
            torch.stack(codes, 1).view(batch, frames, num_levels).transpose(1, 2),
            commitment,
        )

    @torch.no_grad()
    def _init(self, vectors: torch.Tensor) -> None:
        residual = vectors.clone()
        for level in range(CODEC.num_levels):
            pick = torch.randint(len(residual), (CODEC.codebook_size,))
            self.codebooks[level] = residual[pick]
            self.embed_sum[level] = residual[pick]
            residual = residual - self.codebooks[level][self.nearest(residual, self.codebooks[level])]
        self.initialised.fill_(True)

    @torch.no_grad()
    def _update(self, level: int, vectors: torch.Tensor, index: torch.Tensor) -> None:
        onehot = F.one_hot(index, CODEC.codebook_size).float()
        self.cluster_size[level].mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
        self.embed_sum[level].mul_(self.decay).add_(onehot.T @ vectors, alpha=1 - self.decay)
        dead = self.cluster_size[level] < 0.05
        if dead.any():
            pick = torch.randint(len(vectors), (int(dead.sum()),))
            self.embed_sum[level][dead] = vectors[pick]
            self.cluster_size[level][dead] = 1.0
        self.codebooks[level] = self.embed_sum[level] / self.cluster_size[level].clamp(min=1e-5).unsqueeze(1)


def held_out_check(data: Dataset, encoder: SoundStreamEncoder, quantizer: ResidualVQ, decoder: SoundStreamDecoder) -> tuple[float, float, float]:
    """(mean SI-SNR in dB, mean SNR in dB, mean frame-rate modulation) of the first 4 s of eight held-out clips, all
    levels: the training log's check."""
    audio = torch.stack([data.audio(int(i), 0, 4 * SAMPLE_RATE) for i in data.test_indices[:8]])
    # back to the modes the run had: a decoder-only run keeps its quantizer in eval, or the EMA codebooks drift from
    # the codes the stages were trained on
    modes = encoder.training, quantizer.training
    encoder.eval()
    quantizer.eval()
    with torch.no_grad():
        output = decoder.decode_vectors(quantizer(encoder(audio), CODEC.num_levels)[0])
    encoder.train(modes[0])
    quantizer.train(modes[1])
    target = audio - audio.mean(-1, keepdim=True)
    estimate = output - output.mean(-1, keepdim=True)
    projection = (estimate * target).sum(-1, keepdim=True) / target.square().sum(-1, keepdim=True) * target
    si_snr = 10 * torch.log10(projection.square().sum(-1) / (estimate - projection).square().sum(-1))
    snr = 10 * torch.log10(audio.square().sum(-1) / (output - audio).square().sum(-1))
    return float(si_snr.mean()), float(snr.mean()), float(frame_rate_modulation(output).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--minutes", type=float, default=40.0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop-frames", type=int, default=30)
    add_run_options(parser)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--frame-locked", type=float, default=0.0,
                        help="weight of the frame-locked envelope term (codec_losses.frame_locked_loss) against the "
                             "frame-rate buzz")
    parser.add_argument("--frame-rate-line", type=float, default=0.0,
                        help="weight of the envelope's frame-rate line against the target's (codec_losses."
                             "frame_rate_line_loss): the buzz where the music is steady enough to hear it")
    parser.add_argument("--ema", type=float, default=0.0,
                        help="keep an exponential moving average of the decoder's weights with this decay (0.999: about "
                             "the last 1000 steps) and check, keep and ship it: adversarial training wanders, and the "
                             "frame-rate buzz moves with it from one checkpoint to the next")
    parser.add_argument("--resume", type=Path, help="continue from this checkpoint (weights, optimizers and step count)")
    parser.add_argument("--adversarial", action="store_true", help="train the multi-scale STFT discriminator beside the codec")
    parser.add_argument("--decoder-only", action="store_true",
                        help="freeze the encoder and RVQ (codes already extracted stay valid) and train the decoder on")
    parser.add_argument("--from-pack", type=Path,
                        help="start from a shipped pack's codec (its encoder, codebooks and decoder; a new discriminator "
                             "and optimizers), with --decoder-only: the pack's stages read those codebooks' codes")
    args = parser.parse_args()
    if args.from_pack and (args.resume or not args.decoder_only):
        raise SystemExit("--from-pack needs --decoder-only and no --resume")
    rng = start_run(args)
    data = Dataset.load(args.data)
    train = data.train_indices
    encoder, quantizer, decoder = SoundStreamEncoder(CODEC), ResidualVQ(), SoundStreamDecoder(CODEC)
    discriminator = MultiScaleSTFTDiscriminator()
    params = [p for n, p in decoder.named_parameters() if n != "codebooks"]
    if args.decoder_only:
        encoder.requires_grad_(False)
    else:
        params += list(encoder.parameters())
    optimizer = torch.optim.Adam(params, lr=args.lr, betas=(0.8, 0.99))
    d_optimizer = torch.optim.Adam(discriminator.parameters(), lr=args.lr, betas=(0.8, 0.99))
    step = 0
    if args.resume:
        state = torch.load(args.resume, map_location="cpu")
        encoder.load_state_dict(state["encoder"])
        quantizer.load_state_dict(state["quantizer"])
        decoder.load_state_dict(state["decoder"])
        if "discriminator" in state:
            discriminator.load_state_dict(state["discriminator"])
            d_optimizer.load_state_dict(state["d_optimizer"])
        if "optimizer" in state and state.get("decoder_only", False) == args.decoder_only:
            optimizer.load_state_dict(state["optimizer"])
            for group in optimizer.param_groups:
                group["lr"] = args.lr
        step = state.get("step", 0)
        if "decoder_training" in state:  # an --ema run's checkpoint: "decoder" is the average
            decoder.load_state_dict(state["decoder_training"])
        rng = np.random.default_rng([args.seed, step])  # a resumed run draws new crops
    if args.from_pack:
        load_codec_from_pack(args.from_pack, encoder, quantizer, decoder)
    if args.decoder_only:
        quantizer.eval()
    # the average starts from the weights the run starts from: a resumed --ema run's "decoder" is its average
    average = copy.deepcopy(decoder).requires_grad_(False) if args.ema else None
    if average is not None and args.resume and "decoder_training" in state:
        average.load_state_dict(state["decoder"])
    shipped = decoder if average is None else average
    crop = args.crop_frames * HOP
    deadline = time.time() + args.minutes * 60
    first = step
    best = -float("inf")
    while time.time() < deadline:
        pieces = rng.choice(train, args.batch)
        starts = rng.integers(0, data.clips.shape[1] - crop, args.batch) // HOP * HOP
        audio = torch.stack([data.audio(int(p), int(s), crop) for p, s in zip(pieces, starts)])
        levels = CODEC.num_levels if rng.random() < 0.5 else int(rng.integers(1, CODEC.num_levels + 1))
        with torch.set_grad_enabled(not args.decoder_only):
            quantised, _, commitment = quantizer(encoder(audio), levels)
        output = decoder.decode_vectors(quantised)
        magnitude, complex_term = spectral_loss(output, audio)
        snr = snr_loss(output, audio)
        # the SNR term in dB (10 log10): at a tenth of that it was too weak beside the magnitude terms to leave 0 dB
        envelope = envelope_loss(output, audio)
        frame_locked = frame_locked_loss(output, audio)
        line = frame_rate_line_loss(output, audio)
        loss = magnitude + complex_term + 10 * snr + envelope + 10 * dc_loss(output, audio) + 0.25 * commitment
        loss = loss + args.frame_locked * frame_locked + args.frame_rate_line * line
        adversarial = matching = d_loss = torch.zeros(())
        if args.adversarial:
            real = discriminator(audio)
            adversarial, matching = generator_losses(real, discriminator(output))
            loss = loss + 0.5 * adversarial + 1.0 * matching
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        optimizer.step()
        if average is not None:
            with torch.no_grad():
                for kept, trained in zip(average.parameters(), decoder.parameters()):
                    kept.lerp_(trained, 1 - args.ema)
        if args.adversarial:
            d_loss = discriminator_loss(discriminator(audio), discriminator(output.detach()))
            d_optimizer.zero_grad(set_to_none=True)
            d_loss.backward()
            d_optimizer.step()
        step += 1
        if step % 50 == 0:
            remaining = (deadline - time.time()) / 60
            print(f"step {step} levels {levels:2d} magnitude {magnitude.item():.3f} complex {complex_term.item():.3f} "
                  f"error {10 * snr.item():+.1f} dB envelope {envelope.item():.3f} locked {frame_locked.item():.4f} line {line.item():.3f} commit {commitment.item():.4f} adv {adversarial.item():.3f} "
                  f"fm {matching.item():.3f} disc {d_loss.item():.3f} ({remaining:.1f} min left)", flush=True)
        if step % 500 == 0:
            si_snr, plain_snr, modulation = held_out_check(data, encoder, quantizer, shipped)
            print(f"step {step} held-out SI-SNR {si_snr:+.2f} dB, SNR {plain_snr:+.2f} dB, frame-rate modulation "
                  f"{modulation:.2f}", flush=True)
            save(args, step, encoder, quantizer, decoder, average, discriminator, optimizer, d_optimizer)
            best = keep_best(args.out, si_snr, best)
    save(args, step, encoder, quantizer, decoder, average, discriminator, optimizer, d_optimizer)
    si_snr, plain_snr, modulation = held_out_check(data, encoder, quantizer, shipped)
    best = keep_best(args.out, si_snr, best)
    print(f"done: {step - first} steps this run, {step} in all; held-out SI-SNR {si_snr:+.2f} dB, SNR {plain_snr:+.2f} dB, "
          f"frame-rate modulation {modulation:.2f}")


def load_codec_from_pack(path: Path, encoder: SoundStreamEncoder, quantizer: ResidualVQ, decoder: SoundStreamDecoder) -> None:
    """The pack's encoder and decoder weights, and its codebooks as the quantizer's (frozen: a decoder-only run keeps
    the quantizer in eval, where the EMA statistics are never read)."""
    pack = load_pack(path)
    if pack.codec_encoder is None:
        raise SystemExit(f"{path} ships no codec encoder: its codes cannot be reproduced")
    encoder.load_state_dict(pack.codec_encoder.state_dict())
    decoder.load_state_dict(pack.codec.state_dict())
    with torch.no_grad():
        quantizer.codebooks.copy_(pack.codec.codebooks)
        quantizer.embed_sum.copy_(pack.codec.codebooks)
        quantizer.cluster_size.fill_(1.0)
        quantizer.initialised.fill_(True)
    print(f"codec from {path}: encoder, codebooks and decoder")


def keep_best(out: Path, si_snr: float, best: float) -> float:
    """Copies the checkpoint just saved to OUT.best.pt when its held-out SI-SNR beats this run's best so far."""
    if si_snr > best:
        shutil.copyfile(out, out.with_suffix(".best.pt"))
        print(f"step kept as {out.with_suffix('.best.pt').name} (held-out SI-SNR {si_snr:+.2f} dB)", flush=True)
    return max(si_snr, best)


def save(args: argparse.Namespace, step: int, encoder: SoundStreamEncoder, quantizer: ResidualVQ, decoder: SoundStreamDecoder,
         average: SoundStreamDecoder | None,
         discriminator: MultiScaleSTFTDiscriminator, optimizer: torch.optim.Optimizer, d_optimizer: torch.optim.Optimizer) -> None:
    """With an average (--ema), "decoder" is the average (what is checked and shipped) and "decoder_training" the
    weights training continues from."""
    with torch.no_grad():
        for module in (decoder, average):
            if module is not None:
                module.codebooks.copy_(quantizer.codebooks)
    state = {
        "encoder": encoder.state_dict(), "quantizer": quantizer.state_dict(),
        "decoder": (decoder if average is None else average).state_dict(),
        "discriminator": discriminator.state_dict(), "optimizer": optimizer.state_dict(),
        "d_optimizer": d_optimizer.state_dict(), "step": step, "decoder_only": args.decoder_only,
        **({} if average is None else {"decoder_training": decoder.state_dict()}),
    }
    torch.save(state, args.out.with_suffix(".tmp"))
    args.out.with_suffix(".tmp").replace(args.out)  # a run killed mid-save leaves the previous checkpoint whole


if __name__ == "__main__":
    main()
