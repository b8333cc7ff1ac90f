"""Codec decoder speed per backend, in seconds of audio decoded per wall-clock second (higher is better).

    python -m benchmarks.codec_speed [--presets tiny paper demo encodec32] [--seconds 9] [--repeats 5] [--threads 1]
                                     [--device cpu|cuda] [--compile]

Methods for the SoundStream presets (tiny, paper: random decoders; demo: the bundled pack's trained decoder, packs/demo),
each over one clip of random codes at batch 1:
  torch_full       SoundStreamDecoder on the whole clip at once
  ort_full         onnxruntime (CPU provider) on the whole clip
  torch_range      per chunk, ContextDecoder.range on the module (re-decodes the receptive field of context)
  torch_stream     per chunk, CodecStream on torch ops (carried convolution state; the torch backend on a GPU)
  native_stream    per chunk, CodecStream on vivace._C.causal_conv1d (the torch backend on a CPU with AVX-512)
  ort_stream       per chunk, onnxruntime through its ContextStream (the pipeline's onnxruntime backend)
Chunks are the preset's fine chunk (tiny 0.5 s, paper 3 s: what the pipeline feeds) and --small-chunk frames
(a low-latency stream). For "encodec32" (MusicGen's 32 kHz EnCodec decoder at its released size, random weights):
  torch_full / ort_full   the whole clip, as MusicGen's generate decodes it
  torch_overlap / ort_overlap   1 s chunks with 16 frames of context on either side, as MusicGen's stream decodes
--compile adds compile_full: torch.compile of the decoder (inductor, static shapes), whole clip. On --device cuda the
torch methods run on the GPU, the onnxruntime ones are left out (the CPU provider is what they measure), and
graph_full adds the whole-clip decode captured once as a CUDA graph and replayed: torch eager against CUDA graphs /
torch.compile, the comparison that stands in for TensorRT where TensorRT cannot be installed.
The tiny and paper decoders are random SoundStreamDecoders built from
`vivace.families.musiclm.random_pack.preset_config(preset).codec` (no pack is written); demo loads packs/demo's. Each figure is the best of --repeats runs after
one warm-up; streamed outputs are checked against the full decode first. torch and onnxruntime get the same
number of threads (default 1: on a shared 2-core machine a second thread that has to wait for a busy core
makes both libraries several times slower, and the figures unrepeatable). Results go to
benchmarks/results/codec_speed-<date>.json (codec_speed-cuda-<date>.json on a GPU; a later run of the day -run2, ...).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.common import cpu_model, git, gpu_name, machine, result_path, versions
from vivace.codecs.backend import FrameStream, OnnxRuntimeBackend, TorchBackend
from vivace.codecs.causal_stream import CodecStream
from vivace.codecs.context_decoder import ContextDecoder
from vivace.codecs.encodec import EncodecConfig, EncodecDecoder
from vivace.codecs.soundstream import SoundStreamDecoder
from vivace.export.onnx_codec import OPSET
from vivace.families.musiclm.pack import load_codec, read_config
from vivace.families.musiclm.random_pack import preset_config

RESULTS = Path(__file__).resolve().parent / "results"
DEMO_PACK = RESULTS.parent.parent / "packs" / "demo"


def synchronized(run: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """run, waiting for the GPU's queued work before returning (a no-op on the CPU)."""
    def call() -> torch.Tensor:
        out = run()
        if out.is_cuda:
            torch.cuda.synchronize()
        return out
    return call


