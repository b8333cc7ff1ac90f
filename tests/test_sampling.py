import numpy as np
import torch

from vivace.kernels.sampling import SamplingBatch, sample, uniform


def batch(rows: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, lo: int = 0, hi: int = 50,
          seed: int = 0, step: int = 0) -> SamplingBatch:
    return SamplingBatch(
        temperature=torch.full((rows,), temperature, dtype=torch.float64),
        top_k=torch.full((rows,), top_k, dtype=torch.int64),
        top_p=torch.full((rows,), top_p, dtype=torch.float64),
        vocab_lo=torch.full((rows,), lo, dtype=torch.int64),
        vocab_hi=torch.full((rows,), hi, dtype=torch.int64),
        seed=np.full(rows, seed, dtype=np.uint64),
        stream=np.arange(rows, dtype=np.uint64),
        step=np.full(rows, step, dtype=np.uint64),
    )


def test_uniform_is_deterministic_and_in_range() -> None:
    u = uniform(np.arange(1000), np.zeros(1000), np.arange(1000))
    assert np.array_equal(u, uniform(np.arange(1000), np.zeros(1000), np.arange(1000)))
    assert (u >= 0).all() and (u < 1).all()
    assert abs(u.mean() - 0.5) < 0.05


def test_greedy_takes_first_maximum_inside_window() -> None:
    logits = torch.randn(4, 50)
    logits[:, 3] = 100.0
    tokens = sample(logits, batch(4, temperature=0.0, lo=10, hi=20))
    assert torch.equal(tokens, logits[:, 10:20].argmax(1) + 10)


def test_top_k_and_window_restrict_the_support() -> None:
    logits = torch.randn(1, 50).repeat(400, 1)
    b = batch(400, top_k=3, lo=5, hi=45)
    b = SamplingBatch(**{**b.__dict__, "step": np.arange(400, dtype=np.uint64)})
    tokens = set(sample(logits, b).tolist())
    allowed = set((logits[0, 5:45].topk(3).indices + 5).tolist())
    assert tokens <= allowed and len(tokens) == 3


def test_top_p_keeps_the_smallest_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(300, 1)
    b = batch(300, top_p=0.8, hi=4)
    b = SamplingBatch(**{**b.__dict__, "step": np.arange(300, dtype=np.uint64)})
    assert set(sample(logits, b).tolist()) == {0, 1}


def test_rows_do_not_depend_on_batch_composition() -> None:
    logits = torch.randn(8, 50)
    full = sample(logits, batch(8, temperature=0.9, top_k=10))
    for i in range(8):
        b = batch(8, temperature=0.9, top_k=10)
        one = SamplingBatch(**{k: v[i : i + 1] for k, v in b.__dict__.items()})
        assert sample(logits[i : i + 1], one).item() == full[i].item()
