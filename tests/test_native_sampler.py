"""vivace._C.sample / sample_guided against the Python reference vivace.kernels.sampling.sample.

The reference and the native sampler share the counter-based uniform, so they must agree token for token,
not just in distribution."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from vivace import _C
from vivace.kernels.sampling import SamplingBatch, sample

U64 = np.iinfo(np.uint64).max


def make_batch(rows, temperature, top_k, top_p, vocab_lo, vocab_hi, seed=None, stream=None, step=None, rng=None):
    rng = rng or np.random.default_rng(0)
    full = lambda v, dtype: np.broadcast_to(np.asarray(v, dtype=dtype), (rows,)).copy()  # noqa: E731
    return SamplingBatch(
        temperature=torch.from_numpy(full(temperature, np.float64)),
        top_k=torch.from_numpy(full(top_k, np.int64)),
        top_p=torch.from_numpy(full(top_p, np.float64)),
        vocab_lo=torch.from_numpy(full(vocab_lo, np.int64)),
        vocab_hi=torch.from_numpy(full(vocab_hi, np.int64)),
        seed=rng.integers(0, U64, rows, dtype=np.uint64, endpoint=True) if seed is None else full(seed, np.uint64),
        stream=rng.integers(0, U64, rows, dtype=np.uint64, endpoint=True) if stream is None else full(stream, np.uint64),
        step=rng.integers(0, U64, rows, dtype=np.uint64, endpoint=True) if step is None else full(step, np.uint64),
    )


def native(logits, b, num_threads=0):
    return _C.sample(logits, b.temperature, b.top_k, b.top_p, b.vocab_lo, b.vocab_hi, b.seed, b.stream, b.step, num_threads)


def random_batch(rng, rows, vocab):
    lo = rng.integers(-3, vocab, rows)
    hi = lo + rng.integers(1, vocab + 4, rows)
    whole = rng.random(rows) < 0.4
    lo[whole], hi[whole] = 0, vocab
    empty = np.maximum(lo, 0) >= np.minimum(hi, vocab)
    lo[empty], hi[empty] = 0, vocab
    return make_batch(
        rows,
        temperature=rng.choice([0.0, 0.4, 0.95, 1.0, 1.3, 3.0], rows),
        top_k=rng.choice([0, 0, 1, 2, 10, 50, 250, vocab + 5, -1], rows),
        top_p=rng.choice([1.0, 1.0, 0.95, 0.9, 0.5, 0.1, 0.0, 1.5], rows),
        vocab_lo=lo,
        vocab_hi=hi,
        rng=rng,
    )


def random_logits(rng, rows, vocab):
    kind = rng.integers(4)
    if kind == 0:
        x = rng.normal(0, rng.choice([0.3, 2.0, 8.0]), (rows, vocab))
    elif kind == 1:  # many exact ties
        x = rng.integers(-6, 3, (rows, vocab)) * 0.5
    elif kind == 2:  # probabilities down to subnormal and zero
        x = rng.uniform(-900, 0, (rows, vocab))
        x[:, ::3] = rng.uniform(-4, 0, (rows, len(range(0, vocab, 3))))
    else:  # masked tokens
        x = rng.normal(0, 3, (rows, vocab))
        x[rng.random((rows, vocab)) < 0.3] = -np.inf
    x = x.astype(np.float32)
    x[:, rng.integers(vocab)] = 1.0  # keeps every window of the whole vocabulary finite
    return x


def finite_windows(logits, b):
    """Rows whose window holds a finite logit; the reference fails on the others."""
    ids = np.arange(logits.shape[1])
    inside = (ids >= b.vocab_lo.numpy()[:, None]) & (ids < b.vocab_hi.numpy()[:, None])
    return (np.isfinite(logits) & inside).any(axis=1)


def test_matches_reference_token_for_token_on_random_rows():
    rng = np.random.default_rng(1234)
    checked = 0
    for _ in range(60):
        vocab = int(rng.choice([1, 3, 8, 37, 1024, 2048]))
        rows = int(rng.choice([1, 7, 64]))
        logits = random_logits(rng, rows, vocab)
        b = random_batch(rng, rows, vocab)
        keep = finite_windows(logits, b)
        logits, b = logits[keep], SamplingBatch(*(field[keep] for field in b.__dict__.values()))
        np.testing.assert_array_equal(native(logits, b), sample(torch.from_numpy(logits), b).numpy())
        checked += len(logits)
    assert checked > 1000


@pytest.mark.parametrize("kind", ["normal", "ties at the cut", "adjacent floats", "large logits", "guided"])
def test_top_k_candidate_path_matches_reference_token_for_token(kind):
    """Rows with top_k >= 32 and at most a quarter of the window kept are decided from the candidates above a
    threshold (only they are exponentiated). Their tokens must still be the reference's, also where the cut or the
    drawn token sits among exact ties or among logits one float32 step apart (the path then defers to the full one)."""
    rng = np.random.default_rng(["normal", "ties at the cut", "adjacent floats", "large logits", "guided"].index(kind))
    rows, vocab = 256, 1024
    x = rng.normal(0, 3, (rows, vocab))
    if kind == "ties at the cut":
        x = np.round(x * 2) / 2  # about 40 tokens share each value
    elif kind == "adjacent floats":
        base = np.float32(rng.normal(0, 1, (rows, 1)))
        x = (base + np.arange(vocab)[None, :] % 64 * np.spacing(np.abs(base))).astype(np.float32)
        x += np.float32(0.25) * (np.arange(vocab) // 64)
    elif kind == "large logits":
        x = x * 40 + 3000
    logits = x.astype(np.float32)
    b = make_batch(
        rows, temperature=rng.choice([0.4, 1.0, 1.7], rows), top_k=rng.choice([32, 50, 250], rows),
        top_p=rng.choice([1.0, 1.0, 0.9, 0.5], rows), vocab_lo=0, vocab_hi=vocab, rng=rng,
    )
    if kind == "guided":
        uncond = rng.normal(0, 3, (rows, vocab)).astype(np.float32)
        scale = np.full(rows, 3.0)
        got = _C.sample_guided(logits, uncond, scale, b.temperature, b.top_k, b.top_p, b.vocab_lo, b.vocab_hi,
                               b.seed, b.stream, b.step)
        mixed = torch.from_numpy(uncond).double() + 3.0 * (torch.from_numpy(logits).double() - torch.from_numpy(uncond).double())
        np.testing.assert_array_equal(got, sample(mixed, b).numpy())
        return
    np.testing.assert_array_equal(native(logits, b), sample(torch.from_numpy(logits), b).numpy())


def test_greedy_matches_reference_argmax():
    rng = np.random.default_rng(7)
    logits = random_logits(rng, 64, 1024)
    logits[5, 100:200] = 1e6  # a tie: first maximum wins
    logits[9, [3, 700]] = np.nan  # torch.argmax picks the first NaN
    b = make_batch(64, 0.0, 0, 1.0, 0, 1024, rng=rng)
    tokens = native(logits, b)
    np.testing.assert_array_equal(tokens, sample(torch.from_numpy(logits), b).numpy())
    assert tokens[5] == 100 and tokens[9] == 3


def test_greedy_respects_the_vocab_window():
    logits = np.zeros((2, 16), np.float32)
    logits[:, 2] = 5.0
    logits[:, 9] = 3.0
    b = make_batch(2, 0.0, 0, 1.0, [0, 4], [16, 12])
    assert native(logits, b).tolist() == [2, 9]


@pytest.mark.parametrize("n", [3, 8, 10, 100, 1024])
def test_uniform_logits_with_top_p_on_exact_mass_boundaries(n):
    # equal probabilities put top_p exactly on cumulative-mass boundaries, where rounding decides
    rows = n + 1
    logits = np.zeros((rows, 1024), np.float32)
    b = make_batch(rows, 1.0, 0, np.arange(rows) / n, 0, n, rng=np.random.default_rng(n))
    np.testing.assert_array_equal(native(logits, b), sample(torch.from_numpy(logits), b).numpy())


def test_top_p_on_the_references_own_rounded_mass_boundaries():
    # top_p equal to a float64 mass_before of the reference keeps that candidate out only if every
    # rounding before it (softmax sum order, exp, cumulative and total sums) is reproduced exactly
    rng = np.random.default_rng(21)
    vocab, boundaries, draws = 1024, 64, 64
    logits = rng.normal(0, 2.5, (boundaries, vocab)).astype(np.float32)
    probs = torch.softmax(torch.from_numpy(logits).double(), dim=1)
    sorted_probs, _ = torch.sort(probs, dim=1, descending=True, stable=True)
    mass_before = (torch.cumsum(sorted_probs, dim=1) - sorted_probs) / sorted_probs.sum(dim=1, keepdim=True)
    top_p = mass_before[torch.arange(boundaries), torch.from_numpy(rng.integers(1, 4, boundaries))].numpy()
    rows = np.repeat(np.arange(boundaries), draws)
    b = make_batch(len(rows), 1.0, 0, top_p[rows], 0, vocab, seed=1, stream=rows, step=np.tile(np.arange(draws), boundaries))
    np.testing.assert_array_equal(native(logits[rows], b), sample(torch.from_numpy(logits[rows]), b).numpy())


def test_guided_matches_reference_on_mixed_float64_logits():
    rng = np.random.default_rng(3)
    rows, vocab = 16, 2048
    cond = rng.normal(0, 3, (rows, vocab)).astype(np.float32)
    uncond = rng.normal(0, 3, (rows, vocab)).astype(np.float32)
    scale = rng.choice([0.0, 1.0, 3.0, 7.5], rows)
    b = make_batch(rows, rng.choice([0.0, 1.0, 0.7], rows), rng.choice([0, 250], rows), rng.choice([1.0, 0.9], rows), 0, vocab, rng=rng)
    got = _C.sample_guided(cond, uncond, scale, b.temperature, b.top_k, b.top_p, b.vocab_lo, b.vocab_hi, b.seed, b.stream, b.step)
    u = torch.from_numpy(uncond).double()
    mixed = u + torch.from_numpy(scale).unsqueeze(1) * (torch.from_numpy(cond).double() - u)
    np.testing.assert_array_equal(got, sample(mixed, b).numpy())
    np.testing.assert_array_equal(
        _C.sample_guided(cond, uncond, np.ones(rows), b.temperature, b.top_k, b.top_p, b.vocab_lo, b.vocab_hi, b.seed, b.stream, b.step),
        native(cond, b),
    )


@given(
    st.lists(st.sampled_from([-np.inf, -30.0, -2.5, -1.0, 0.0, 0.0, 0.5, 1.0, 1e-30, 4.0]), min_size=1, max_size=40),
    st.sampled_from([0.0, 0.5, 1.0, 2.0]),
    st.integers(-1, 45),
    st.sampled_from([0.0, 0.2, 0.5, 0.75, 0.9, 1.0]),
    st.integers(0, 2**64 - 1),
)
@settings(max_examples=200, deadline=None)
def test_matches_reference_on_small_rows_with_ties(row, temperature, top_k, top_p, step):
    logits = np.array([row], np.float32)
    logits[0, 0] = 0.0
    b = make_batch(1, temperature, top_k, top_p, 0, len(row), seed=11, stream=5, step=step)
    assert native(logits, b).tolist() == sample(torch.from_numpy(logits), b).tolist()


def renormalised(logits, temperature, top_k, top_p):
    """The distribution the reference's steps 3-5 draw from, in exact float64 arithmetic."""
    p = np.exp((logits - logits.max()) / temperature)
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    kept = p[order][:top_k] if top_k > 0 else p[order]
    before = (np.cumsum(kept) - kept) / kept.sum()
    kept = kept[(before < top_p) | (np.arange(len(kept)) == 0)]
    out = np.zeros_like(p)
    out[order[: len(kept)]] = kept / kept.sum()
    return out


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, 0, 1.0), (0.7, 10, 1.0), (1.0, 0, 0.8), (1.5, 12, 0.9), (0.5, 1, 1.0)],
)
def test_draws_follow_the_renormalised_distribution(temperature, top_k, top_p):
    draws, vocab = 40_000, 24
    logits = np.linspace(-3.0, 2.0, vocab).astype(np.float32)[np.random.default_rng(5).permutation(vocab)]
    b = make_batch(draws, temperature, top_k, top_p, 0, vocab, seed=2024, stream=9, step=np.arange(draws))
    tokens = native(np.broadcast_to(logits, (draws, vocab)), b)
    expected = renormalised(logits.astype(np.float64), temperature, top_k, top_p)
    counts = np.bincount(tokens, minlength=vocab)
    assert counts[expected == 0].sum() == 0
    support = expected > 0
    if support.sum() == 1:
        return
    _, p_value = stats.chisquare(counts[support], expected[support] * draws)
    assert p_value > 1e-3, (counts, expected * draws)


