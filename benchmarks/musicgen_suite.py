"""MusicGen suite: a MusicGen-small-shaped random checkpoint through transformers' generate and through vivace.

The checkpoint (built once with transformers, save_pretrained, then `vivace convert musicgen SRC OUT`):
decoder 24 layers, width 1024, 16 heads, FFN 4096, 4 x 2048 codebooks (MusicGen-small's); EnCodec 32 kHz with
facebook/encodec_32khz's configuration; a small random T5 text encoder (2 layers, width 256, 8 heads, FFN 1024,
a word-level vocabulary of 43 words) projected to 1024 by enc_to_dec_proj. Random weights are rescaled so that
the decoder's next-token distributions are peaked rather than uniform (unit-gain linears, heads giving logits
of standard deviation ~2): agreement figures then measure numerical drift on a random model, not quality.

Runs, all with the same weights, prompt, seed, top-k 250, temperature 1 and guidance 3.0 (conditional and null
rows in one batch), at batch 1, each after one short untimed warm-up generation:
- transformers MusicgenForConditionalGeneration.generate in float32; ms/step from a logits processor that
  stamps every step; its audio comes back at the end, so time to first audio is the whole call;
- vivace in float32, bfloat16, int8 (int8 weight-only stage linears, float32 elsewhere) and int8+bf16;
  ms/step from the pipeline's StageProgress events (one per decode step); time to first audio from the
  first AudioChunk (engine.stream is engine.events filtered to AudioChunk; MusicGen's EnCodec is not causal,
  so a row's audio arrives once all its frames exist); on CUDA also bfloat16 with 16 decode steps per host sync
  replayed as CUDA graphs, whose ms/step divides each interval between progress events by the steps it covers.
Agreement of each reduced-byte mode against float32: float32 greedy sequences (temperature 0, guidance 3.0)
are generated once; every mode then runs them teacher-forced (forward_dense, conditional and null rows, logits
mixed as null + 3 * (cond - null)) and is compared with float32 on the drawn (not forced) positions: the share
of positions whose argmax is the float32 greedy token, and the mean KL(float32 || mode) of the full next-token
distributions (temperature 1, before top-k). That teacher forcing runs without a KV cache, so it cannot see a mode's
KV cache dtype; "cached agree" and "cached KL" are the same figures with the grids prefilled through the paged cache
in the mode's KV dtype (every position attends to keys and values as the cache stores them), against float32 with
float32 caches prefilled the same way (float32's run records how far its cached logits are from its dense ones,
cached_vs_dense_max_rel, relative to their largest). "greedy prefix": each mode decodes the same prompts greedily on its own, and
the figure is the share of float32's greedy frames it reproduces before its first differing token.
--modes runs only the named vivace modes (float32, the reference, always runs).
- vivace with bfloat16 or int8 KV caches under float32 and int8 weights ("float32 kv-bf16", "int8 kv-bf16",
  "float32 kv-int8", "int8 kv-int8"; CPU only).
- vivace with 4-bit group-wise layer weights and int8 heads ("int4", "int4 kv-bf16", "int4 kv-int8"; CPUs with AVX-512 VNNI or AVX2), and
  with bfloat16 weights under float32 activations ("bf16-weights", quantize="bfloat16"; CPUs with AVX-512).
"""
from __future__ import annotations

import logging
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import ROOT, Options, PeakRSS, release_memory, table, write_result
from vivace import AudioChunk, Engine, WindowFinished, _C
from vivace.core.kv_cache import KVCachePool
from vivace.events import StageProgress
from vivace.families.musicgen.pipeline import delayed_grid
from vivace.model.int4 import int4_supported
from vivace.model.quant import native_kernels
from vivace.model.transformer import AttentionBatch, CrossBatch

