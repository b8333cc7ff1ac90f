"""vivace._C's decode bookkeeping (TokenSchedule, SequenceState, DecodeBatch, window planning) against a plain-Python
reference of the same step: the old per-sequence loop (rows, positions, slots, tables, windows, guidance mix in torch,
vivace.kernels.sampling.sample, append), kept here as the specification."""
from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vivace import _C
from vivace.kernels.sampling import SamplingBatch, sample

# --- plain-Python references ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimeMajorRef:
    num_levels: int
    codebook_size: int
    input_offset: int
    first_level: int = 0
    num_heads: int = 1

    def windows(self, new_index: int) -> list[tuple[int, int]]:
        level = (self.first_level + new_index) % self.num_levels
        return [(level * self.codebook_size, (level + 1) * self.codebook_size)]

    def input_row(self, new_index: int, drawn: list[int]) -> list[int]:
        return [self.input_offset + drawn[0]]

    def native(self) -> _C.TokenSchedule:
        return _C.TokenSchedule.time_major(self.num_levels, self.codebook_size, self.input_offset, self.first_level)


@dataclass(frozen=True)
class DelayRef:
    grid: np.ndarray
    first: int
    vocab_size: int

    @property
    def num_heads(self) -> int:
        return self.grid.shape[0]

    def windows(self, new_index: int) -> list[tuple[int, int]]:
        return [(0, self.vocab_size)] * self.num_heads

    def input_row(self, new_index: int, drawn: list[int]) -> list[int]:
        forced = self.grid[:, self.first + new_index]
        return [int(f) if f >= 0 else int(d) for f, d in zip(forced, drawn)]

    def native(self) -> _C.TokenSchedule:
        return _C.TokenSchedule.delay(self.grid, self.first, self.vocab_size)


@dataclass
class RefSequence:
    schedule: TimeMajorRef | DelayRef
    rows: list[list[int]]
    max_len: int
    sampling: tuple[float, int, float]  # temperature, top_k, top_p
    seed: int
    stream: int
    guidance_scale: float = 1.0  # > 1 (or any value with guided=True): the group has a null twin
    guided: bool = False
    block_table: list[int] = field(default_factory=list)
    prompt_len: int = 0

    def __post_init__(self) -> None:
        self.prompt_len = len(self.rows)

    @property
    def members(self) -> int:
        return 2 if self.guided else 1


def reference_step(seqs: list[RefSequence], logits: torch.Tensor) -> list[int]:
    """One step of the old Python loop: mix guided pairs in float32, draw with vivace.kernels.sampling.sample, append."""
    heads = seqs[0].schedule.num_heads
    first_rows = np.cumsum([0] + [s.members for s in seqs[:-1]]).tolist()
    mixed = logits[first_rows].clone()
    for i, (seq, row) in enumerate(zip(seqs, first_rows)):
        if seq.guided:
            cond, null = logits[row], logits[row + 1]
            mixed[i] = null + (cond - null) * seq.guidance_scale
    windows = [w for s in seqs for w in s.schedule.windows(len(s.rows) - s.prompt_len)]

    def per_row(values):
        return [v for v in values for _ in range(heads)]

    batch = SamplingBatch(
        temperature=torch.tensor(per_row(s.sampling[0] for s in seqs), dtype=torch.float64),
        top_k=torch.tensor(per_row(s.sampling[1] for s in seqs), dtype=torch.int64),
        top_p=torch.tensor(per_row(s.sampling[2] for s in seqs), dtype=torch.float64),
        vocab_lo=torch.tensor([w[0] for w in windows]), vocab_hi=torch.tensor([w[1] for w in windows]),
        seed=np.array(per_row(s.seed for s in seqs), dtype=np.uint64),
        stream=np.array(per_row(s.stream for s in seqs), dtype=np.uint64),
        step=np.array([len(s.rows) * heads + h for s in seqs for h in range(heads)], dtype=np.uint64),
    )
    tokens = sample(mixed.flatten(0, 1), batch).view(len(seqs), heads).tolist()
    finished = []
    for i, (seq, drawn) in enumerate(zip(seqs, tokens)):
        seq.rows.append(seq.schedule.input_row(len(seq.rows) - seq.prompt_len, drawn))
        if len(seq.rows) >= seq.max_len:
            finished.append(i)
    return finished