def test_tokens_do_not_depend_on_batch_size_or_thread_count():
    rng = np.random.default_rng(99)
    logits = random_logits(rng, 64, 2048)
    b = random_batch(rng, 64, 2048)
    full = native(logits, b, num_threads=1)
    np.testing.assert_array_equal(native(logits, b, num_threads=2), full)
    np.testing.assert_array_equal(native(logits, b, num_threads=0), full)
    for size in (1, 7):
        for start in range(0, 64, size * 5):
            part = slice(start, start + size)
            sub = SamplingBatch(*(field[part] for field in b.__dict__.values()))
            np.testing.assert_array_equal(native(logits[part], sub, num_threads=2), full[part])


def test_accepts_cpu_tensors_and_strided_arrays():
    rng = np.random.default_rng(4)
    logits = random_logits(rng, 8, 1024)
    b = make_batch(8, 1.0, 250, 0.9, 0, 1024, rng=rng)
    expected = native(logits, b)
    np.testing.assert_array_equal(native(torch.from_numpy(logits), b), expected)
    wide = np.zeros((8, 2048), np.float32)
    wide[:, ::2] = logits
    np.testing.assert_array_equal(native(wide[:, ::2], b), expected)
    assert expected.dtype == np.int64 and expected.shape == (8,)


def test_invalid_inputs_raise_value_errors():
    logits = np.zeros((2, 8), np.float32)
    b = make_batch(2, 1.0, 0, 1.0, 0, 8)
    args = [b.temperature, b.top_k, b.top_p, b.vocab_lo, b.vocab_hi, b.seed, b.stream, b.step]

    def call(x=logits, **changes):
        names = ["temperature", "top_k", "top_p", "vocab_lo", "vocab_hi", "seed", "stream", "step"]
        values = [changes.get(n, a) for n, a in zip(names, args)]
        return _C.sample(x, *values, num_threads=changes.get("num_threads", 0))

    with pytest.raises(ValueError, match="logits must have dtype float32, got float64"):
        call(logits.astype(np.float64))
    with pytest.raises(ValueError, match=r"logits must be \[rows, vocab\]"):
        call(np.zeros(8, np.float32))
    with pytest.raises(ValueError, match=r"top_k must have shape \(2,\)"):
        call(top_k=np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="seed must have dtype uint64, got int64"):
        call(seed=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match=r"temperature\[1\]"):
        call(temperature=np.array([1.0, -0.5]))
    with pytest.raises(ValueError, match="holds no token"):
        call(vocab_lo=np.array([0, 8]), vocab_hi=np.array([8, 12]))
    with pytest.raises(ValueError, match="num_threads"):
        call(num_threads=-1)
    with pytest.raises(ValueError, match="row 1 has a NaN"):
        call(np.array([[0.0] * 8, [0.0, np.nan] + [0.0] * 6], np.float32))
    with pytest.raises(ValueError, match="-inf everywhere"):
        call(np.full((2, 8), -np.inf, np.float32))
    with pytest.raises(ValueError, match="same shape"):
        _C.sample_guided(logits, np.zeros((2, 9), np.float32), np.ones(2), *args)


def test_engine_samples_with_the_native_sampler_on_cpu(monkeypatch) -> None:
    from vivace import _C
    from vivace.kernels import dispatch
    from vivace.kernels.sampling import SamplingBatch

    calls = []
    native = _C.sample
    monkeypatch.setattr(_C, "sample", lambda *args: calls.append(1) or native(*args))
    logits = torch.randn(3, 40)
    batch = SamplingBatch(
        temperature=torch.full((3,), 0.9, dtype=torch.float64), top_k=torch.zeros(3, dtype=torch.int64),
        top_p=torch.ones(3, dtype=torch.float64), vocab_lo=torch.zeros(3, dtype=torch.int64),
        vocab_hi=torch.full((3,), 40, dtype=torch.int64), seed=np.zeros(3, dtype=np.uint64),
        stream=np.arange(3, dtype=np.uint64), step=np.zeros(3, dtype=np.uint64),
    )
    assert torch.equal(dispatch.sample(logits, batch), sample(logits, batch))
    assert calls == [1]
