"""Trains the SoundStream-style codec: a convolutional encoder, 12-level residual VQ and vivace's own causal
SEANet decoder (vivace.codecs.soundstream.SoundStreamDecoder, the module the engine runs), on random crops of the training
clips. Losses: multi-resolution log and linear STFT magnitudes, and a small waveform L1; no adversarial loss
(a CPU budget of minutes, not days), so the audio is smoother than a GAN-trained SoundStream's.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import CODEC, HOP, Dataset, add_run_options, start_run
from torch import nn

from vivace.codecs.soundstream import SoundStreamDecoder


class StridedConv(nn.Conv1d):
    """Causal (left-padded) convolution with stride."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.kernel_size[0] - self.stride[0], 0)))


class EncoderUnit(nn.Module):
    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(channels, channels // 2, 3, dilation=dilation)
        self.conv2 = nn.Conv1d(channels // 2, channels, 1)
        self.pad = 2 * dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.elu(self.conv1(F.pad(F.elu(x), (self.pad, 0)))))


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        width = CODEC.channels
        layers: list[nn.Module] = [StridedConv(1, width, 7)]
        for ratio in reversed(CODEC.ratios):
            layers += [EncoderUnit(width, d) for d in CODEC.residual_dilations]
            layers += [nn.ELU(), StridedConv(width, 2 * width, 2 * ratio, stride=ratio)]
            width *= 2
        layers += [nn.ELU(), StridedConv(width, CODEC.codebook_dim, 3)]
        self.layers = nn.Sequential(*layers)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """[B, samples] -> [B, codebook_dim, samples / hop]"""
        return self.layers(audio.unsqueeze(1))


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


def stft_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    loss = predicted.new_zeros(())
    for n_fft in (256, 512, 1024, 2048):
        window = torch.hann_window(n_fft)
        spectra = [torch.stft(x, n_fft, n_fft // 4, window=window, return_complex=True).abs() for x in (predicted, target)]
        loss = loss + F.l1_loss(torch.log(spectra[0] + 1e-5), torch.log(spectra[1] + 1e-5))
        loss = loss + F.l1_loss(spectra[0], spectra[1])
    return loss / 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--minutes", type=float, default=40.0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop-frames", type=int, default=30)
    add_run_options(parser)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--resume", type=Path, help="start from this checkpoint")
    parser.add_argument("--decoder-only", action="store_true",
                        help="freeze the encoder and RVQ (codes already extracted stay valid) and train the decoder on")
    args = parser.parse_args()
    rng = start_run(args)
    data = Dataset.load(args.data)
    train = data.train_indices
    encoder, quantizer, decoder = Encoder(), ResidualVQ(), SoundStreamDecoder(CODEC)
    if args.resume:
        state = torch.load(args.resume, map_location="cpu")
        encoder.load_state_dict(state["encoder"])
        quantizer.load_state_dict(state["quantizer"])
        decoder.load_state_dict(state["decoder"])
    params = [p for n, p in decoder.named_parameters() if n != "codebooks"]
    if args.decoder_only:
        encoder.requires_grad_(False)
        quantizer.eval()
    else:
        params += list(encoder.parameters())
    optimizer = torch.optim.Adam(params, lr=args.lr, betas=(0.8, 0.99))
    crop = args.crop_frames * HOP
    deadline = time.time() + args.minutes * 60
    step = 0
    while time.time() < deadline:
        pieces = rng.choice(train, args.batch)
        starts = rng.integers(0, data.clips.shape[1] - crop, args.batch) // HOP * HOP
        audio = torch.stack([data.audio(int(p), int(s), crop) for p, s in zip(pieces, starts)])
        levels = CODEC.num_levels if rng.random() < 0.5 else int(rng.integers(1, CODEC.num_levels + 1))
        with torch.set_grad_enabled(not args.decoder_only):
            quantised, _, commitment = quantizer(encoder(audio), levels)
        output = decoder.decode_vectors(quantised)
        reconstruction = stft_loss(output, audio) + 0.1 * F.l1_loss(output, audio)
        loss = reconstruction + 0.25 * commitment
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        optimizer.step()
        step += 1
        if step % 50 == 0:
            remaining = (deadline - time.time()) / 60
            print(f"step {step} levels {levels:2d} stft {reconstruction.item():.4f} commit {commitment.item():.4f} ({remaining:.1f} min left)", flush=True)
        if step % 500 == 0:
            save(args.out, encoder, quantizer, decoder)
    save(args.out, encoder, quantizer, decoder)
    print(f"done: {step} steps")


def save(out: Path, encoder: Encoder, quantizer: ResidualVQ, decoder: SoundStreamDecoder) -> None:
    with torch.no_grad():
        decoder.codebooks.copy_(quantizer.codebooks)
    torch.save({"encoder": encoder.state_dict(), "quantizer": quantizer.state_dict(), "decoder": decoder.state_dict()}, out)


if __name__ == "__main__":
    main()