def reference_inputs(seqs: list[RefSequence], block_size: int, width: int) -> tuple[list, ...]:
    ids, positions, slots, tables, lens = [], [], [], [], []
    for seq in seqs:
        for _ in range(seq.members):
            pos = len(seq.rows) - 1
            ids.append(seq.rows[pos])
            positions.append(pos)
            slots.append(seq.block_table[pos // block_size] * block_size + pos % block_size)
            tables.append(seq.block_table + [0] * (width - len(seq.block_table)))
            lens.append(len(seq.rows))
    return ids, positions, slots, tables, lens


def plan_windows_reference(total: int, window: int, stride: int, segment_starts: list[int]) -> list[list[int]]:
    windows, t = [], 0
    while t < total:
        segment = bisect.bisect_right(segment_starts, t) - 1
        segment_end = segment_starts[segment + 1] if segment + 1 < len(segment_starts) else total
        new_end = min(t + (window if t == 0 else stride), segment_end, total)
        windows.append([len(windows), max(0, new_end - window), t, new_end, segment])
        t = new_end
    return windows


# --- builders -----------------------------------------------------------------------------------------------


def random_sequences(rng: random.Random, count: int, vocab: int, heads: int, guided_share: float = 0.3) -> list[RefSequence]:
    """Sequences with their own schedules, lengths, levels, sampling settings and seeds (one head count per batch)."""
    seqs = []
    for i in range(count):
        prompt_len = rng.randint(1, 12)
        new = rng.randint(1, 9)
        if heads == 1:
            levels = rng.randint(1, 4)
            codebook = rng.randint(2, vocab // levels)
            schedule = TimeMajorRef(levels, codebook, rng.randint(0, 50), rng.randint(0, 3))
            rows = [[rng.randrange(100)] for _ in range(prompt_len)]
        else:
            grid = np.array([[rng.choice([-1, -1, -1, vocab]) for _ in range(prompt_len + new)] for _ in range(heads)])
            schedule = DelayRef(grid, prompt_len, vocab - rng.randint(0, 3))
            rows = [[rng.randrange(vocab) for _ in range(heads)] for _ in range(prompt_len)]
        sampling = rng.choice([(0.0, 0, 1.0), (1.0, 0, 1.0), (0.9, 5, 1.0), (1.3, 0, 0.8), (0.7, 7, 0.9)])
        seqs.append(RefSequence(
            schedule, rows, prompt_len + new, sampling, seed=rng.randrange(2**63), stream=i,
            guidance_scale=rng.choice([1.5, 3.0]), guided=rng.random() < guided_share,
        ))
    return seqs


def native_states(seqs: list[RefSequence]) -> list[list[_C.SequenceState]]:
    groups = []
    for seq in seqs:
        prompt = np.array(seq.rows, dtype=np.int64)
        groups.append([_C.SequenceState(seq.schedule.native(), prompt, seq.max_len) for _ in range(seq.members)])
    return groups


def native_batch(seqs: list[RefSequence], groups: list[list[_C.SequenceState]], block_size: int = 4) -> _C.DecodeBatch:
    return _C.DecodeBatch(
        block_size, groups,
        temperature=np.array([s.sampling[0] for s in seqs]), top_k=np.array([s.sampling[1] for s in seqs], dtype=np.int64),
        top_p=np.array([s.sampling[2] for s in seqs]), seed=np.array([s.seed for s in seqs], dtype=np.uint64),
        stream=np.array([s.stream for s in seqs], dtype=np.uint64),
        guidance_scale=np.array([s.guidance_scale for s in seqs]),
    )


def run_native(seqs: list[RefSequence], logit_steps: list[torch.Tensor], num_threads: int) -> list[list[list[int]]]:
    """Runs the groups to the end, one logits tensor per step (rows of finished groups dropped as the runner does)."""
    groups = native_states(seqs)
    live = list(range(len(seqs)))
    for logits in logit_steps:
        if not live:
            break
        batch = native_batch([seqs[i] for i in live], [groups[i] for i in live])
        rows = [r for i in live for r in member_rows(seqs, i)]
        finished = batch.sample_and_advance(np.ascontiguousarray(logits[rows].numpy()), num_threads)
        live = [g for k, g in enumerate(live) if k not in set(finished.tolist())]
    return [group[0].rows().tolist() for group in groups]


def run_reference(seqs: list[RefSequence], logit_steps: list[torch.Tensor]) -> list[list[list[int]]]:
    live = list(range(len(seqs)))
    for logits in logit_steps:
        if not live:
            break
        rows = [r for i in live for r in member_rows(seqs, i)]
        finished = reference_step([seqs[i] for i in live], logits[rows])
        live = [g for k, g in enumerate(live) if k not in set(finished)]
    return [seq.rows for seq in seqs]


def member_rows(seqs: list[RefSequence], index: int) -> list[int]:
    """Rows of a full-batch logits tensor that belong to sequence `index` (every sequence keeps its rows)."""
    first = sum(s.members for s in seqs[:index])
    return list(range(first, first + seqs[index].members))


def logit_steps(rng: np.random.Generator, seqs: list[RefSequence], vocab: int, heads: int) -> list[torch.Tensor]:
    rows = sum(s.members for s in seqs)
    steps = max(s.max_len - len(s.rows) for s in seqs)
    return [torch.from_numpy(rng.normal(0, 2.5, (rows, heads, vocab)).astype(np.float32)) for _ in range(steps)]


# --- tests --------------------------------------------------------------------------------------------------


@given(st.integers(1, 8), st.integers(1, 300), st.integers(0, 500), st.integers(0, 9), st.integers(0, 200))
@settings(max_examples=150, deadline=None)
def test_time_major_windows_and_rows_match_the_reference(levels, codebook, offset, first_level, new_index):
    ref = TimeMajorRef(levels, codebook, offset, first_level)
    native = ref.native()
    assert native.windows(new_index).tolist() == [list(w) for w in ref.windows(new_index)]
    drawn = np.array([new_index % (levels * codebook)], dtype=np.int64)
    assert native.input_row(new_index, drawn).tolist() == ref.input_row(new_index, drawn.tolist())


@given(st.data())
@settings(max_examples=100, deadline=None)
def test_delay_windows_and_forced_rows_match_the_reference(data):
    heads = data.draw(st.integers(1, 5))
    length = data.draw(st.integers(1, 20))
    grid = np.array(data.draw(st.lists(st.lists(st.integers(-1, 40), min_size=length, max_size=length), min_size=heads, max_size=heads)))
    first = data.draw(st.integers(0, length - 1))
    ref = DelayRef(grid, first, 41)
    native = ref.native()
    assert native.max_steps == length - first
    for new_index in range(length - first):
        drawn = np.array(data.draw(st.lists(st.integers(0, 40), min_size=heads, max_size=heads)), dtype=np.int64)
        assert native.windows(new_index).tolist() == [list(w) for w in ref.windows(new_index)]
        assert native.input_row(new_index, drawn).tolist() == ref.input_row(new_index, drawn.tolist())
    with pytest.raises(IndexError, match="past the grid"):
        native.input_row(length - first, np.zeros(heads, dtype=np.int64))


@given(st.integers(0, 400), st.integers(1, 60), st.data())
@settings(max_examples=200, deadline=None)
def test_window_plans_match_the_reference(total, window, data):
    stride = data.draw(st.integers(1, window))
    cuts = sorted(data.draw(st.lists(st.integers(1, max(1, total)), max_size=4)))
    starts = [0] + cuts
    planned = _C.plan_windows(total, window, stride, starts).tolist()
    assert planned == plan_windows_reference(total, window, stride, starts)
    covered = [t for w in planned for t in range(w[2], w[3])]
    assert covered == list(range(total))  # every position generated once, in order
    assert all(w[3] - w[1] <= window for w in planned)  # no window longer than the trained context
    chunk = data.draw(st.integers(1, 50))
    chunks = _C.plan_chunks(total, chunk).tolist()
    assert [t for c in chunks for t in range(c[2], c[3])] == list(range(total))
    assert all(c[1] == c[2] and c[3] - c[2] <= chunk for c in chunks)


def test_window_plans_reject_bad_shapes():
    with pytest.raises(ValueError, match="stride <= window"):
        _C.plan_windows(10, 4, 5, [0])
    with pytest.raises(ValueError, match="stride <= window"):
        _C.plan_windows(10, 4, 0, [0])
    with pytest.raises(ValueError, match="begin at 0"):
        _C.plan_windows(10, 4, 2, [3])
    with pytest.raises(ValueError, match="chunk > 0"):
        _C.plan_chunks(10, 0)


@pytest.mark.parametrize("heads", [1, 4])
def test_prepare_gives_the_reference_inputs_and_missing_blocks(heads):
    rng = random.Random(heads)
    seqs = random_sequences(rng, 9, vocab=64, heads=heads, guided_share=0.5)
    groups = native_states(seqs)
    block_size = 4
    batch = native_batch(seqs, groups, block_size)
    needed = [-(-len(s.rows) // block_size) * s.members for s in seqs]
    assert batch.missing_blocks().tolist() == needed
    with pytest.raises(RuntimeError, match="no cache block"):
        batch.prepare()
    next_block = 0
    for seq, group in zip(seqs, groups):
        seq.block_table = list(range(next_block, next_block + -(-len(seq.rows) // block_size)))
        next_block += len(seq.block_table)
        for state in group:  # a guided pair's two rows hold their own blocks in the runner; here they may share
            state.block_table = seq.block_table
    assert not batch.missing_blocks().any()
    width = max(-(-s.max_len // block_size) for s in seqs)
    assert batch.table_width == width
    ids, positions, slots, tables, lens = batch.prepare()
    expected = reference_inputs(seqs, block_size, width)
    assert ids.tolist() == expected[0]
    assert positions.tolist() == expected[1]
    assert slots.tolist() == expected[2]
    assert tables.tolist() == expected[3]
    assert lens.tolist() == expected[4]


@pytest.mark.parametrize("heads", [1, 4])
def test_decode_steps_match_the_python_reference_token_for_token(heads):
    rng = random.Random(10 + heads)
    vocab = 48
    seqs = random_sequences(rng, 12, vocab=vocab, heads=heads)
    steps = logit_steps(np.random.default_rng(heads), seqs, vocab, heads)
    native = run_native(seqs, steps, num_threads=1)
    reference = run_reference([RefSequence(**{**s.__dict__, "rows": [list(r) for r in s.rows]}) for s in seqs], steps)
    assert native == reference
    assert any(s.guided for s in seqs) and any(not s.guided for s in seqs)


def test_guided_mix_is_float32_like_torch():
    """A pair whose float64 mix and float32 mix pick different greedy tokens: the batch must pick torch's."""
    schedule = TimeMajorRef(1, 2, 0)
    seq = RefSequence(schedule, [[0]], 2, (0.0, 0, 1.0), seed=0, stream=0, guidance_scale=3.0, guided=True)
    rng = np.random.default_rng(0)
    decided_by_rounding = 0
    for _ in range(2000):  # near-ties, where float32 rounding of the mix can decide the argmax
        cond = rng.normal(0, 1, 2).astype(np.float32)
        null = rng.normal(0, 1, 2).astype(np.float32)
        cond[1] = cond[0] + np.float32(rng.integers(-3, 4)) * np.spacing(cond[0])
        null[1] = null[0] + np.float32(rng.integers(-3, 4)) * np.spacing(null[0])
        logits = torch.from_numpy(np.stack([cond, null])[:, None, :])
        ref = RefSequence(**{**seq.__dict__, "rows": [[0]]})
        reference_step([ref], logits)
        groups = native_states([seq])
        native_batch([seq], groups).sample_and_advance(logits.numpy())
        assert groups[0][0].rows().tolist() == ref.rows
        wide = null.astype(np.float64) + (cond.astype(np.float64) - null) * 3.0
        decided_by_rounding += int(np.argmax(wide)) != ref.rows[-1][0]
    assert decided_by_rounding > 0  # the float64 mix would have drawn other tokens here


@pytest.mark.parametrize("heads", [1, 3])
def test_tokens_do_not_depend_on_batch_composition_or_threads(heads):
    """A group draws the same tokens alone, in a batch of 7 or of 64, and on 1 or 2 threads."""
    rng = random.Random(heads)
    vocab = 300
    seqs = random_sequences(rng, 64, vocab=vocab, heads=heads)
    steps = logit_steps(np.random.default_rng(0), seqs, vocab, heads)

    def fresh(indices):
        return [RefSequence(**{**seqs[i].__dict__, "rows": [list(r) for r in seqs[i].rows]}) for i in indices]

    def sub_steps(indices):
        rows = [r for i in indices for r in member_rows(seqs, i)]
        return [s[rows] for s in steps]

    full = run_native(fresh(range(64)), steps, num_threads=1)
    assert run_native(fresh(range(64)), steps, num_threads=2) == full
    for size in (1, 7):
        for start in (0, 20, 57):
            indices = list(range(start, start + size))
            assert run_native(fresh(indices), sub_steps(indices), num_threads=2) == full[start : start + size]


def test_sequence_state_records_outputs_and_guards_its_length():
    schedule = _C.TokenSchedule.time_major(2, 10, 100)
    state = _C.SequenceState(schedule, np.array([[1], [2]]), 4)
    state.append(np.array([3]))
    state.append(np.array([17]))
    assert state.rows().tolist() == [[1], [2], [103], [117]]
    assert state.outputs().tolist() == [3, 17]
    assert state.finished
    with pytest.raises(IndexError, match="already holds"):
        state.append(np.array([0]))
    grid = np.array([[5, -1, 9], [5, 5, -1]])
    delay = _C.SequenceState(_C.TokenSchedule.delay(grid, 1, 8), np.array([[5, 5]]), 3)
    delay.append(np.array([1, 2]))
    delay.append(np.array([3, 4]))
    assert delay.outputs().tolist() == [[1, 5], [9, 4]]
    with pytest.raises(ValueError, match="exceed the schedule"):
        _C.SequenceState(_C.TokenSchedule.delay(grid, 1, 8), np.array([[5, 5]]), 4)
    with pytest.raises(ValueError, match="prompt rows hold 1 ids"):
        _C.SequenceState(_C.TokenSchedule.delay(grid, 1, 8), np.array([[5]]), 2)


def test_bad_step_inputs_are_refused_with_one_line_and_leave_the_batch_intact():
    seqs = [RefSequence(TimeMajorRef(2, 4, 0), [[1], [2]], 5, (1.0, 0, 1.0), seed=1, stream=0)]
    groups = native_states(seqs)
    batch = native_batch(seqs, groups)
    with pytest.raises(ValueError, match=r"logits must be \[members, heads, vocab\]"):
        batch.sample_and_advance(np.zeros((2, 1, 8), np.float32))
    with pytest.raises(ValueError, match="float32"):
        batch.sample_and_advance(np.zeros((1, 1, 8), np.float64))
    with pytest.raises(ValueError, match=r"group 0 head 0 has a NaN inside its vocab window \[0, 4\)"):
        batch.sample_and_advance(np.full((1, 1, 8), np.nan, np.float32))
    high = [RefSequence(TimeMajorRef(2, 4, 0, first_level=1), [[1]], 3, (1.0, 0, 1.0), seed=1, stream=0)]
    with pytest.raises(ValueError, match=r"vocab window \[4, 8\) holds no token of the 3-token vocabulary"):
        native_batch(high, native_states(high)).sample_and_advance(np.zeros((1, 1, 3), np.float32))
    assert groups[0][0].length == 2  # nothing was appended by the failed calls
    with pytest.raises(ValueError, match="one entry per group"):
        _C.DecodeBatch(4, groups, np.ones(2), np.zeros(1, np.int64), np.ones(1), np.zeros(1, np.uint64),
                       np.zeros(1, np.uint64), np.ones(1))
    with pytest.raises(ValueError, match="guided pair"):
        _C.DecodeBatch(4, [groups[0] * 3], np.ones(1), np.zeros(1, np.int64), np.ones(1), np.zeros(1, np.uint64),
                       np.zeros(1, np.uint64), np.ones(1))
    with pytest.raises(ValueError, match="drawn must be"):
        batch.advance(np.zeros((1, 2), np.int64))
    finished = batch.sample_and_advance(np.zeros((1, 1, 8), np.float32))
    assert finished.tolist() == [] and groups[0][0].length == 3


def test_device_path_draws_what_the_cpu_path_draws(monkeypatch):
    """The GPU path's step (guidance mix in torch, the Triton sampler on sampling_rows(), advance(drawn)), run here
    under the Triton interpreter, gives the same rows as sample_and_advance."""
    monkeypatch.setenv("VIVACE_TRITON_INTERPRET", "1")
    from vivace.kernels import dispatch

    assert dispatch.use_triton(torch.zeros(1))
    rng = random.Random(5)
    vocab, heads = 40, 2
    seqs = random_sequences(rng, 6, vocab=vocab, heads=heads, guided_share=0.5)
    steps = logit_steps(np.random.default_rng(5), seqs, vocab, heads)[:3]
    expected = run_native([RefSequence(**{**s.__dict__, "rows": [list(r) for r in s.rows]}) for s in seqs], steps, 1)
    groups = native_states(seqs)
    live = list(range(len(seqs)))
    for logits in steps:
        batch = native_batch([seqs[i] for i in live], [groups[i] for i in live])
        rows = [r for i in live for r in member_rows(seqs, i)]
        finished = set(dispatch.sample_and_advance(batch, logits[rows].contiguous()).tolist())
        live = [g for k, g in enumerate(live) if k not in finished]
    assert [group[0].rows().tolist() for group in groups] == expected
    assert any(s.guided for s in seqs)


@pytest.mark.parametrize("heads", [1, 3])
def test_step_plans_describe_the_steps_ahead(heads):
    """plan_steps(n): each step's windows and counters as sampling_rows gives them at that step, and next rows
    where(forced >= 0, forced, offset + drawn) as advance appends them."""
    rng = random.Random(20 + heads)
    seqs = random_sequences(rng, 5, vocab=50, heads=heads, guided_share=0.4)
    groups = native_states(seqs)
    batch = native_batch(seqs, groups)
    steps = batch.steps_left
    assert steps == min(s.max_len - len(s.rows) for s in seqs) >= 1
    plan = batch.plan_steps(steps)
    with pytest.raises(IndexError, match="only"):
        batch.plan_steps(steps + 1)
    draws = np.random.default_rng(heads)
    for i in range(steps):
        rows = batch.sampling_rows()
        assert rows["vocab_lo"].tolist() == plan["vocab_lo"][i].tolist()
        assert rows["vocab_hi"].tolist() == plan["vocab_hi"][i].tolist()
        assert rows["step"].tolist() == plan["step"][i].tolist()
        drawn = draws.integers(0, 50, (len(seqs), heads))
        expected = np.where(plan["forced"][i] >= 0, plan["forced"][i], plan["offset"] + drawn)
        batch.advance(drawn)
        assert [group[0].rows()[-1].tolist() for group in groups] == expected.tolist()
        assert all((group[-1].rows()[-1] == group[0].rows()[-1]).all() for group in groups)
