"""KV pools (and the device loops on them) kept across an engine's generations; concurrent generations never share."""
import warnings

import pytest

from musicgen_checkpoints import TinyMusicGen, write_checkpoint
from vivace import Engine
from vivace.events import WindowFinished
from vivace.export.musicgen import convert_musicgen
from vivace.kv_cache import KVCachePool
from vivace.pack import STAGES


def tokens(events) -> list:
    return [(e.stage, e.row, e.index, e.tokens) for e in events if isinstance(e, WindowFinished)]


def free_pools(engine: Engine) -> dict:
    return {stage: lease.pool for stage, lease in engine.pool_leases._free.items()}


def test_a_generation_reuses_the_pools_of_the_one_before(tiny_pack) -> None:
    engine = Engine.from_pack(tiny_pack)
    first = tokens(engine.events("soft piano", 0.6, seed=1))
    pools = free_pools(engine)
    assert set(pools) == {"semantic", "coarse", "fine"}
    assert tokens(engine.events("soft piano", 0.6, seed=1)) == first
    assert all(free_pools(engine)[stage] is pool for stage, pool in pools.items())


def test_interleaved_generations_get_their_own_pools(tiny_pack) -> None:
    engine = Engine.from_pack(tiny_pack)
    alone = [tokens(engine.events(p, 0.6, seed=s)) for p, s in (("drums", 2), ("cello", 3))]
    first, second = engine.events("drums", 0.6, seed=2), engine.events("cello", 3 * 0.2, seed=3)
    got: list[list] = [[], []]
    pending = [iter(first), iter(second)]
    while any(pending):  # one event of each in turn: both run at once
        for i, events in enumerate(pending):
            if events is None:
                continue
            event = next(events, None)
            if event is None:
                pending[i] = None
            elif isinstance(event, WindowFinished):
                got[i].append((event.stage, event.row, event.index, event.tokens))
    assert got == alone


def test_a_closed_generation_gives_its_pools_back(tiny_pack) -> None:
    engine = Engine.from_pack(tiny_pack)
    events = engine.events("bass", 0.6, seed=0)
    next(events)
    assert not free_pools(engine)
    events.close()
    assert set(free_pools(engine)) == {"semantic", "coarse", "fine"}


def test_a_new_pool_size_replaces_the_free_one(tiny_pack) -> None:
    engine = Engine.from_pack(tiny_pack)

    def least_gb(stage: str) -> float:  # the budget whose share holds one longest window of the stage
        cfg = engine.config.stages[stage]
        per_block = KVCachePool.bytes_per_block(cfg.num_layers, engine.block_size, cfg.num_heads, cfg.head_dim, engine.dtype)
        return len(STAGES) * -(-engine.max_sequence_tokens(stage) // engine.block_size) * per_block / 2**30

    stage = max(STAGES, key=least_gb)  # the stage whose pool the budget sizes
    engine.kv_cache_gb = 4 * least_gb(stage)
    engine.generate("bass", 0.2)
    before = free_pools(engine)[stage]
    engine.kv_cache_gb = 2 * least_gb(stage)
    engine.generate("bass", 0.2)
    after = free_pools(engine)[stage]
    assert after is not before and after.num_blocks < before.num_blocks


def test_device_loops_outlive_a_generation(monkeypatch: pytest.MonkeyPatch, tiny_pack) -> None:
    """With several steps per sync, the second generation runs its batches on the loops the first one built, whose
    counts of runs per piece length (what decides when a graph is captured) go on growing."""
    monkeypatch.setenv("VIVACE_TRITON_INTERPRET", "1")
    engine = Engine.from_pack(tiny_pack, steps_per_sync=4)
    first = tokens(engine.events("soft piano", 0.2, seed=2))
    loops = {stage: dict(lease.device_loops.loops) for stage, lease in engine.pool_leases._free.items()}
    runs = {stage: {b: dict(loop.runs) for b, loop in per.items()} for stage, per in loops.items()}
    assert any(runs.values())
    assert tokens(engine.events("soft piano", 0.2, seed=2)) == first
    for stage, lease in engine.pool_leases._free.items():
        for bucket, loop in lease.device_loops.loops.items():
            if bucket in loops[stage]:
                assert loop is loops[stage][bucket] and sum(loop.runs.values()) > sum(runs[stage][bucket].values())


def test_musicgen_loops_let_go_of_encoder_states(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """MusicGen's guided pairs with cross-attention: between generations the loops keep their buffers but not the
    encoder states (nor graphs reading them), and the next generation draws the same tokens on them."""
    monkeypatch.setenv("VIVACE_TRITON_INTERPRET", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src = write_checkpoint(tmp_path / "src", TinyMusicGen(seed=8))
    pack = convert_musicgen(src, tmp_path / "pack")
    engine = Engine.from_pack(pack, steps_per_sync=8)
    first = tokens(engine.events(["soft piano", "drums"], duration_s=0.1, seed=2))
    loops = dict(engine.pool_leases._free["decoder"].device_loops.loops)
    assert loops and all(loop.batch is None and loop.attention.cross is None and not loop.graphs for loop in loops.values())
    assert tokens(engine.events(["soft piano", "drums"], duration_s=0.1, seed=2)) == first
    assert engine.pool_leases._free["decoder"].device_loops.loops == loops