WORDS = (
    "a the slow fast mellow upbeat piano drums jazz rock ambient pads with and in of bass guitar strings choir loud "
    "soft hip hop lo-fi beat trio solo cello synth arpeggio warm bright dark epic calm groove melody harmony"
).split()
PROMPTS = ("mellow lo-fi hip hop beat with a warm piano", "epic strings and choir with loud drums")
MODES = {  # name: Engine.from_pack options
    "float32": {"dtype": "float32"},
    "bfloat16": {"dtype": "bfloat16"},
    "int8": {"dtype": "float32", "quantize": "int8"},
    "int8 pack_mm": {"dtype": "float32", "quantize": "int8", "int8_kernel": "pack_mm"},
    "int8 amx": {"dtype": "float32", "quantize": "int8", "int8_kernel": "amx"},  # CPUs with AMX-INT8
    "int8 vnni": {"dtype": "float32", "quantize": "int8", "int8_kernel": "vnni"},  # CPUs with AVX-512 VNNI
    "int8 avx2": {"dtype": "float32", "quantize": "int8", "int8_kernel": "avx2"},  # CPUs with AVX2 (the same bits)
    "int8+bf16": {"dtype": "bfloat16", "quantize": "int8"},
    "float32 kv-bf16": {"dtype": "float32", "kv_cache_dtype": "bfloat16"},  # bfloat16 KV caches: CPU only
    "int8 kv-bf16": {"dtype": "float32", "quantize": "int8", "kv_cache_dtype": "bfloat16"},
    "float32 kv-int8": {"dtype": "float32", "kv_cache_dtype": "int8"},  # int8 KV rows with a scale each: CPU only
    "int8 kv-int8": {"dtype": "float32", "quantize": "int8", "kv_cache_dtype": "int8"},
    "bf16-weights": {"dtype": "float32", "quantize": "bfloat16"},  # CPUs with AVX-512: float32 activations
    "int4": {"dtype": "float32", "quantize": "int4"},  # CPUs with AVX-512 VNNI or AVX2: 4-bit layer weights, int8 heads
    "int4 kv-bf16": {"dtype": "float32", "quantize": "int4", "kv_cache_dtype": "bfloat16"},
    "int4 kv-int8": {"dtype": "float32", "quantize": "int4", "kv_cache_dtype": "int8"},
}
# on CUDA also: bfloat16 with 16 decode steps per host sync replayed as CUDA graphs (vivace.core.device_decode)
GRAPH_MODES = {"bfloat16+graphs": {"dtype": "bfloat16", "steps_per_sync": 16, "cuda_graphs": True}}
QUICK = {"seconds": 0.2, "agreement_s": 0.5, "agreement_prompts": 2}
FULL = {"seconds": 10.0, "agreement_s": 5.0, "agreement_prompts": 2}
GUIDANCE, TOP_K = 3.0, 250
WARMUP_STEPS = 4  # one short untimed generation per engine first: weights paged in, lazy initialisation done
HEAD_LOGIT_STD = 2.0
TEXT = {"d_model": 256, "d_kv": 32, "d_ff": 1024, "num_layers": 2, "num_heads": 8}
DECODER = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "ffn_dim": 4096, "num_codebooks": 4, "vocab_size": 2048}
ENCODEC_32KHZ = {
    "sampling_rate": 32000, "codebook_size": 2048, "codebook_dim": 128, "num_filters": 64, "hidden_size": 128,
    "num_lstm_layers": 2, "upsampling_ratios": [8, 5, 4, 4], "target_bandwidths": [2.2], "use_causal_conv": False,
    "use_conv_shortcut": False, "compress": 2, "norm_type": "weight_norm",
}


def tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_input_names=["input_ids", "attention_mask"]
    )


