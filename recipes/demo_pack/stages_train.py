"""Trains one MusicLM stage (semantic, coarse or fine) with teacher forcing on sequences laid out exactly as
vivace's pipeline feeds them (vivace.families.musiclm.layout): the stage is vivace's StageTransformer, trained through its dense
forward, so the trained module is the inference module.

semantic: [MT] [S of a 10 s crop]                          -> S
coarse:   [MT] [S of a 2 s crop] [A levels 1-4, time-major] -> A coarse
fine:     [A coarse of a 1 s crop] [A levels 5-12]          -> A fine

MT comes from the audio tower on the surrounding 10 s (mt_codes.npy) or, for a share of the examples
(--text-share), from the text tower on the piece's caption (mt_text_codes.npy): MusicLM trains on audio MT alone
because it has no captions for its audio, but these pieces come with exact ones, and conditioning on what
inference conditions on makes the prompt decide more. A stage the pack guides (pack_config's guided_stages) sees
the null token in place of its MT tokens in a share of its examples (--cond-drop), so it also learns the
unconditional distribution that classifier-free guidance mixes against. A from the trained codec (codes.npy). Dropout
(--dropout, on the embeddings and every residual branch) is added by hooks for training only: the trained module
is still the inference module.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import SEMANTIC_RATE, Dataset, add_run_options, start_run
from pack_config import CROP_SECONDS, FRAME_RATE, LAYOUT, pack_config

from vivace.families.musiclm.pack import load_pack
from vivace.model.transformer import StageTransformer

MT_CENTERS_S = np.array([5.0, 7.5, 10.0, 12.5, 15.0])  # centres of the 10 s crops behind mt_codes.npy


class StageData:
    """Random training crops of one stage from the pieces given: semantic [pieces, tokens], mt [pieces, crops, 12],
    codes [pieces, frames, 12] (acoustic stages only)."""

    def __init__(
        self, stage: str, pieces: np.ndarray, semantic: np.ndarray, mt: np.ndarray, text_mt: np.ndarray,
        codes: np.ndarray | None, text_share: float, cond_drop: float = 0.0,
    ) -> None:
        self.stage = stage
        self.pieces = pieces
        self.semantic = semantic
        self.mt = mt
        self.text_mt = text_mt
        self.codes = codes
        self.text_share = text_share
        self.cond_drop = cond_drop if stage in LAYOUT.guided_stages else 0.0
        self.seconds = semantic.shape[1] / SEMANTIC_RATE

    def sample(self, rng: np.random.Generator, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.example(int(rng.choice(self.pieces)), rng) for _ in range(batch)]
        return torch.tensor(np.stack([r[0] for r in rows])), torch.tensor(np.stack([r[1] for r in rows]))

    def example(self, piece: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(input ids [T], targets [T] with -100 where nothing is predicted) of one random crop."""
        crop = CROP_SECONDS[self.stage]
        start_s = rng.integers(0, int((self.seconds - crop) * SEMANTIC_RATE) + 1) / SEMANTIC_RATE
        s0, s1 = round(start_s * SEMANTIC_RATE), round((start_s + crop) * SEMANTIC_RATE)
        f0, f1 = round(start_s * FRAME_RATE), round((start_s + crop) * FRAME_RATE)
        if rng.random() < self.text_share:  # the caption's own MT, as inference conditions
            mt_codes = self.text_mt[piece]
        else:
            mt_codes = self.mt[piece, int(np.abs(MT_CENTERS_S - (start_s + crop / 2)).argmin())]
        mt = np.array(LAYOUT.mt_tokens(mt_codes.tolist()))
        if self.cond_drop and rng.random() < self.cond_drop:  # the null condition guidance mixes against
            mt = np.array(LAYOUT.null_tokens(self.stage))
        cb = LAYOUT.acoustic_codebook
        if self.stage == "semantic":
            prompt, out = mt, self.semantic[piece, s0:s1]
            offset = LAYOUT.semantic_offset
        elif self.stage == "coarse":
            prompt = np.concatenate([mt, self.semantic[piece, s0:s1] + LAYOUT.semantic_offset])
            out = (self.codes[piece, f0:f1, : LAYOUT.coarse_levels] + np.arange(LAYOUT.coarse_levels) * cb).reshape(-1)
            offset = LAYOUT.coarse_offset
        else:
            coarse = self.codes[piece, f0:f1, : LAYOUT.coarse_levels]
            prompt = (coarse + np.arange(LAYOUT.coarse_levels) * cb).reshape(-1)
            out = (self.codes[piece, f0:f1, LAYOUT.coarse_levels :] + np.arange(LAYOUT.fine_levels) * cb).reshape(-1)
            offset = LAYOUT.fine_offset
        inputs = np.concatenate([prompt, out + offset])
        targets = np.full(len(inputs), -100)
        targets[len(prompt) - 1 : -1] = out  # position i predicts token i + 1
        return inputs, targets


