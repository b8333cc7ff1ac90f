"""Token sampling with a counter-based random stream.

Every draw uses one uniform number that depends only on (request seed, stream, step): the stream names
the sequence inside the request (stage, window or chunk), the step is the token's position in it. A
request's tokens therefore do not depend on batch composition, order, preemption or thread count.

Semantics, per row (the C++ and GPU samplers implement the same):
1. only logits in the row's allowed window [vocab_lo, vocab_hi) take part;
2. temperature 0 picks the first maximum (greedy);
3. otherwise p = softmax(logits / temperature) in float64, ordered by p descending (ties: lower id first);
4. top_k > 0 keeps the first k; top_p < 1 keeps the shortest prefix whose renormalised mass reaches top_p;
5. with u = uniform(seed, stream, step), the token is the first kept one whose cumulative mass exceeds
   u times the kept mass.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MASK64 = (1 << 64) - 1


def _mix64(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uniform(seed: np.ndarray, stream: np.ndarray, step: np.ndarray) -> np.ndarray:
    """Uniform float64 in [0, 1) from the 64-bit hash of (seed, stream, step); arrays broadcast."""
    with np.errstate(over="ignore"):
        seed64 = np.asarray(seed, dtype=np.uint64)
        key = _mix64(seed64 + _GOLDEN)
        key = _mix64(key ^ (np.asarray(stream, dtype=np.uint64) + _GOLDEN + _GOLDEN))
        bits = _mix64(key ^ (np.asarray(step, dtype=np.uint64) * _GOLDEN))
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def stream_id(*parts: int) -> int:
    """Folds small non-negative integers (stage, window, row, ...) into one 64-bit stream id."""
    value = 0
    for part in parts:
        value = (value * 1_000_003 + int(part) + 1) & _MASK64
    return value


@dataclass(frozen=True)
class SamplingBatch:
    """Per-row sampling inputs for one decode step, as CPU tensors of length batch."""

    temperature: torch.Tensor  # float64
    top_k: torch.Tensor  # int64, 0 = off
    top_p: torch.Tensor  # float64, 1.0 = off
    vocab_lo: torch.Tensor  # int64
    vocab_hi: torch.Tensor  # int64, exclusive
    seed: np.ndarray  # uint64
    stream: np.ndarray  # uint64
    step: np.ndarray  # uint64


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Draws one token per row of logits [rows, vocab]; returns int64 token ids [rows]."""
    rows, vocab = logits.shape
    logits = logits.detach().to("cpu", torch.float64)
    ids = torch.arange(vocab).unsqueeze(0)
    allowed = (ids >= batch.vocab_lo.unsqueeze(1)) & (ids < batch.vocab_hi.unsqueeze(1))
    logits = logits.masked_fill(~allowed, float("-inf"))

    greedy = batch.temperature == 0
    tokens = torch.argmax(logits, dim=1)
    if bool(greedy.all()):
        return tokens

    temperature = torch.where(greedy, torch.ones_like(batch.temperature), batch.temperature)
    probs = torch.softmax(logits / temperature.unsqueeze(1), dim=1)
    sorted_probs, order = torch.sort(probs, dim=1, descending=True, stable=True)
    rank = torch.arange(vocab).unsqueeze(0)
    keep = sorted_probs > 0
    top_k = torch.where(batch.top_k > 0, batch.top_k, torch.full_like(batch.top_k, vocab))
    keep &= rank < top_k.unsqueeze(1)
    kept = sorted_probs * keep
    mass_before = (torch.cumsum(kept, dim=1) - kept) / kept.sum(dim=1, keepdim=True)
    keep &= (mass_before < batch.top_p.unsqueeze(1)) | (rank == 0)
    kept = sorted_probs * keep
    cumulative = torch.cumsum(kept, dim=1)
    u = torch.from_numpy(uniform(batch.seed, batch.stream, batch.step))
    threshold = u * cumulative[:, -1]
    index = torch.searchsorted(cumulative, threshold.unsqueeze(1), right=True).squeeze(1)
    last_kept = keep.sum(dim=1) - 1
    index = torch.minimum(index, last_kept)
    drawn = order.gather(1, index.unsqueeze(1)).squeeze(1)
    return torch.where(greedy, tokens, drawn)


@dataclass(frozen=True)
class GuidanceRows:
    """How a decode batch's groups read their logits [members, heads, vocab] (from vivace._C.DecodeBatch.guidance()):
    a group takes its lead row; a guided group mixes its cond (lead) and null rows as transformers'
    ClassifierFreeGuidanceLogitsProcessor does, null + (cond - null) * guidance_scale, in float32.

    Every tensor has one entry per group, so the shapes depend only on the number of groups (a CUDA graph replays
    them for any batch of that size after load()); groups past the batch's read member 0 unguided."""

    lead: torch.Tensor  # [groups] int64
    null: torch.Tensor  # [groups] int64: a guided group's null row, the lead row otherwise
    guided: torch.Tensor  # [groups, 1, 1] bool
    scale: torch.Tensor  # [groups, 1, 1] float32

    @classmethod
    def of(cls, guidance: tuple[np.ndarray, np.ndarray, np.ndarray], device: torch.device | str,
           groups: int | None = None) -> GuidanceRows:
        """From DecodeBatch.guidance(), padded to `groups` (default: the batch's own number)."""
        lead, null, guided, scale = _padded_guidance(guidance, groups)
        return cls(torch.from_numpy(lead).to(device), torch.from_numpy(null).to(device),
                   torch.from_numpy(guided).to(device).view(-1, 1, 1), torch.from_numpy(scale).to(device).view(-1, 1, 1))

    def load(self, guidance: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        """Copies another batch's guidance (at most as many groups) into these tensors."""
        for tensor, values in zip((self.lead, self.null, self.guided, self.scale),
                                  _padded_guidance(guidance, self.lead.shape[0])):
            tensor.copy_(torch.from_numpy(values).view(tensor.shape))

    def mix(self, logits: torch.Tensor) -> torch.Tensor:
        """[members, heads, vocab] float32 -> [groups, heads, vocab]; no host sync."""
        cond = logits.index_select(0, self.lead)
        uncond = logits.index_select(0, self.null)
        return torch.where(self.guided, uncond + (cond - uncond) * self.scale, cond)


def _padded_guidance(
    guidance: tuple[np.ndarray, np.ndarray, np.ndarray], groups: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    lead, null, scale = guidance
    count = len(lead)
    groups = count if groups is None else groups
    if groups < count:
        raise ValueError(f"guidance for {count} groups does not fit {groups}")
    padded_lead = np.zeros(groups, dtype=np.int64)
    padded_lead[:count] = lead
    guided = np.zeros(groups, dtype=bool)
    guided[:count] = null >= 0
    padded_null = padded_lead.copy()
    padded_null[:count] = np.where(null >= 0, null, lead)
    padded_scale = np.ones(groups, dtype=np.float32)
    padded_scale[:count] = scale
    return padded_lead, padded_null, guided, padded_scale