def best_time(run: Callable[[], object], repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def cuda_graph(decode: Callable[[torch.Tensor], torch.Tensor], codes: torch.Tensor) -> Callable[[], torch.Tensor]:
    """decode(codes) captured once as a CUDA graph (after warm-up runs on a side stream); replays write one output."""
    static = codes.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.inference_mode():
        for _ in range(2):
            decode(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode():
        out = decode(static)

    def replay(static_input: torch.Tensor = static) -> torch.Tensor:
        # the default argument keeps the graph's input alive: freed, its memory goes to eager work and the replay
        # reads whatever lands there (garbage codebook indices: a device-side assert)
        graph.replay()
        return out
    return replay


def accelerated_runs(codec: torch.nn.Module, codes: torch.Tensor, compile_too: bool) -> list[tuple[str, int, Callable[[], torch.Tensor]]]:
    """Whole-clip decodes through torch.compile (when asked) and, on CUDA, a CUDA graph."""
    frames = codes.shape[-1]
    runs: list[tuple[str, int, Callable[[], torch.Tensor]]] = []
    if compile_too:
        compiled = torch.compile(codec, dynamic=False)
        runs.append(("compile_full", frames, lambda: compiled(codes)))
    if codes.is_cuda:
        runs.append(("graph_full", frames, cuda_graph(codec, codes)))
    return runs


@torch.inference_mode()
def measure(runs: list[tuple[str, int, Callable[[], torch.Tensor]]], full: Callable[[], torch.Tensor], audio_s: float,
            repeats: int) -> list[dict]:
    """Each run's error against the whole-clip torch decode, then its speed in seconds of audio per second."""
    reference = full()
    figures = []
    for method, chunk, run in runs:
        run = synchronized(run)
        error = float((run() - reference).abs().max())
        figures.append({
            "method": method, "chunk_frames": chunk, "max_abs_error_vs_torch_full": error,
            "audio_s_per_s": audio_s / best_time(run, repeats),
        })
    return figures


def onnx_backend(codec: torch.nn.Module, path: Path, threads: int) -> tuple[OnnxRuntimeBackend, float, float]:
    """The codec exported to path and loaded in onnxruntime's CPU provider; the export's checked error and time."""
    from vivace.export.onnx_codec import export_codec

    start = time.perf_counter()
    export_error = export_codec(codec, path)
    export_s = time.perf_counter() - start
    return OnnxRuntimeBackend(codec, str(path), torch.device("cpu"), threads=threads), export_error, export_s


def chunked(make_stream: Callable[[], FrameStream], codes: torch.Tensor, chunk: int) -> torch.Tensor:
    stream = make_stream()
    return torch.cat([stream.push(codes[..., t : t + chunk]) for t in range(0, codes.shape[-1], chunk)], dim=-1)


def bench_preset(preset: str, seconds: float, small_chunk: int, repeats: int, threads: int, workdir: Path,
                 device: torch.device, compile_too: bool) -> dict:
    pack_config = read_config(DEMO_PACK) if preset == "demo" else preset_config(preset)
    config = pack_config.codec
    frame_rate = pack_config.sample_rate // config.hop_length
    frames = round(seconds * frame_rate)
    fine_chunk = round(pack_config.musiclm.fine_chunk_s * frame_rate)
    torch.manual_seed(0)
    if preset == "demo":
        codec = load_codec(DEMO_PACK, pack_config).eval()
    else:
        codec = SoundStreamDecoder(config).eval()
        with torch.no_grad():
            codec.codebooks.normal_(0.0, 1.0)
    codes = torch.randint(0, config.codebook_size, (1, config.num_levels, frames))
    on_cpu = device.type == "cpu"
    ort_backend, export_error, export_s = onnx_backend(codec, workdir / f"{preset}.onnx", threads) if on_cpu else (None, None, None)
    codec, codes = codec.to(device), codes.to(device)
    torch_backend = TorchBackend(codec)

    def torch_range(chunk: int) -> torch.Tensor:
        decoder = ContextDecoder(codec, config.hop_length, codec.receptive_field_frames())
        pieces = [decoder.range(codes[..., : t + chunk], t, min(t + chunk, frames)) for t in range(0, frames, chunk)]
        return torch.cat(pieces, dim=-1)

    runs: list[tuple[str, int, Callable[[], torch.Tensor]]] = [("torch_full", frames, lambda: torch_backend.decode(codes))]
    runs += [("ort_full", frames, lambda: ort_backend.decode(codes))] if on_cpu else []
    runs += accelerated_runs(codec, codes, compile_too)
    for chunk in (fine_chunk, small_chunk):
        runs += [
            ("torch_range", chunk, lambda c=chunk: torch_range(c)),
            ("torch_stream", chunk, lambda c=chunk: chunked(lambda: CodecStream(codec, native=False), codes, c)),
        ]
        runs += [("native_stream", chunk, lambda c=chunk: chunked(lambda: CodecStream(codec, native=True), codes, c))] if on_cpu else []
        runs += [("ort_stream", chunk, lambda c=chunk: chunked(ort_backend.stream, codes, c))] if on_cpu else []
    audio_s = frames * config.hop_length / pack_config.sample_rate
    figures = measure(runs, lambda: torch_backend.decode(codes), audio_s, repeats)
    return {
        "preset": preset,
        "codec_config": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(config).items()},
        "params": sum(p.numel() for p in codec.parameters()),
        "receptive_field_frames": codec.receptive_field_frames(),
        "frame_rate": frame_rate,
        "clip_s": audio_s,
        "onnx_export_s": export_s,
        "onnx_export_max_abs_error": export_error,
        "figures": figures,
    }


def bench_encodec(seconds: float, repeats: int, threads: int, workdir: Path, device: torch.device, compile_too: bool) -> dict:
    config = EncodecConfig.musicgen_32khz()
    torch.manual_seed(0)
    codec = EncodecDecoder(config).eval()
    with torch.no_grad():
        codec.codebooks.normal_(0.0, 1.0)
    frame_rate = config.sampling_rate / config.hop_length
    frames = round(seconds * frame_rate)
    codes = torch.randint(0, config.codebook_size, (1, config.num_levels, frames))
    on_cpu = device.type == "cpu"
    ort_backend, export_error, export_s = onnx_backend(codec, workdir / "encodec32.onnx", threads) if on_cpu else (None, None, None)
    codec, codes = codec.to(device), codes.to(device)
    torch_backend = TorchBackend(codec)
    chunk, context = round(frame_rate), 16
    runs: list[tuple[str, int, Callable[[], torch.Tensor]]] = [("torch_full", frames, lambda: torch_backend.decode(codes))]
    runs += [("ort_full", frames, lambda: ort_backend.decode(codes))] if on_cpu else []
    runs += accelerated_runs(codec, codes, compile_too)
    overlap = ContextDecoder(codec, config.hop_length, context, context)
    runs += [("torch_overlap", chunk, lambda: overlap.chunks(codes, chunk))]
    if on_cpu:
        ort_overlap = ContextDecoder(ort_backend.decode, config.hop_length, context, context)
        runs += [("ort_overlap", chunk, lambda: ort_overlap.chunks(codes, chunk))]
    audio_s = frames * config.hop_length / config.sampling_rate
    figures = measure(runs, lambda: torch_backend.decode(codes), audio_s, repeats)
    return {
        "preset": "encodec32",
        "codec_config": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(config).items()},
        "params": sum(p.numel() for p in codec.parameters()),
        "context_frames": context,
        "frame_rate": frame_rate,
        "clip_s": audio_s,
        "onnx_export_s": export_s,
        "onnx_export_max_abs_error": export_error,
        "figures": figures,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "paper", "encodec32"], choices=["tiny", "paper", "demo", "encodec32"])
    parser.add_argument("--seconds", type=float, default=9.0)
    parser.add_argument("--small-chunk", type=int, default=5, dest="small_chunk", help="frames; besides the fine chunk")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="add torch.compile's whole-clip decode")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        results = [
            bench_encodec(args.seconds, args.repeats, args.threads, Path(tmp), device, args.compile) if p == "encodec32"
            else bench_preset(p, args.seconds, args.small_chunk, args.repeats, args.threads, Path(tmp), device, args.compile)
            for p in args.presets
        ]
    print(f"{'preset':<10}{'method':<14}{'chunk (frames)':>16}{'audio s / s':>14}{'max |err|':>12}")
    for r in results:
        for f in r["figures"]:
            chunk = "whole clip" if f["method"].endswith("_full") else str(f["chunk_frames"])
            print(f"{r['preset']:<10}{f['method']:<14}{chunk:>16}{f['audio_s_per_s']:>14.1f}{f['max_abs_error_vs_torch_full']:>12.1e}")
    now = datetime.datetime.now(datetime.timezone.utc)
    record = {
        "benchmark": "codec_speed",
        "date": now.isoformat(timespec="seconds"),
        "machine": machine(args.device),
        "git_commit": git("rev-parse", "HEAD"),
        "cpu": cpu_model(),
        "gpu": gpu_name() if device.type == "cuda" else None,
        "threads": args.threads,
        "cpu_cores": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "versions": versions(),
        "onnx_opset": OPSET if device.type == "cpu" else None,
        "args": vars(args),
        "results": results,
    }
    RESULTS.mkdir(exist_ok=True)
    out = result_path("codec_speed", args.device, record["machine"], now.date())  # never over an earlier run
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