def add_dropout(model: StageTransformer, p: float) -> None:
    """Dropout on the token embeddings and on each residual branch's output, active in training mode only."""
    def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return F.dropout(output, p, module.training)

    for embedding in model.embed:
        embedding.register_forward_hook(hook)
    for layer in model.layers:
        layer.attn.o_proj.register_forward_hook(hook)
        layer.ffn.register_forward_hook(hook)


def evaluate(model: StageTransformer, data: StageData, batches: int, batch: int) -> float:
    rng = np.random.default_rng(1234)
    model.eval()
    losses = []
    with torch.no_grad():
        for _ in range(batches):
            inputs, targets = data.sample(rng, batch)
            logits = model.compute_logits(model.forward_dense(inputs.unsqueeze(-1)).flatten(0, 1))[:, 0]
            losses.append(F.cross_entropy(logits, targets.reshape(-1)).item())
    model.train()
    return float(np.mean(losses))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("stage", choices=["semantic", "coarse", "fine"])
    parser.add_argument("data", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--resume", action="store_true", help="continue from OUT's .state checkpoint where there is one")
    parser.add_argument("--text-share", type=float, default=0.5, help="share of examples conditioned on the caption's MT")
    parser.add_argument("--cond-drop", type=float, default=0.1,
                        help="share of a guided stage's examples whose MT tokens are the null condition")
    parser.add_argument("--from-pack", type=Path, default=None,
                        help="start from this pack's weights of the stage (training it further over the pack's own codes, "
                             "semantic tokens and text MT: encode.py DATA PACK --tokens)")
    add_run_options(parser)
    args = parser.parse_args()
    rng = start_run(args)
    dataset = Dataset.load(args.data)
    semantic = np.load(args.data / "semantic.npy").astype(np.int64)
    text_mt = np.load(args.data / "mt_text_codes.npy").astype(np.int64)
    if args.text_share < 1:
        mt = np.load(args.data / "mt_codes.npy").astype(np.int64)
    else:  # the audio tower's MT is never read
        mt = np.zeros((len(text_mt), len(MT_CENTERS_S), text_mt.shape[1]), dtype=np.int64)
    codes = None if args.stage == "semantic" else np.asarray(dataset.codes, dtype=np.int64)
    train = StageData(args.stage, dataset.train_indices, semantic, mt, text_mt, codes, args.text_share, args.cond_drop)
    test = StageData(args.stage, dataset.test_indices, semantic, mt, text_mt, codes, 1.0)  # as inference conditions
    model = StageTransformer(pack_config().stages[args.stage])
    if args.from_pack is not None:
        model.load_state_dict(load_pack(args.from_pack).stages[args.stage].float().state_dict())
    add_dropout(model, args.dropout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.05)
    state_path = args.out.with_suffix(".state")
    done_s, step = 0.0, 0
    if args.resume and state_path.is_file():
        state = torch.load(state_path, map_location="cpu")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        done_s, step = state["elapsed_s"], state["step"]
        rng = np.random.default_rng([args.seed, step])  # a resumed run draws new crops
        print(f"resuming at step {step}, {done_s / 60:.1f} of {args.minutes:g} min done", flush=True)
    warmup_s = 60.0
    begin = time.time() - done_s
    budget = args.minutes * 60

    def checkpoint(elapsed: float) -> None:
        torch.save(model.state_dict(), args.out)
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "elapsed_s": elapsed, "step": step},
                   state_path.with_suffix(".tmp"))
        state_path.with_suffix(".tmp").replace(state_path)

    while (elapsed := time.time() - begin) < budget:
        lr = args.lr * min(1.0, elapsed / warmup_s) * 0.5 * (1 + math.cos(math.pi * elapsed / budget))
        for group in optimizer.param_groups:
            group["lr"] = lr
        inputs, targets = train.sample(rng, args.batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = model.forward_dense(inputs.unsqueeze(-1))
        keep = targets.reshape(-1) >= 0
        logits = model.compute_logits(hidden.flatten(0, 1)[keep].float())[:, 0]
        loss = F.cross_entropy(logits, targets.reshape(-1)[keep])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % 25 == 0:
            print(f"{args.stage} step {step} loss {loss.item():.3f} lr {lr:.2e} ({(budget - elapsed) / 60:.1f} min left)", flush=True)
        if step % 400 == 0:
            print(f"{args.stage} step {step} held-out loss {evaluate(model, test, 4, args.batch):.3f}", flush=True)
            checkpoint(time.time() - begin)
    checkpoint(min(budget, time.time() - begin))
    print(f"{args.stage}: {step} steps; held-out loss {evaluate(model, test, 8, args.batch):.3f} nats/token")

if __name__ == "__main__":
    main()
