"""One EngineCore for every request: requests join and leave the running batch at any step, abort, preemption
across requests, admission limits, and the async front end. Every request must get exactly what it gets alone."""
from __future__ import annotations

import asyncio
import gc
import random
import resource
import threading
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from musicgen_checkpoints import converted_32khz_pack, one_thread  # noqa: F401 - autouse fixture
from vivace import AsyncEngine, AudioChunk, Engine, EngineBusy, Story, VivaceError, WindowFinished
from vivace.async_engine import Forward
from vivace.core.engine_core import CoreLimits, RequestOutput
from vivace.events import StageProgress, WindowStarted

# The codec decodes each request's chunks alone, from the same codes: its audio is the solo audio to rounding of
# the batched convolutions (see test_pipeline.AUDIO_TOL); tokens are equal exactly.
AUDIO_TOL = 1e-5


def solo(engine: Engine, prompt, seconds, seed: int, **options) -> tuple[dict, np.ndarray]:
    """(tokens by window, audio) of one request run alone."""
    events = list(engine.events(prompt, seconds, seed=seed, **options))
    return outcome(events)


def outcome(events: list) -> tuple[dict, np.ndarray]:
    tokens = {(e.stage, e.index): e.tokens for e in events if isinstance(e, WindowFinished)}
    chunks = sorted((e for e in events if isinstance(e, AudioChunk)), key=lambda c: c.index)
    return tokens, np.concatenate([c.pcm for c in chunks])


def run_joining(engine: Engine, calls: list[tuple], join_steps: list[int], abort_at: dict[int, int] | None = None) -> dict[int, list]:
    """Adds call i at core step join_steps[i] (and aborts it at abort_at[i]) and steps until all end; the events of
    each call by index."""
    abort_at = abort_at or {}
    events: dict[int, list] = defaultdict(list)
    ids: dict[int, int] = {}
    step = 0
    while len(ids) < len(calls) or engine.core.has_unfinished():
        for i, (prompt, seconds, seed, options) in enumerate(calls):
            if join_steps[i] == step:
                (spec,) = engine.requests(prompt, seconds, seed, options)
                (ids[i],) = engine.submit([spec], lambda output, i=i: events[i].extend(output.events))
            if abort_at.get(i) == step and i in ids:
                engine.abort([ids[i]])
        engine.step()
        step += 1
    return events


def idle_blocks(engine: Engine) -> dict[str, int]:
    return {stage: runner.allocator.num_free for stage, runner in engine.core.runners.items()}


def assert_idle(engine: Engine, blocks: dict[str, int]) -> None:
    core = engine.core
    assert not core.has_unfinished() and not core._owners and not engine._sinks
    for runner in core.runners.values():
        assert not runner.running and not runner.waiting
    assert idle_blocks(engine) == blocks


MUSICLM_CALLS = [
    ("slow solo piano", 1.3, 3, {}),
    ("a long piece", 3.5, 4, {}),  # three semantic windows
    (Story((("calm strings", 0.8), ("loud drums", 0.9))), None, 5, {}),  # story mode
    ("brushed drums", 0.9, 6, {"temperature": 0.7, "stage_sampling": {"fine": {"temperature": 0.0}}}),
    ("slow solo piano", 1.3, 7, {}),  # the first prompt again: shares its prefix blocks
]


def test_musiclm_requests_joining_at_random_steps_get_their_solo_outputs(engine: Engine) -> None:
    alone = [solo(engine, *call[:3], **call[3]) for call in MUSICLM_CALLS]
    blocks = idle_blocks(engine)
    join = [0, 3, 7, 20, 21]
    got = run_joining(engine, MUSICLM_CALLS, join)
    for i, (tokens, audio) in enumerate(alone):
        their_tokens, their_audio = outcome(got[i])
        assert their_tokens == tokens
        assert their_audio.shape == audio.shape and np.abs(their_audio - audio).max() <= AUDIO_TOL
    assert_idle(engine, blocks)


