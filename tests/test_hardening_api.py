"""Bad input through the Python API (issue #19): every bad argument is one VivaceError line naming it, raised before
any work, and both families read the same arguments the same way."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from musicgen_checkpoints import converted_32khz_pack, one_thread  # noqa: F401 - autouse fixture

from vivace import Engine, SamplingParams, Story, VivaceError

NO_PACK = "/nonexistent/pack"  # from_pack must refuse the argument before it looks for the pack


@pytest.fixture(scope="module")
def musicgen(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    return Engine.from_pack(converted_32khz_pack(tmp_path_factory.mktemp("hardening"), seed=6, window_s=1.0, stride_s=0.6))


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# -- 1. durations shorter than one codec frame -------------------------------------------------------------------
@pytest.mark.parametrize("call", ["generate", "stream", "events"])
def test_durations_shorter_than_one_frame_are_refused_by_both_families(engine: Engine, musicgen: Engine, call: str) -> None:
    for eng in (engine, musicgen):
        frame_s = eng.config.codec.hop_length / eng.sample_rate
        with pytest.raises(VivaceError, match="shorter than one codec frame") as error:
            getattr(eng, call)("piano", 0.4 * frame_s)
        assert "durations round to whole frames" in one_line(error)


def test_durations_round_to_whole_frames(engine: Engine) -> None:
    hop = engine.config.codec.hop_length
    frame_s = hop / engine.sample_rate
    assert engine.generate("piano", 0.6 * frame_s, seed=1).shape == (1, hop)  # rounds up to one frame
    assert engine.generate("piano", 3.4 * frame_s, seed=1).shape == (1, 3 * hop)


def test_story_segments_too_short_to_be_heard_are_refused(engine: Engine) -> None:
    frame_s = engine.config.codec.hop_length / engine.sample_rate
    with pytest.raises(VivaceError, match="story segment 2 of .* shorter than one codec frame"):
        engine.events(Story((("calm piano", 1.0), ("drums", 0.4 * frame_s))))
    # one frame long, but its boundaries round to the same semantic token: its prompt would never play
    token_s = 1 / engine.config.musiclm.semantic_rate
    assert round(frame_s / token_s) == 0
    with pytest.raises(VivaceError, match=r"story segment 1 \('calm piano', .*\) rounds to no semantic token"):
        engine.events(Story((("calm piano", frame_s), ("drums", 1.0))))


# -- 2. the device, before the pack loads ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "device,message",
    [
        ("tpu", "unknown device 'tpu'"),
        ("", "unknown device ''"),
        ("cuda:-1", "unknown device 'cuda:-1'"),
        ("meta", "device type 'meta' is not supported"),
        ("cpu:2", "device 'cpu:2' does not exist"),
        (0, "device must be a string"),
    ],
)
def test_unknown_devices_are_refused_before_the_pack_loads(device, message: str) -> None:
    with pytest.raises(VivaceError, match=message) as error:
        Engine.from_pack(NO_PACK, device=device)
    one_line(error)


def test_cuda_on_this_machine_without_it_or_past_its_devices_is_refused() -> None:
    bad = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    with pytest.raises(VivaceError, match=f"device '{bad}' (is not available|does not exist)"):
        Engine.from_pack(NO_PACK, device=bad)


def test_cuda_unavailable_and_index_out_of_range(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(VivaceError, match="device 'cuda' is not available"):
        Engine.from_pack(NO_PACK, device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(VivaceError, match=r"device 'cuda:2' does not exist: this machine has 2 CUDA devices \(cuda:0 to cuda:1\)"):
        Engine.from_pack(NO_PACK, device=torch.device("cuda", 2))
    with pytest.raises(VivaceError, match="not a pack"):  # a good device gets as far as looking for the pack
        Engine.from_pack(NO_PACK, device="cuda:1")


# -- 3. argument types ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "call,message",
    [
        (dict(stage_sampling={"fine": {"temp": 1}}), r"unknown sampling argument 'temp' in stage_sampling\['fine'\]"),
        (dict(stage_sampling={"fine": 0.5}), r"stage_sampling\['fine'\] must be a dict .* got 0.5"),
        (dict(stage_sampling=[("fine", {})]), "stage_sampling must be a dict"),
        (dict(stage_sampling={"vocals": {}}), "stage_sampling names unknown stage 'vocals' .*semantic, coarse, fine"),
        (dict(stage_sampling={"fine": {"temperature": "hot"}}), r"stage_sampling\['fine'\] temperature .* got 'hot'"),
        (dict(stage_sampling={"coarse": {"top_k": True}}), r"stage_sampling\['coarse'\] top_k .* got True"),
        (dict(duration_s="2"), "duration must be a number of seconds, got '2'"),
        (dict(duration_s=True), "duration must be a number of seconds, got True"),
        (dict(seed=True), r"seed must be an integer in \[0, 2\*\*63\), got True"),
        (dict(seed=1.0), "seed must be an integer .* got 1.0"),
        (dict(temperature=True), "temperature .* got True"),
        (dict(temperature="1"), "temperature .* got '1'"),
        (dict(top_k="1"), "top_k .* got '1'"),
        (dict(top_k=True), "top_k .* got True"),
        (dict(top_k=2.5), "top_k .* got 2.5"),
        (dict(top_p="0.5"), "top_p .* got '0.5'"),
        (dict(top_p=True), "top_p .* got True"),
        (dict(temperature=10**400), "temperature .* got 1000"),
        (dict(duration_s=-(10**400)), "duration must be > 0 seconds"),
        (dict(duration_s=10**400), "exceeds this pack's limit"),
    ],
)
def test_wrong_types_are_refused_naming_the_argument(engine: Engine, call: dict, message: str) -> None:
    args = {"prompt": "piano", "duration_s": 0.5, **call}
    with pytest.raises(VivaceError, match=message) as error:
        engine.generate(**args)
    one_line(error)


def test_wrong_types_are_refused_by_musicgen_too(musicgen: Engine) -> None:
    for call, message in [
        (dict(duration_s="2"), "duration must be a number of seconds, got '2'"),
        (dict(seed=True), "seed must be an integer"),
        (dict(top_p=True), "top_p .* got True"),
        (dict(guidance_scale=True), "guidance_scale .* got True"),
        (dict(stage_sampling={"decoder": 0.5}), r"stage_sampling\['decoder'\] must be a dict"),
    ]:
        with pytest.raises(VivaceError, match=message):
            musicgen.generate(**{"prompt": "piano", "duration_s": 0.5, **call})


def test_numpy_numbers_are_numbers(engine: Engine) -> None:
    [request] = engine.requests("piano", np.float32(0.5), np.int64(3), {"temperature": np.float64(0.5), "top_k": np.int64(4)})
    assert request.seed == 3 and type(request.seed) is int
    assert request.segments[0][1] == 0.5
    fine = request.sampling["fine"]
    assert (fine.temperature, fine.top_k) == (0.5, 4) and type(fine.top_k) is int and type(fine.temperature) is float


# -- 4. kv_cache_gb, and validation before any work ---------------------------------------------------------------
@pytest.mark.parametrize("kv_cache_gb", [float("inf"), float("nan"), 0, -1.0, "4", True, None])
def test_impossible_kv_cache_is_refused_before_the_pack_loads(kv_cache_gb) -> None:
    with pytest.raises(VivaceError, match="kv_cache_gb must be a finite number > 0"):
        Engine.from_pack(NO_PACK, kv_cache_gb=kv_cache_gb)


def test_kv_cache_too_small_for_one_sequence_is_refused_by_from_pack(tiny_pack: Path) -> None:
    with pytest.raises(VivaceError, match="kv_cache_gb leaves stage 'semantic' room for 0 KV blocks; its longest sequence needs") as error:
        Engine.from_pack(tiny_pack, kv_cache_gb=1e-6)
    one_line(error)


@pytest.mark.parametrize("call", ["generate", "stream", "events"])
def test_a_bad_call_does_no_work(engine: Engine, monkeypatch: pytest.MonkeyPatch, call: str) -> None:
    def no_work(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(engine, "submit", no_work)
    monkeypatch.setattr(engine.family.pack.text, "tokens", no_work)  # the prompts' conditioning
    for bad in [dict(top_k="8"), dict(stage_sampling={"fine": {"temp": 1}}), dict(seed=[0, True])]:
        with pytest.raises(VivaceError):
            getattr(engine, call)(["piano", "drums"], 0.5, **{"seed": 0, **bad})
    assert not engine.core.has_unfinished()


# -- 5. seed messages -----------------------------------------------------------------------------------------------
def test_a_seed_that_overflows_for_a_later_row_names_the_row(engine: Engine) -> None:
    top = 2**63 - 1
    with pytest.raises(VivaceError, match=r"seed 9223372036854775807 \+ row 1 exceeds 2\*\*63-1") as error:
        engine.requests(["a", "b"], 0.5, top, {})
    assert "9223372036854775808" not in one_line(error)
    assert [r.seed for r in engine.requests(["a", "b"], 0.5, top - 1, {})] == [top - 1, top]
    with pytest.raises(VivaceError, match=r"seed\[1\] must be an integer in \[0, 2\*\*63\), got -1"):
        engine.requests(["a", "b"], 0.5, [0, -1], {})
    with pytest.raises(VivaceError, match="got 3 seeds for 2 prompts"):
        engine.requests(["a", "b"], 0.5, [0, 1, 2], {})


def test_a_numpy_seed_still_gives_each_row_its_own(engine: Engine) -> None:
    assert [r.seed for r in engine.requests(["a", "b", "c"], 0.5, np.int64(7), {})] == [7, 8, 9]


# -- 6. the same arguments across families -------------------------------------------------------------------------
def test_chunk_s_is_refused_where_it_has_no_meaning(engine: Engine, musicgen: Engine) -> None:
    fine_chunk_s = engine.config.musiclm.fine_chunk_s
    for call in ("stream", "events", "generate"):
        with pytest.raises(VivaceError, match=f"chunk_s 0.25 does not apply to MusicLM pack .*fine stage's chunks of {fine_chunk_s} s"):
            getattr(engine, call)("piano", 0.5, chunk_s=0.25)
    with pytest.raises(VivaceError, match="does not apply to MusicLM"):
        engine.stream("piano", 0.5, chunk_s=None)  # no whole decode to ask for either
    with pytest.raises(VivaceError, match=r"chunk_s 0.25 is for stream\(\) and events\(\): generate\(\) decodes each clip whole"):
        musicgen.generate("piano", 0.5, chunk_s=0.25)
    # a whole clip is what generate returns either way
    np.testing.assert_array_equal(engine.generate("piano", 0.2, seed=2, chunk_s=None), engine.generate("piano", 0.2, seed=2))
    assert musicgen.requests("piano", 0.5, 0, musicgen.family.whole_options({"chunk_s": None}))[0].chunk_frames is None


def test_musicgen_stage_sampling_names_its_one_stage(musicgen: Engine) -> None:
    default = musicgen.config.musicgen.sampling

    def sampling(**options) -> SamplingParams:
        return musicgen.requests("piano", 0.5, 0, options)[0].sampling

    assert sampling(stage_sampling={"decoder": {"top_k": 3}}) == SamplingParams(default.temperature, 3, default.top_p)
    # the stage's entry wins over the call's values, as MusicLM's per-stage entries do
    assert sampling(top_k=7, temperature=0.5, stage_sampling={"decoder": {"top_k": 3}}) == SamplingParams(0.5, 3, default.top_p)
    assert sampling(stage_sampling={"decoder": SamplingParams(0.0, 2, 0.5)}) == SamplingParams(0.0, 2, 0.5)
    assert sampling(stage_sampling={}) == sampling()
    with pytest.raises(VivaceError, match=r"stage_sampling names unknown stage 'fine' \(this pack's stages: decoder\)"):
        sampling(stage_sampling={"fine": {"temperature": 0.0}})


def test_a_list_of_pairs_is_one_story_and_a_list_of_stories_a_batch(engine: Engine, musicgen: Engine) -> None:
    [story] = engine.requests([("calm piano", 0.3), ("drums", 0.4)], None, 5, {})
    assert story.segments == (("calm piano", 0.3), ("drums", 0.4))
    first, second = Story((("calm piano", 0.3), ("drums", 0.4))), Story((("strings", 0.5),))
    rows = engine.requests([first, second], None, 5, {})
    assert [(r.row, r.segments, r.seed) for r in rows] == [(0, first.segments, 5), (1, second.segments, 6)]
    audio = engine.generate([first, second], seed=5)
    hop = engine.config.codec.hop_length
    assert audio.shape == (2, 35 * hop)  # the longer story's 0.7 s; the shorter row is padded with zeros
    assert np.abs(audio[0]).max() > 0 and np.abs(audio[1, : 25 * hop]).max() > 0
    assert not audio[1, 25 * hop :].any()
    with pytest.raises(VivaceError, match="story mode"):
        musicgen.generate([first, second])