def build_checkpoint(path: Path) -> None:
    from transformers import (
        EncodecConfig,
        MusicgenConfig,
        MusicgenDecoderConfig,
        MusicgenForConditionalGeneration,
        T5Config,
    )

    torch.manual_seed(0)
    pad = DECODER["vocab_size"]
    text = T5Config(vocab_size=len(WORDS) + 3, relative_attention_num_buckets=32, **TEXT)
    decoder = MusicgenDecoderConfig(
        pad_token_id=pad, bos_token_id=pad, decoder_start_token_id=pad, max_position_embeddings=2048, **DECODER
    )
    config = MusicgenConfig(  # sub-configs as dicts: what transformers 4.x and 5.x both take
        text_encoder=text.to_dict(), audio_encoder=EncodecConfig(**ENCODEC_32KHZ).to_dict(), decoder=decoder.to_dict()
    )
    model = MusicgenForConditionalGeneration(config).eval()
    with torch.no_grad():
        for linear in [m for m in model.decoder.modules() if isinstance(m, torch.nn.Linear)] + [model.enc_to_dec_proj]:
            linear.weight.normal_(0.0, linear.in_features**-0.5)
        for head in model.decoder.lm_heads:
            head.weight.normal_(0.0, HEAD_LOGIT_STD * head.in_features**-0.5)
        for level in model.audio_encoder.quantizer.layers:  # transformers leaves the codebooks at zero
            level.codebook.embed.normal_()
    model.save_pretrained(path)
    tokenizer().save_pretrained(path)


def ensure_models(work_dir: Path) -> tuple[Path, Path]:
    src, pack = work_dir / "musicgen-small-random", work_dir / "musicgen-small-pack"
    if not (src / "config.json").is_file():
        print(f"building the MusicGen-small-shaped random checkpoint in {src} (once)", flush=True)
        partial = work_dir / "musicgen-small-random.partial"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            build_checkpoint(partial)
        partial.rename(src)
    if not (pack / "pack.json").is_file():
        print(f"converting it: vivace convert musicgen {src} {pack}", flush=True)
        subprocess.run([sys.executable, "-m", "vivace", "convert", "musicgen", str(src), str(pack)], check=True, cwd=ROOT)
    return src, pack


def transformers_run(src: Path, prompt: str, seconds: float, device: str) -> dict[str, Any]:
    from transformers import LogitsProcessor, LogitsProcessorList, MusicgenForConditionalGeneration
    from transformers.utils import logging as hf_logging

    stamps: list[float] = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            stamps.append(time.perf_counter())
            return scores

    hf_logging.set_verbosity_error()
    with PeakRSS() as memory:
        start = time.perf_counter()
        model = MusicgenForConditionalGeneration.from_pretrained(src).to(device).eval()
        load_s = time.perf_counter() - start
        inputs = tokenizer()([prompt], return_tensors="pt").to(device)
        k = model.decoder.num_codebooks
        frames = round(seconds * model.config.audio_encoder.frame_rate)
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.generate(**inputs, do_sample=True, top_k=TOP_K, guidance_scale=GUIDANCE, max_new_tokens=WARMUP_STEPS)
            torch.manual_seed(0)
            start = time.perf_counter()
            audio = model.generate(
                **inputs, do_sample=True, top_k=TOP_K, guidance_scale=GUIDANCE, max_new_tokens=frames + k - 1,
                logits_processor=LogitsProcessorList([Stamp()]),
            )
            total = time.perf_counter() - start
    rate = model.config.audio_encoder.sampling_rate
    del model
    release_memory()
    return {
        "engine": "transformers", "mode": "float32", "load_s": load_s, **_timing(stamps, start, total, total),
        "audio_s": audio.shape[-1] / rate, "enc_len": int(inputs["input_ids"].shape[1]), **memory.record(),
    }


def _timing(stamps: list[float], start: float, total: float, first_audio: float | None,
            done: list[int] | None = None) -> dict[str, Any]:
    """done: decode steps finished at each stamp (default one per stamp); a run of several steps per host sync
    stamps once per run, so each interval is divided by the steps it covers."""
    done = list(range(len(stamps))) if done is None else done
    steps = np.diff(done)
    intervals = np.diff(stamps)[steps > 0] * 1e3 / steps[steps > 0]
    return {
        "steps": done[-1] - done[0] + 1, "first_step_s": stamps[0] - start, "ms_per_step": float(np.median(intervals)),
        "ms_per_step_min": float(intervals.min()), "wall_s": total, "time_to_first_audio_s": first_audio,
        "mean_context": 1 + (done[-1] - done[0] + 1) / 2,
    }