def test_fine_chunks_of_different_requests_decode_in_one_batch(engine: Engine) -> None:
    widths = []
    step = engine.core.runners["fine"].step

    def counting_step():
        widths.append(len(engine.core.runners["fine"].running))
        return step()

    engine.core.runners["fine"].step = counting_step
    try:
        run_joining(engine, MUSICLM_CALLS[:2], [0, 0])
    finally:
        del engine.core.runners["fine"].step
    assert max(widths) >= 2


def test_counters_count_each_requests_work(engine: Engine) -> None:
    """Tokens, KV reads and host time per stage, steps and pipeline time (what /metrics exports) only grow, and
    each request adds to every one of them."""
    def counters() -> dict[str, float]:
        values = {"steps": engine.core.steps, "request_s": engine.core.request_s}
        for stage, runner in engine.core.runners.items():
            for field in ("prefill_tokens", "decode_tokens", "context_tokens", "prefill_s", "decode_s"):
                values[f"{stage}.{field}"] = getattr(runner.stats, field)
        return values

    before = counters()
    for prompt, seconds, seed, options in MUSICLM_CALLS[:2]:
        engine.generate(prompt, seconds, seed=seed, **options)
        after = counters()
        assert all(after[name] > before[name] for name in before), (before, after)
        before = after


def test_abort_returns_every_block_and_leaves_the_others_unchanged(engine: Engine) -> None:
    calls = MUSICLM_CALLS[:3]
    alone = {i: solo(engine, *calls[i][:3], **calls[i][3]) for i in (0, 2)}
    blocks = idle_blocks(engine)
    got = run_joining(engine, calls, [0, 0, 2], abort_at={1: 12})
    assert not any(isinstance(e, AudioChunk) and e.index > 2 for e in got[1])  # it was cut off early
    for i in (0, 2):
        tokens, audio = outcome(got[i])
        assert tokens == alone[i][0] and np.abs(audio - alone[i][1]).max() <= AUDIO_TOL
    assert_idle(engine, blocks)


