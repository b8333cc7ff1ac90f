"""Decoding through the paged cache gives the logits of one dense forward over the whole sequence.

The "triton" cases run the engine's Triton kernels (attention, KV store, embedding sum, add + norm) through the
Triton CPU interpreter; the dense forward stays plain torch, so they check the fused forward end to end."""
import random

import pytest
import torch
from kernel_device import relative_error
from stage_models import PagedDriver, make_model

from vivace.model.transformer import CrossBatch

# float32 throughout: the paged and dense paths sum the same products in different orders, so agreement
# is at rounding level (~1e-6 relative); 1e-5 leaves room without hiding an indexing error (those are O(1)).
RTOL = 1e-5


@pytest.fixture(params=["torch", "triton"])
def kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "triton":
        monkeypatch.setenv("VIVACE_TRITON_INTERPRET", "1")  # before the model is built: refresh_derived reads it
    return request.param


# the interpreter is slow: the Triton cases take one block size, and the two position schemes whose kernels differ
# (T5 bias in attention; sinusoid in the embedding kernel, no bias)
PAGED_CASES = [(b, p, "torch") for b in (1, 16, 64) for p in ("t5_relative", "learned", "sinusoidal")] + [
    (16, "t5_relative", "triton"), (16, "sinusoidal", "triton"),
]


@pytest.mark.parametrize("block_size,position,kernels", PAGED_CASES, indirect=["kernels"])
@torch.no_grad()
def test_paged_decoding_matches_dense_forward(block_size: int, position: str, kernels: str) -> None:
    rng = random.Random(block_size)
    model = make_model(position)
    lengths = [rng.randint(1, 150) for _ in range(12)]
    seqs = {i: torch.randint(0, 40, (n, 1)) for i, n in enumerate(lengths)}
    dense = {i: model.compute_logits(model.forward_dense(t.unsqueeze(0))[0]) for i, t in seqs.items()}
    needed = sum(sorted(-(-n // block_size) for n in lengths)[-6:])  # room for any six at once, not for all
    driver = PagedDriver(model, block_size, num_blocks=needed + 4)
    pending = list(seqs)
    active: list[int] = []
    reused = False
    while pending or active:
        while pending and len(active) < 6:
            active.append(pending.pop(0))
        pieces = []
        for seq_id in active:
            remaining = lengths[seq_id] - driver.done.get(seq_id, 0)
            n_new = 1 if rng.random() < 0.6 else rng.randint(1, remaining)
            pieces.append((seq_id, seqs[seq_id], min(n_new, remaining)))
        logits = driver.run(pieces, None)
        offset = 0
        for seq_id, _, n_new in pieces:
            end = driver.done[seq_id]
            got = logits[offset : offset + n_new]
            assert relative_error(got, dense[seq_id][end - n_new : end]) <= RTOL
            offset += n_new
            if end == lengths[seq_id]:
                driver.free(seq_id)
                active.remove(seq_id)
                reused = reused or bool(pending)
    assert reused, "later sequences must run in blocks freed by earlier ones"
    assert driver.allocator.num_free == driver.pool.num_blocks


@torch.no_grad()
def test_cross_attention_paged_matches_dense(kernels: str) -> None:
    model = make_model("sinusoidal", cross=True)
    lengths, enc_lens = [9, 23, 4], [5, 7, 3]
    seqs = [torch.randint(0, 40, (n, 2)) for n in lengths]
    encoder = torch.randn(3, 7, 12)
    enc_mask = torch.arange(7).unsqueeze(0) < torch.tensor(enc_lens).unsqueeze(1)
    keys, values = model.encode_cross(encoder)
    driver = PagedDriver(model, 4, 64)
    for step in range(max(lengths)):
        live = [i for i in range(3) if step < lengths[i]]
        token_seq = torch.tensor(live)
        cross = CrossBatch([k[token_seq] for k in keys], [v[token_seq] for v in values], enc_mask[token_seq],
                           torch.arange(len(live)))
        logits = driver.run([(i, seqs[i], 1) for i in live], cross)
        for row, i in enumerate(live):
            dense = model.compute_logits(
                model.forward_dense(seqs[i][: step + 1].unsqueeze(0), encoder[i : i + 1], enc_mask[i : i + 1])[0]
            )
            assert relative_error(logits[row], dense[step]) <= RTOL


@pytest.mark.parametrize("dtype,bound", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
@torch.no_grad()
def test_reduced_precision_triton_forward_tracks_float32(
    dtype: torch.dtype, bound: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Weights and KV cache in bf16 / fp16 through every Triton kernel (interpreter) against the float32 dense forward.

    Bounds relative to the largest logit, about 4x what was seen (8e-3 bf16, 1e-3 fp16): two layers of 8-bit / 11-bit
    rounding of activations, weights and cache; an indexing or masking error is O(1)."""
    monkeypatch.setenv("VIVACE_TRITON_INTERPRET", "1")
    reference = make_model("t5_relative", seed=4)
    model = make_model("t5_relative", seed=4).to(dtype)
    model.refresh_derived()
    assert model.codebook_tables.dtype == dtype
    lengths = [37, 5, 20]
    seqs = {i: torch.randint(0, 40, (n, 1)) for i, n in enumerate(lengths)}
    driver = PagedDriver(model, 16, 16, dtype)
    prompt = driver.run([(i, seqs[i], n - 4) for i, n in enumerate(lengths)], None)
    assert prompt.dtype == dtype
    for step in range(4):
        logits = driver.run([(i, seqs[i], 1) for i in seqs], None)
        for row, (i, tokens) in enumerate(seqs.items()):
            dense = reference.compute_logits(reference.forward_dense(tokens[: lengths[i] - 3 + step].unsqueeze(0))[0])
            assert relative_error(logits[row].float(), dense[-1]) <= bound