def vivace_run(engine: Engine, prompt: str, seconds: float) -> dict[str, Any]:
    engine.generate(prompt, WARMUP_STEPS / engine.config.frame_rate, seed=1, top_k=TOP_K, guidance_scale=GUIDANCE)
    stamps: list[float] = []
    done: list[int] = []
    samples, first = 0, None
    start = time.perf_counter()
    for event in engine.events(prompt, seconds, seed=0, top_k=TOP_K, guidance_scale=GUIDANCE):
        if isinstance(event, StageProgress):
            stamps.append(time.perf_counter())
            done.append(event.done)
        elif isinstance(event, AudioChunk):
            first = first if first is not None else time.perf_counter() - start
            samples += len(event.pcm)
    total = time.perf_counter() - start
    enc_len = len(engine.pack.text.encode(prompt)[1])
    return {**_timing(stamps, start, total, first, done), "audio_s": samples / engine.sample_rate, "enc_len": enc_len}


def greedy_grids(engine: Engine, prompts: list[str], seconds: float) -> list[np.ndarray]:
    """Float32 greedy guided codes of each prompt, as the decoder's delayed input grid [K, frames + K]."""
    k, pad = engine.config.num_codebooks, engine.config.pad_id
    windows: dict[int, list[np.ndarray]] = {}
    for event in engine.events(prompts, seconds, seed=0, temperature=0.0, guidance_scale=GUIDANCE):
        if isinstance(event, WindowFinished):
            windows.setdefault(event.row, []).append(np.asarray(event.tokens).reshape(-1, k).T)
    return [delayed_grid(np.concatenate(windows[row], axis=1), pad) for row in range(len(prompts))]


