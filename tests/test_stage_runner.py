"""Scheduling over a finite block pool: preemption, waiting, shared prefixes, cancellation."""
import random

import torch
from stage_models import make_model

from vivace.core.kv_cache import KVCachePool
from vivace.core.sampling import SamplingParams
from vivace.core.sequence import Sequence, TimeMajorSchedule
from vivace.core.stage_runner import StageRunner

SCHEDULE = TimeMajorSchedule(num_levels=2, codebook_size=12, input_offset=16)


def make_runner(num_blocks: int, block_size: int = 4) -> StageRunner:
    model = make_model("t5_relative", seed=3)
    c = model.config
    pool = KVCachePool(c.num_layers, num_blocks, block_size, c.num_heads, c.head_dim, torch.float32, "cpu")
    pool.data.fill_(float("nan"))
    return StageRunner("test", model, pool, torch.device("cpu"))


def make_sequences(prompts: list[list[int]], max_new: int) -> list[Sequence]:
    return [
        Sequence(i, p, max_new, SCHEDULE, SamplingParams(temperature=1.0, top_k=8), seed=7, stream=i, priority=(i,))
        for i, p in enumerate(prompts)
    ]


def run_all(runner: StageRunner, seqs: list[Sequence], max_steps: int = 10_000) -> None:
    for seq in seqs:
        runner.add(seq)
    with torch.no_grad():
        for _ in range(max_steps):
            if not runner.has_work:
                return
            runner.step()
    raise AssertionError("runner did not finish")


def test_preemption_resumes_with_identical_tokens() -> None:
    rng = random.Random(0)
    prompts = [[rng.randrange(40) for _ in range(rng.randint(3, 20))] for _ in range(8)]
    roomy = make_sequences(prompts, 30)
    run_all(make_runner(num_blocks=200), roomy)
    tight_runner = make_runner(num_blocks=30)  # about two and a half sequences at full length
    tight = make_sequences(prompts, 30)
    run_all(tight_runner, tight)
    assert tight_runner.stats.preemptions > 0
    assert [s.output_ids for s in tight] == [s.output_ids for s in roomy]
    assert tight_runner.allocator.num_free == 30
    for seq in tight:  # every token drawn from its step's level window
        for i, token in enumerate(seq.output_ids):
            lo, hi = SCHEDULE.native().windows(i)[0]
            assert lo <= token < hi


def test_shared_prompt_blocks_are_stored_once() -> None:
    prompt = list(range(10)) + list(range(10))  # 20 tokens = five blocks of 4: four shared, the last's own
    runner = make_runner(num_blocks=64)
    seqs = make_sequences([prompt] * 4, 5)
    for seq in seqs:
        runner.add(seq)
    with torch.no_grad():
        runner.step()
    shared = seqs[0].block_table[:4]
    assert all(seq.block_table[:4] == shared for seq in seqs)
    assert all(runner.allocator.ref_counts[b] == 4 for b in shared)
    assert 64 - runner.allocator.num_free == 4 + 4 * 1  # shared prefix + each sequence's last prompt block
    with torch.no_grad():
        while runner.has_work:
            runner.step()
    alone = []
    for i in range(4):  # same seeds and streams, each in its own pool: nothing shared
        seq = make_sequences([prompt] * 4, 5)[i]
        run_all(make_runner(num_blocks=64), [seq])
        alone.append(seq.output_ids)
    assert [s.output_ids for s in seqs] == alone
    assert len({tuple(a) for a in alone}) > 1
    assert runner.allocator.num_free == 64


def test_cancel_returns_blocks_and_leaves_others_intact() -> None:
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7, 6, 5]]
    reference = make_sequences(prompts, 20)
    run_all(make_runner(num_blocks=64), reference[1:])
    runner = make_runner(num_blocks=64)
    seqs = make_sequences(prompts, 20)
    for seq in seqs:
        runner.add(seq)
    with torch.no_grad():
        for _ in range(5):
            runner.step()
        runner.cancel(seqs[0])
        while runner.has_work:
            runner.step()
    assert seqs[1].output_ids == reference[1].output_ids
    assert runner.allocator.num_free == 64


def test_prefix_embeddings_are_cached_and_recomputed_like_prompt_tokens() -> None:
    """The token embeddings of a prompt's first tokens, given as a prefix of input embeddings (MusicGen-Melody's
    condition), draw what the prompt itself draws, also when a tight pool preempts and recomputes the sequences."""
    rng = random.Random(1)
    prompts = [[rng.randrange(40) for _ in range(rng.randint(7, 14))] for _ in range(6)]
    plain = make_sequences(prompts, 24)
    run_all(make_runner(num_blocks=200), plain)
    for num_blocks in (200, 24):
        runner = make_runner(num_blocks)
        with torch.no_grad():
            prefixes = [runner.model.embed[0](torch.tensor(p[:5])) for p in prompts]
        seqs = [
            Sequence(i, p[5:], 24, SCHEDULE, SamplingParams(temperature=1.0, top_k=8), seed=7, stream=i, priority=(i,),
                     cache_salt=("prefix", i), prefix=prefix)
            for i, (p, prefix) in enumerate(zip(prompts, prefixes))
        ]
        run_all(runner, seqs)
        assert [s.output_ids for s in seqs] == [s.output_ids for s in plain]
        assert all(s.rows[5:] == p.rows[5:] for s, p in zip(seqs, plain))
        assert runner.allocator.num_free == num_blocks
    assert runner.stats.preemptions > 0
