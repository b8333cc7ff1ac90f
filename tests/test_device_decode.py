"""Several decode steps per host sync (vivace.core.device_decode) draw what one step per sync draws.

Run on the CPU through the Triton interpreter (VIVACE_TRITON_INTERPRET=1 routes the engine's attention and sampling
to the Triton kernels), so both sides run the same kernels; CUDA graphs need a GPU and are not exercised here."""
import random
import warnings

import numpy as np
import pytest
import torch
from musicgen_checkpoints import TinyMusicGen, write_checkpoint
from stage_models import make_model

from vivace import Engine, VivaceError
from vivace.core.device_decode import GRAPH_STEPS, Bucket, DeviceDecodeLoop
from vivace.core.kv_cache import KVCachePool
from vivace.core.model_runner import DecodeOptions, decode_batch
from vivace.core.sampling import SamplingParams
from vivace.core.sequence import DelaySchedule, Sequence, TimeMajorSchedule
from vivace.core.stage_runner import StageRunner
from vivace.events import WindowFinished
from vivace.export.musicgen import convert_musicgen


@pytest.fixture(autouse=True)
def interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIVACE_TRITON_INTERPRET", "1")


def run(seqs: list[Sequence], steps_per_sync: int, num_blocks: int, cross: bool = False) -> StageRunner:
    model = make_model("t5_relative" if not cross else "sinusoidal", cross=cross, seed=3)
    c = model.config
    pool = KVCachePool(c.num_layers, num_blocks, 4, c.num_heads, c.head_dim, torch.float32, "cpu")
    pool.data.fill_(float("nan"))  # a slot read before it is written poisons the logits
    runner = StageRunner("test", model, pool, torch.device("cpu"), DecodeOptions(steps_per_sync=steps_per_sync))
    for seq in seqs:
        runner.add(seq)
    with torch.no_grad():
        while runner.has_work:
            runner.step()
    assert runner.allocator.num_free == num_blocks
    return runner


def time_major(prompts: list[list[int]]) -> list[Sequence]:
    schedule = TimeMajorSchedule(num_levels=2, codebook_size=12, input_offset=16)
    return [
        Sequence(i, p, 9 + 2 * i, schedule, SamplingParams(temperature=1.0, top_k=8 if i % 2 else 0), seed=7, stream=i, priority=(i,))
        for i, p in enumerate(prompts)
    ]


def test_context_tokens_count_every_key_a_decode_step_reads() -> None:
    """A row's decode step i (after the prefill's first token) attends to its prompt and i drawn tokens; runs of
    several steps per sync count the same keys as single steps."""
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10]]
    expected = sum(len(p) + i for s, p in enumerate(prompts) for i in range(1, 9 + 2 * s))
    for steps_per_sync in (1, 4):
        assert run(time_major(prompts), steps_per_sync, 200).stats.context_tokens == expected


@pytest.mark.parametrize("num_blocks", [200, 14])
def test_time_major_sequences_draw_the_same_tokens(num_blocks: int) -> None:
    """Sequences of different lengths finish at different steps; a tight pool makes runs fall back to single steps
    (and preempt)."""
    rng = random.Random(0)
    prompts = [[rng.randrange(40) for _ in range(rng.randint(3, 9))] for _ in range(4)]
    single = time_major(prompts)
    run(single, 1, num_blocks)
    several = time_major(prompts)
    runner = run(several, 5, num_blocks)
    assert [s.output_ids for s in several] == [s.output_ids for s in single]
    assert runner.stats.device_runs > 0


def test_guided_delay_pattern_sequences_draw_the_same_tokens() -> None:
    """MusicGen's shape: two codebooks under a delay grid, guided pairs with cross-attention conditions."""
    from vivace.core.sequence import CrossCondition

    def sequences() -> list[Sequence]:
        torch.manual_seed(1)
        model = make_model("sinusoidal", cross=True, seed=3)
        out = []
        for i in range(3):
            length = 12 + 3 * i
            grid = np.full((2, length), -1, dtype=np.int64)
            grid[:, 0] = 24
            grid[1, 1] = 24
            prompt = [tuple(grid[:, 0])]
            schedule = DelaySchedule(grid, 1, 24)
            states = torch.randn(1, 5, 12)
            with torch.no_grad():
                keys, values = model.encode_cross(states)
            cond = CrossCondition([k[0] for k in keys], [v[0] for v in values], torch.ones(5, dtype=torch.bool))
            null = CrossCondition([k[0] * 0 for k in keys], [v[0] * 0 for v in values], torch.zeros(5, dtype=torch.bool))
            sampling = SamplingParams(temperature=1.0, top_k=10)
            seq = Sequence(2 * i, prompt, length - 1, schedule, sampling, seed=5, stream=i, priority=(i,), cross=cond, cache_salt=("c", i))
            seq.guide(Sequence(2 * i + 1, prompt, length - 1, schedule, sampling, seed=5, stream=i, priority=(i,), cross=null, cache_salt=("n", i)), 3.0)
            out.append(seq)
        return out

    single, several = sequences(), sequences()
    run(single, 1, 200, cross=True)
    assert run(several, 4, 200, cross=True).stats.device_runs > 0
    assert [s.rows for s in several] == [s.rows for s in single]
    assert [s.null.rows for s in several] == [s.rows for s in single]