def guided_inputs(engine: Engine, prompt: str, grid: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The conditional and null rows of a guided pair: encoder states [2, enc_len, D], their mask [2, enc_len] (the
    null row attends to nothing) and the grid's input columns [T, K]."""
    states, _ = engine.pack.text.encode(prompt)
    states = states.to(engine.device, next(engine.pack.decoder.parameters()).dtype)
    mask = torch.tensor([[True] * len(states), [False] * len(states)], device=engine.device)
    ids = torch.from_numpy(grid[:, :-1].T.copy()).to(engine.device)
    return torch.stack([states, torch.zeros_like(states)]), mask, ids


def guided_logits(logits: torch.Tensor, length: int) -> torch.Tensor:
    """[2 * length, K, vocab] logits of the conditional then the null row -> the guided mix, float32."""
    cond, null = logits.float().view(2, length, *logits.shape[1:])
    return null + (cond - null) * GUIDANCE


@torch.inference_mode()
def teacher_forced(engine: Engine, prompt: str, grid: np.ndarray) -> torch.Tensor:
    """Guided next-token logits [positions, K, vocab] (float32) with the grid's columns as inputs."""
    decoder = engine.pack.decoder
    encoder, mask, ids = guided_inputs(engine, prompt, grid)
    hidden = decoder.forward_dense(ids.unsqueeze(0).expand(2, -1, -1), encoder, mask).flatten(0, 1)
    return guided_logits(decoder.compute_logits(hidden), ids.shape[0])


@torch.inference_mode()
def teacher_forced_cached(engine: Engine, prompt: str, grid: np.ndarray) -> torch.Tensor:
    """teacher_forced through the paged KV cache in the engine's KV dtype: both rows of the grid prefilled at once,
    so every position attends to keys and values as the cache stores them (bfloat16 rounded, int8 quantized)."""
    decoder, cfg = engine.pack.decoder, engine.pack.decoder.config
    encoder, enc_mask, ids = guided_inputs(engine, prompt, grid)
    keys, values = decoder.encode_cross(encoder)
    length, block_size = ids.shape[0], engine.block_size
    per_row = -(-length // block_size)
    pool = KVCachePool(cfg.num_layers, 2 * per_row, block_size, cfg.num_heads, cfg.head_dim, engine.kv_dtype, engine.device)
    slots = torch.cat([row * per_row * block_size + torch.arange(length) for row in range(2)])
    batch = AttentionBatch(
        slot_mapping=slots.to(engine.device),
        block_tables=torch.arange(2 * per_row, dtype=torch.int32, device=engine.device).view(2, per_row),
        context_lens=torch.tensor([length, length], dtype=torch.int32, device=engine.device),
        query_start_loc=torch.tensor([0, length, 2 * length], dtype=torch.int32, device=engine.device),
        is_decode=False,
        cross=CrossBatch(keys, values, enc_mask, torch.arange(2, device=engine.device).repeat_interleave(length)),
    )
    positions = torch.arange(length, device=engine.device).repeat(2)
    hidden = decoder(torch.cat([ids, ids]), positions, pool.layers(), batch)
    return guided_logits(decoder.compute_logits(hidden), length)


def agreement(reference: list[torch.Tensor], candidate: list[torch.Tensor], grids: list[np.ndarray], pad: int) -> dict[str, Any]:
    hits, kls, drawn = [], [], 0
    for ref, cand, grid in zip(reference, candidate, grids):
        ref, cand = ref.cpu(), cand.cpu()  # logits from a GPU run, compared on the host
        targets = torch.from_numpy(grid[:, 1:].T.copy())  # [positions, K]
        valid = targets != pad
        hits.append((cand.argmax(-1) == targets)[valid].double())
        log_p, log_q = torch.log_softmax(ref, -1), torch.log_softmax(cand, -1)
        kls.append((log_p.exp() * (log_p - log_q)).sum(-1)[valid].double())
        drawn += int(valid.sum())
    return {"greedy_agreement": float(torch.cat(hits).mean()), "mean_kl": float(torch.cat(kls).mean()), "tokens": drawn}


def greedy_prefix(reference: list[np.ndarray], candidate: list[np.ndarray]) -> float:
    """The fraction of float32's greedy frames a mode reproduces, decoding greedily on its own (KV cache included),
    before its first differing token: the decode path's drift, where teacher forcing (forward_dense) has no cache."""
    same = total = 0
    for ref, cand in zip(reference, candidate):
        differs = np.flatnonzero((ref != cand).any(axis=0))
        same += int(differs[0]) if len(differs) else ref.shape[1]
        total += ref.shape[1]
    return same / total


def run(options: Options) -> dict[str, Any]:
    settings = QUICK if options.quick else FULL
    unknown = sorted(set(options.modes) - set(MODES) - set(GRAPH_MODES))
    if unknown:
        print(f"unknown musicgen mode {unknown[0]!r} (choose from {', '.join(MODES)})", file=sys.stderr)
        raise SystemExit(2)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    src, pack = ensure_models(options.work_dir)
    prompt, seconds = PROMPTS[0], settings["seconds"]
    agreement_prompts = list(PROMPTS[: settings["agreement_prompts"]])
    runs = [transformers_run(src, prompt, seconds, options.device)]
    reference: list[torch.Tensor] = []
    reference_cached: list[torch.Tensor] = []
    grids: list[np.ndarray] = []
    modes = {**MODES, **(GRAPH_MODES if options.device.startswith("cuda") else {})}
    runnable = ("pack_mm", *native_kernels()) if options.device == "cpu" else ()
    modes = {mode: kwargs for mode, kwargs in modes.items() if "int8_kernel" not in kwargs or kwargs["int8_kernel"] in runnable}
    if options.device != "cpu":
        modes = {mode: kwargs for mode, kwargs in modes.items() if "kv_cache_dtype" not in kwargs}
    if options.device != "cpu" or not int4_supported():
        modes = {mode: kwargs for mode, kwargs in modes.items() if kwargs.get("quantize") != "int4"}
    if options.device != "cpu" or not _C.float32_linear_fast():
        modes = {mode: kwargs for mode, kwargs in modes.items() if kwargs.get("quantize") != "bfloat16"}
    if options.modes:
        modes = {mode: kwargs for mode, kwargs in modes.items() if mode == "float32" or mode in options.modes}
    for mode, kwargs in modes.items():
        with PeakRSS() as memory:
            start = time.perf_counter()
            engine = Engine.from_pack(pack, device=options.device, **kwargs)
            load_s = time.perf_counter() - start
            result = {"engine": "vivace", "mode": mode, "dtype": kwargs["dtype"], "quantize": kwargs.get("quantize"),
                      "int8_kernels": engine.info()["int8_kernels"], "load_s": load_s}
            result.update(vivace_run(engine, prompt, seconds))
        result.update(memory.record())
        if mode == "float32":
            grids = greedy_grids(engine, agreement_prompts, settings["agreement_s"])
            reference = [teacher_forced(engine, p, g) for p, g in zip(agreement_prompts, grids)]
            reference_cached = [teacher_forced_cached(engine, p, g) for p, g in zip(agreement_prompts, grids)]
            # the cached method's own check: with float32 caches it must give the dense logits up to rounding
            result["cached_vs_dense_max_rel"] = max(
                float((c - d).abs().max() / d.abs().max()) for c, d in zip(reference_cached, reference)
            )
        logits = [teacher_forced(engine, p, g) for p, g in zip(agreement_prompts, grids)]
        result["agreement"] = agreement(reference, logits, grids, engine.config.pad_id)
        cached = [teacher_forced_cached(engine, p, g) for p, g in zip(agreement_prompts, grids)]
        result["agreement_cached"] = agreement(reference_cached, cached, grids, engine.config.pad_id)
        result["greedy_prefix"] = greedy_prefix(grids, greedy_grids(engine, agreement_prompts, settings["agreement_s"]))
        runs.append(result)
        del engine, logits
        release_memory()

    base = runs[0]["ms_per_step"]
    rows = []
    for r in runs:
        a, c = r.get("agreement"), r.get("agreement_cached")
        rows.append([
            r["engine"], r["mode"], r["ms_per_step"], r["ms_per_step_min"], r["wall_s"] / r["audio_s"],
            r["time_to_first_audio_s"], r["peak_rss_mb"], base / r["ms_per_step"],
            a["greedy_agreement"] if a else None, a["mean_kl"] if a else None,
            c["greedy_agreement"] if c else None, c["mean_kl"] if c else None, r.get("greedy_prefix"),
        ])
    print(table(
        ["engine", "mode", "ms/step", "min ms", "RTF", "first audio s", "peak RSS MB", "vs HF", "greedy agree", "mean KL",
         "cached agree", "cached KL", "greedy prefix"],
        rows, title=f"MusicGen-small-shaped, {seconds} s clip, batch 1 with guidance {GUIDANCE} (2 rows), top-k {TOP_K}",
    ))
    config = {
        "source": str(src), "pack": str(pack), "prompt": prompt, "seconds": seconds, "seed": 0, "guidance_scale": GUIDANCE,
        "top_k": TOP_K, "temperature": 1.0, "modes": modes,
        "agreement_prompts": agreement_prompts, "agreement_s": settings["agreement_s"],
        "checkpoint": {"decoder": DECODER, "text_encoder_t5": TEXT, "text_vocab_words": len(WORDS), "encodec": ENCODEC_32KHZ,
                       "head_logit_std": HEAD_LOGIT_STD},
        "ms_per_step_method": "median interval between consecutive decode steps (transformers: a stamping LogitsProcessor; "
                              "vivace: StageProgress events), the first step (text encoding, prefill) excluded",
    }
    path = write_result("musicgen", options, config, {"runs": runs})
    print(f"wrote {path}")
    return {"runs": runs}