def test_a_pool_too_small_for_all_preempts_across_requests_and_resumes_exactly(engine: Engine) -> None:
    alone = [solo(engine, *call[:3], **call[3]) for call in MUSICLM_CALLS[:3]]
    one = {stage: -(-engine.family.max_sequence_tokens(stage) // engine.block_size) for stage in engine.core.runners}
    tight = Engine(engine.family, engine.device, engine.dtype, engine.block_size, engine.kv_cache_gb,
                   num_blocks={stage: blocks + 2 for stage, blocks in one.items()})
    blocks = idle_blocks(tight)
    got = run_joining(tight, MUSICLM_CALLS[:3], [0, 1, 2])
    assert sum(runner.stats.preemptions for runner in tight.core.runners.values()) > 0
    for i, (tokens, audio) in enumerate(alone):
        their_tokens, their_audio = outcome(got[i])
        assert their_tokens == tokens and np.abs(their_audio - audio).max() <= AUDIO_TOL
    assert_idle(tight, blocks)


def test_a_full_waiting_queue_raises_engine_busy_and_loses_nothing(engine: Engine) -> None:
    limited = Engine(engine.family, engine.device, engine.dtype, engine.block_size, engine.kv_cache_gb,
                     limits=CoreLimits(max_running=1, max_waiting=1))
    calls = [("soft piano", 0.6, 1, {}), ("cello", 0.6, 2, {})]
    events: dict[int, list] = defaultdict(list)
    for i, (prompt, seconds, seed, options) in enumerate(calls):
        limited.submit(limited.requests(prompt, seconds, seed, options), lambda output, i=i: events[i].extend(output.events))
    assert (limited.core.num_running, limited.core.num_waiting) == (0, 2)
    with pytest.raises(EngineBusy, match="engine busy: 0 requests running and 2 waiting"):
        limited.generate("bass", 0.6, seed=3)
    limited.step()
    assert (limited.core.num_running, limited.core.num_waiting) == (1, 1)
    with pytest.raises(EngineBusy):  # a call of two rows fits only whole: nothing of it is added
        limited.generate(["bass", "flute"], 0.6, seed=3)
    while limited.step():
        pass
    for i, (prompt, seconds, seed, _) in enumerate(calls):
        assert np.abs(outcome(events[i])[1] - engine.generate(prompt, seconds, seed=seed)[0]).max() <= AUDIO_TOL
    assert limited.generate("bass", 0.6, seed=3).shape == (1, round(0.6 * engine.sample_rate))


def test_bad_requests_fail_alone(engine: Engine) -> None:
    """A request that cannot run (its sequence needs more blocks than the pool has) fails with one line; the
    request beside it is unaffected."""
    small = Engine(engine.family, engine.device, engine.dtype, engine.block_size, engine.kv_cache_gb,
                   num_blocks={"semantic": 64, "coarse": 64, "fine": 8})
    good = small.stream("cello", 0.1, seed=2)
    first = next(good)
    with pytest.raises(VivaceError, match="stage 'fine'.*KV blocks"):
        small.generate("soft piano", 1.3, seed=1)
    rest = np.concatenate([first.pcm, *(c.pcm for c in good)])
    assert np.abs(rest - engine.generate("cello", 0.1, seed=2)[0]).max() <= AUDIO_TOL


def test_many_mixed_requests_leave_nothing_behind(engine: Engine) -> None:
    """200 requests of random lengths, in waves of up to 16 running at once, a fifth aborted at random steps: no
    blocks, sequences or request state remain, and memory stays flat."""
    rng = random.Random(0)
    blocks = idle_blocks(engine)

    def wave(count: int) -> None:
        calls = [(rng.choice(["piano", "drums", "pads"]), rng.choice([0.1, 0.2, 0.3]), rng.randrange(1000), {}) for _ in range(count)]
        join = [rng.randrange(4) for _ in range(count)]
        aborts = {i: join[i] + rng.randrange(1, 6) for i in range(count) if rng.random() < 0.2}
        run_joining(engine, calls, join, aborts)
        assert_idle(engine, blocks)

    for _ in range(4):  # warm-up: allocator caches, torch's workspaces
        wave(10)
    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(12):
        wave(16)
    gc.collect()
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 64 * 1024, f"peak RSS grew by {grown_kib} KiB over 192 requests"


def test_asyncio_clients_and_threads_share_one_async_engine(tiny_pack: Path) -> None:
    engine = Engine.from_pack(tiny_pack)
    calls = [(["piano", "drums", "pads", "strings"][i % 4], [0.2, 0.3, 0.5][i % 3], 100 + i) for i in range(20)]
    expected = [engine.generate(prompt, seconds, seed=seed)[0] for prompt, seconds, seed in calls]
    with AsyncEngine(engine) as shared:
        async def client(i: int) -> np.ndarray:
            prompt, seconds, seed = calls[i]
            return np.concatenate([chunk.pcm async for chunk in shared.stream_async(prompt, seconds, seed=seed)])

        async def clients() -> list[np.ndarray]:
            return await asyncio.gather(*(client(i) for i in range(16)))

        threaded: dict[int, np.ndarray] = {}

        def worker(i: int) -> None:
            prompt, seconds, seed = calls[i]
            threaded[i] = shared.generate(prompt, seconds, seed=seed)[0]

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(16, 20)]
        for thread in threads:
            thread.start()
        results = asyncio.run(clients())
        for thread in threads:
            thread.join(timeout=300)
    for i, audio in enumerate(results + [threaded[i] for i in range(16, 20)]):
        assert np.abs(audio - expected[i]).max() <= AUDIO_TOL, i
    assert not engine.core.has_unfinished()


def test_forward_hands_a_reader_only_what_it_reads() -> None:
    def progress(stage: str, done: int) -> StageProgress:
        return StageProgress(stage, done, 10)

    window = WindowStarted("fine", 0, 0, 0, 0, 4, ())
    chunk = AudioChunk(0, 0, 0, np.zeros(8, np.float32), np.zeros((2, 4), np.int64))
    got: list[RequestOutput] = []
    forward = Forward(got.append, audio_only=False)
    forward(RequestOutput(1, [progress("fine", 1)]))
    forward(RequestOutput(1, [progress("fine", 2), progress("coarse", 1)]))
    assert got == []  # progress alone does not wake the reader
    forward(RequestOutput(1, [window]))
    assert got[-1].events == [progress("fine", 2), progress("coarse", 1), window]
    forward(RequestOutput(1, [progress("fine", 3)], finished=True))
    assert got[-1].events == [progress("fine", 3)] and got[-1].finished
    audio: list[RequestOutput] = []
    forward = Forward(audio.append, audio_only=True)
    forward(RequestOutput(2, [window, progress("fine", 1)]))
    assert audio == []
    forward(RequestOutput(2, [window, chunk, progress("fine", 2)]))
    assert audio[-1].events == [chunk]
    forward(RequestOutput(2, [progress("fine", 3)], finished=True, error="bad"))
    assert audio[-1].events == [] and audio[-1].error == "bad"


def test_async_events_are_the_offline_events_with_progress_merged(tiny_pack: Path) -> None:
    engine = Engine.from_pack(tiny_pack)
    offline = list(engine.events("piano", 0.5, seed=4))
    with AsyncEngine(engine) as shared:
        async def read() -> list:
            return [event async for event in shared.events_async("piano", 0.5, seed=4)]

        events = asyncio.run(read())

    def kept(items: list) -> list:
        return [(type(e).__name__, e.stage if hasattr(e, "stage") else e.index) for e in items if not isinstance(e, StageProgress)]

    assert kept(events) == kept(offline)
    last = {e.stage: e for e in offline if isinstance(e, StageProgress)}
    assert {e.stage: e for e in events if isinstance(e, StageProgress)} == last
    assert len([e for e in events if isinstance(e, StageProgress)]) < len([e for e in offline if isinstance(e, StageProgress)])
    audio = np.concatenate([e.pcm for e in events if isinstance(e, AudioChunk)])
    assert np.array_equal(audio, np.concatenate([e.pcm for e in offline if isinstance(e, AudioChunk)]))


def test_cancelling_an_async_consumer_aborts_its_request(tiny_pack: Path) -> None:
    engine = Engine.from_pack(tiny_pack)
    blocks = idle_blocks(engine)
    with AsyncEngine(engine) as shared:
        async def leave_early() -> None:
            async for _ in shared.stream_async("piano", 3.0, seed=1):
                break

        async def cancelled() -> None:
            first_chunk = asyncio.Event()

            async def consume() -> None:
                async for _ in shared.stream_async("drums", 3.0, seed=2):
                    first_chunk.set()

            task = asyncio.create_task(consume())
            await first_chunk.wait()  # running, with audio still to come
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(leave_early())
        asyncio.run(cancelled())
        generator = shared.stream("pads", 3.0, seed=3)
        next(generator)
        generator.close()
    assert_idle(engine, blocks)


@pytest.fixture(scope="module")
def musicgen(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    # 1 s windows with a 0.6 s stride: a 1.6 s clip runs two windows (a continuation among them)
    pack = converted_32khz_pack(tmp_path_factory.mktemp("musicgen_core"), seed=6, window_s=1.0, stride_s=0.6)
    return Engine.from_pack(pack)


def test_guided_pairs_of_different_requests_share_decode_steps(musicgen: Engine) -> None:
    calls = [
        ("warm synth pads", 1.6, 4, {}),
        ("fast drums", 0.5, 5, {"guidance_scale": 1.0}),  # unguided beside guided pairs
        ("calm guitar", 1.0, 6, {"top_k": 10}),
        ("warm synth pads", 1.6, 7, {"chunk_s": 0.3}),  # streamed
    ]
    alone = [solo(musicgen, *call[:3], **call[3]) for call in calls]
    widths = []
    runner = musicgen.core.runners["decoder"]
    step = runner.step

    def counting_step():
        widths.append(sum(len(seq.members) for seq in runner.running))
        return step()

    runner.step = counting_step
    try:
        got = run_joining(musicgen, calls, [0, 2, 9, 15])
    finally:
        del runner.step
    assert max(widths) >= 6  # three guided pairs in one decode batch
    for i, (tokens, audio) in enumerate(alone):
        their_tokens, their_audio = outcome(got[i])
        assert their_tokens == tokens
        np.testing.assert_array_equal(their_audio, audio)