def test_batches_of_one_bucket_share_its_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sequences finish one after another: every batch goes to the loop of its bucket (rows and groups rounded up to
    powers of two), a loop serves several batches (rows past a batch are padding that must not touch the cache or
    the drawn tokens), and the tokens are those of one step per sync."""
    bound: list[tuple[Bucket, int, int]] = []
    bind = DeviceDecodeLoop.bind

    def recording_bind(loop: DeviceDecodeLoop, batch, cross) -> None:
        bound.append((loop.bucket, id(loop), batch.num_groups))
        bind(loop, batch, cross)

    monkeypatch.setattr(DeviceDecodeLoop, "bind", recording_bind)
    prompts = [[3 + i, 5, 7 + i] for i in range(6)]
    single = time_major(prompts)
    run(single, 1, 200)
    several = time_major(prompts)
    run(several, 3, 200)
    assert [s.output_ids for s in several] == [s.output_ids for s in single]
    sizes = [groups for _, _, groups in bound]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) >= 4  # 6, 5, ... groups as sequences finish
    for bucket, loop_id, groups in bound:
        assert bucket.groups == bucket.members == 1 << (groups - 1).bit_length()
    loops = {loop_id for _, loop_id, _ in bound}
    assert len(loops) == len({bucket for bucket, _, _ in bound}) < len(bound)  # one loop per bucket, reused


def test_runs_longer_than_one_graph_chain_its_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """steps_per_sync 40: each run replays pieces of at most GRAPH_STEPS steps (16, 16, then the rest), the plan's rows
    copied on the device before each piece, and draws what one step per sync draws."""
    pieces: list[int] = []
    piece = DeviceDecodeLoop._piece

    def recording_piece(loop: DeviceDecodeLoop, steps: int) -> None:
        pieces.append(steps)
        piece(loop, steps)

    monkeypatch.setattr(DeviceDecodeLoop, "_piece", recording_piece)
    schedule = TimeMajorSchedule(num_levels=2, codebook_size=12, input_offset=16)

    def sequences() -> list[Sequence]:
        return [Sequence(i, [2 + i, 9], 44 + 3 * i, schedule, SamplingParams(temperature=1.0, top_k=6), seed=3,
                         stream=i, priority=(i,)) for i in range(2)]

    single, several = sequences(), sequences()
    run(single, 1, 200)
    runner = run(several, 40, 200)
    assert [s.output_ids for s in several] == [s.output_ids for s in single]
    assert max(pieces) == GRAPH_STEPS and len(pieces) > runner.stats.device_runs


def test_bucket_rounds_groups_and_rows_up_to_a_power_of_two() -> None:
    schedule = TimeMajorSchedule(num_levels=2, codebook_size=12, input_offset=16)
    seqs = [Sequence(i, [1, 2], 40 + i, schedule, SamplingParams(), seed=0, stream=i, priority=(i,)) for i in range(3)]
    for seq in seqs:
        seq.state.add_block(0)
    batch = decode_batch(seqs, 4)
    assert (batch.num_groups, batch.num_members, batch.table_width) == (3, 3, 11)
    assert Bucket.of(batch) == Bucket(groups=4, members=4, table_width=11, heads=1)


def test_musicgen_engine_with_steps_per_sync(tmp_path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src = write_checkpoint(tmp_path / "src", TinyMusicGen(seed=8))
    pack = convert_musicgen(src, tmp_path / "pack")

    def tokens(engine: Engine) -> list:
        return [e.tokens for e in engine.events(["soft piano", "drums"], duration_s=0.1, seed=2) if isinstance(e, WindowFinished)]

    assert tokens(Engine.from_pack(pack, steps_per_sync=8)) == tokens(Engine.from_pack(pack))


def test_options_are_checked(monkeypatch: pytest.MonkeyPatch, tiny_pack) -> None:
    with pytest.raises(VivaceError, match="steps_per_sync must be an integer"):
        Engine.from_pack(tiny_pack, steps_per_sync=0)
    with pytest.raises(VivaceError, match="cuda_graphs needs a CUDA device"):
        Engine.from_pack(tiny_pack, steps_per_sync=4, cuda_graphs=True)
    monkeypatch.delenv("VIVACE_TRITON_INTERPRET")
    with pytest.raises(VivaceError, match="samples on the device with Triton"):
        Engine.from_pack(tiny_pack, steps_per_sync=4)
