"""The Triton sampler against vivace.kernels.sampling under the Triton CPU interpreter (or on a GPU at full shapes too:
tests/kernel_device.py): identical uniforms and tokens.

Kernel outputs are poisoned (NaN uniforms, -1 tokens) so a row the kernel skips cannot pass.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from kernel_device import DEVICE, full_shapes  # before anything imports triton

from vivace.kernels import dispatch
from vivace.kernels import sampling as ref
from vivace.kernels import triton_sampling as ts

pytestmark = pytest.mark.usefixtures("poisoned_kernel_buffers")


def random_u64(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, np.iinfo(np.uint64).max, n, dtype=np.uint64, endpoint=True)


def test_uniform_is_bit_identical_to_numpy() -> None:
    rng = np.random.default_rng(0)
    n = 3000
    seed, stream, step = random_u64(rng, n), random_u64(rng, n), random_u64(rng, n)
    edges = np.array([0, 1, 2**63 - 1, 2**63, 2**64 - 1], dtype=np.uint64)
    seed[:5], stream[5:10], step[10:15] = edges, edges, edges
    step[15:1015] = np.arange(1000, dtype=np.uint64)  # small steps: the common case
    stream[15:1015] = ref.stream_id(2, 7)
    u = ts.uniform(*(ts.bits_as_int64(x, n, DEVICE) for x in (seed, stream, step)))
    expected = ref.uniform(seed, stream, step)
    assert u.dtype == torch.float64
    np.testing.assert_array_equal(u.cpu().numpy(), expected)


def random_batch(rows: int, vocab: int, rng: np.random.Generator, greedy_share: float = 0.2) -> ref.SamplingBatch:
    lo = rng.integers(0, vocab // 2, rows)
    hi = np.minimum(vocab, lo + rng.integers(1, vocab, rows))
    lo[0], hi[0] = 0, vocab
    temperature = np.where(rng.random(rows) < greedy_share, 0.0, rng.choice([0.4, 0.95, 1.0, 1.7], rows))
    return ref.SamplingBatch(
        temperature=torch.from_numpy(temperature),
        top_k=torch.from_numpy(rng.choice([0, 1, 5, 50, vocab + 10], rows)),
        top_p=torch.from_numpy(rng.choice([1.0, 0.95, 0.5, 0.05, 0.0], rows)),
        vocab_lo=torch.from_numpy(lo),
        vocab_hi=torch.from_numpy(hi),
        seed=random_u64(rng, rows),
        stream=np.array([ref.stream_id(1, r) for r in range(rows)], dtype=np.uint64),
        step=rng.integers(0, 5000, rows).astype(np.uint64),
    )


# (rows, vocab, logits dtype); 2500 takes three passes of the 1024-wide chunk loop; on a GPU also the batch 64 of
# MusicGen's four codebooks (2048) and a MusicLM fine-stage window
CASES = full_shapes(
    [(1, 64, torch.float32), (8, 300, torch.float32), (5, 2500, torch.bfloat16), (3, 1024, torch.float16)],
    [(256, 2048, torch.float32), (64, 4096, torch.bfloat16), (128, 1024, torch.float16)],
)


@pytest.mark.parametrize("rows,vocab,dtype", CASES)
def test_sample_matches_reference(rows: int, vocab: int, dtype: torch.dtype) -> None:
    rng = np.random.default_rng(rows * vocab)
    gen = torch.Generator().manual_seed(rows * vocab)
    for draw in range(6):
        logits = (torch.randn(rows, vocab, generator=gen) * float(rng.choice([0.5, 3.0, 8.0]))).to(dtype)
        batch = random_batch(rows, vocab, rng)
        tokens = ts.sample(logits.to(DEVICE), batch)
        assert tokens.dtype == torch.int64 and tokens.device.type == DEVICE.type
        assert torch.equal(tokens.cpu(), ref.sample(logits, batch)), f"draw {draw}"


def test_ties_follow_the_reference_order() -> None:
    rng = np.random.default_rng(3)
    gen = torch.Generator().manual_seed(3)
    rows, vocab = 8, 200
    for _ in range(4):
        logits = torch.randint(0, 4, (rows, vocab), generator=gen).float()  # many equal probabilities
        batch = random_batch(rows, vocab, rng, greedy_share=0.3)
        assert torch.equal(ts.sample(logits.to(DEVICE), batch).cpu(), ref.sample(logits, batch))


def test_all_greedy_rows_pick_the_first_maximum_in_the_window() -> None:
    rng = np.random.default_rng(4)
    logits = torch.zeros(4, 50)
    logits[:, 10] = logits[:, 30] = 1.0
    batch = random_batch(4, 50, rng, greedy_share=1.0)
    batch = ref.SamplingBatch(**{**batch.__dict__, "vocab_lo": torch.tensor([0, 11, 20, 31]),
                                 "vocab_hi": torch.tensor([50, 50, 50, 50])})
    expected = torch.tensor([10, 30, 30, 31])
    assert torch.equal(ref.sample(logits, batch), expected)
    assert torch.equal(ts.sample(logits.to(DEVICE), batch).cpu(), expected)
    device_args = [x.to(DEVICE) for x in (batch.temperature, batch.top_k, batch.top_p, batch.vocab_lo, batch.vocab_hi)]
    bits = [ts.bits_as_int64(x, 4, DEVICE) for x in (batch.seed, batch.stream, batch.step)]
    assert torch.equal(ts.sample_on_device(logits.to(DEVICE), *device_args, *bits).cpu(), expected)


def test_tokens_follow_the_random_stream() -> None:
    # the same row drawn at many steps from a flat distribution must visit many tokens, as the reference does
    rows, vocab = 64, 16
    logits = torch.zeros(rows, vocab)
    batch = ref.SamplingBatch(
        temperature=torch.ones(rows, dtype=torch.float64),
        top_k=torch.zeros(rows, dtype=torch.int64),
        top_p=torch.ones(rows, dtype=torch.float64),
        vocab_lo=torch.zeros(rows, dtype=torch.int64),
        vocab_hi=torch.full((rows,), vocab, dtype=torch.int64),
        seed=np.full(rows, 1234, dtype=np.uint64),
        stream=np.full(rows, ref.stream_id(0), dtype=np.uint64),
        step=np.arange(rows, dtype=np.uint64),
    )
    tokens = ts.sample(logits.to(DEVICE), batch).cpu()
    assert torch.equal(tokens, ref.sample(logits, batch))
    assert len(set(tokens.tolist())) >= 10


def test_dispatch_samples_with_triton_under_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIVACE_TRITON_INTERPRET", "1")
    rng = np.random.default_rng(5)
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(5))
    batch = random_batch(4, 100, rng)
    assert dispatch.use_triton(logits.to(DEVICE))
    assert torch.equal(dispatch.sample(logits.to(DEVICE), batch).cpu(), ref.sample(logits, batch))
