"""Command line: vivace generate | serve | info | random-pack | export onnx | convert musicgen. Bad input exits with code 2 and one line on stderr."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vivace.errors import VivaceError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vivace", description="Fast inference for token-based text-to-music models.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate music from a prompt or a story")
    gen.add_argument("prompt", nargs="?", help="text prompt (omit when --segment is used)")
    gen.add_argument("--pack", required=True, help="pack directory")
    gen.add_argument("--duration", type=float, help="seconds of audio")
    gen.add_argument("--segment", nargs=2, action="append", metavar=("PROMPT", "SECONDS"),
                     help="story mode: one segment; repeat for each (the condition switches at the boundaries)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--temperature", type=float, help="all stages (default: the pack's per-stage values)")
    gen.add_argument("--top-k", type=int, dest="top_k")
    gen.add_argument("--top-p", type=float, dest="top_p")
    gen.add_argument("--guidance", type=float, dest="guidance_scale", help="MusicGen: classifier-free guidance scale (1 = off)")
    gen.add_argument("--melody", help="MusicGen-Melody: a reference sound file (WAV, FLAC, ...) whose chroma conditions the music")
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--dtype", default="float32")
    gen.add_argument("--quantize", choices=["int8"], help="int8 weight-only stage linears")
    gen.add_argument("--codec-backend", default="auto", dest="codec_backend", help="auto | torch | onnxruntime | tensorrt")
    gen.add_argument("--steps-per-sync", type=int, default=1, dest="steps_per_sync",
                     help="CUDA: decode steps per host sync (not yet verified on a GPU)")
    gen.add_argument("--cuda-graphs", action="store_true", dest="cuda_graphs", help="CUDA: replay those steps as CUDA graphs")
    gen.add_argument("-o", "--output", required=True, help="output .wav path")
    gen.add_argument("--quiet", action="store_true", help="no progress bars")

    serve = sub.add_parser("serve", help="serve a pack over HTTP (OpenAI's /v1/audio/speech, /v1/music/generations, a web page)")
    serve.add_argument("--pack", required=True, action="append",
                       help="pack directory (with --ray: repeat for several packs, each under /<pack name>/)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", dest="api_key", help="require Authorization: Bearer KEY on /v1 (default: $VIVACE_API_KEY)")
    serve.add_argument("--model-name", dest="model_name", help="the model id clients pass (default: the pack's name)")
    serve.add_argument("--max-running", type=int, default=16, dest="max_running", help="requests decoding at once")
    serve.add_argument("--max-queue", type=int, default=64, dest="max_queue", help="requests waiting; past it: 503")
    serve.add_argument("--max-duration", type=float, dest="max_duration", help="longest clip a request may ask for (s)")
    serve.add_argument("--default-duration", type=float, default=10.0, dest="default_duration",
                       help="a request's duration when it names none (s)")
    serve.add_argument("--grace", type=float, default=30.0, help="on SIGTERM: seconds running requests may finish")
    serve.add_argument("--device", default="cpu")
    serve.add_argument("--dtype", default="float32")
    serve.add_argument("--quantize", choices=["int8"], help="int8 weight-only stage linears")
    serve.add_argument("--codec-backend", default="auto", dest="codec_backend")
    serve.add_argument("--kv-cache-gb", type=float, default=4.0, dest="kv_cache_gb")
    serve.add_argument("--log-level", default="info", dest="log_level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--ray", action="store_true", help="serve on Ray Serve: replicas behind its HTTP proxy ([ray] extra)")
    serve.add_argument("--ray-address", dest="ray_address", help="an existing Ray cluster (default: start one here)")
    serve.add_argument("--replicas", default="1", help="--ray: replicas per pack, or 'auto' (Serve's autoscaling)")
    serve.add_argument("--replica-cpus", type=float, default=1.0, dest="replica_cpus", help="--ray: CPUs per replica")
    serve.add_argument("--replica-gpus", type=float, default=0.0, dest="replica_gpus", help="--ray: GPUs (or a fraction) per replica")

    info = sub.add_parser("info", help="describe a pack")
    info.add_argument("pack")

    rand = sub.add_parser("random-pack", help="write a pack with random weights (tests, benchmarks)")
    rand.add_argument("output")
    rand.add_argument("--preset", default="tiny", choices=["tiny", "paper"])
    rand.add_argument("--seed", type=int, default=0)

    export = sub.add_parser("export", help="write an exported form of a pack component into the pack")
    formats = export.add_subparsers(dest="format", required=True)
    onnx = formats.add_parser("onnx", help="the codec decoder as PACK/codec.onnx, checked against torch")
    onnx.add_argument("pack")
    onnx.add_argument("--opset", type=int, default=17)

    convert = sub.add_parser("convert", help="convert a checkpoint of another format into a pack")
    families = convert.add_subparsers(dest="family", required=True)
    musicgen = families.add_parser(
        "musicgen", help="a transformers MusicgenForConditionalGeneration or MusicgenMelodyForConditionalGeneration directory (or hub id)",
    )
    musicgen.add_argument("src")
    musicgen.add_argument("output")
    musicgen.add_argument("--window", type=float, default=30.0, help="seconds one decoder window generates")
    musicgen.add_argument("--stride", type=float, default=18.0, help="continuation stride in seconds")
    return parser


def _generate(args: argparse.Namespace) -> None:
    from vivace.audio import check_output_path, write_wav
    from vivace.engine import Engine, Story
    from vivace.events import AudioChunk, StageProgress

    output = check_output_path(args.output)
    if args.segment:
        if args.prompt is not None:
            raise VivaceError("give either a prompt or --segment entries, not both")
        try:
            prompt = Story(tuple((text, float(seconds)) for text, seconds in args.segment))
        except ValueError:
            raise VivaceError(f"--segment seconds must be numbers, got {[s for _, s in args.segment]}") from None
    elif args.prompt is None:
        raise VivaceError("a prompt (or --segment entries) is required")
    else:
        prompt = args.prompt
    engine = Engine.from_pack(
        args.pack, device=args.device, dtype=args.dtype, quantize=args.quantize, codec_backend=args.codec_backend,
        steps_per_sync=args.steps_per_sync, cuda_graphs=args.cuda_graphs,
    )
    keys = ("temperature", "top_k", "top_p", "guidance_scale")
    sampling = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    if args.melody is not None:
        sampling["melody"] = args.melody
    events = engine.events(prompt, args.duration, seed=args.seed, **sampling)
    show = not args.quiet and sys.stderr.isatty()
    bars: dict = {}
    pieces: list[np.ndarray] = []
    try:
        for event in events:
            if isinstance(event, AudioChunk):
                pieces.append(event.pcm)
            elif isinstance(event, StageProgress) and show:
                from tqdm import tqdm

                bar = bars.get(event.stage)
                if bar is None:
                    bar = bars[event.stage] = tqdm(total=event.total, desc=f"{event.stage:>8}", unit="tok", leave=True)
                bar.update(event.done - bar.n)
    finally:
        for bar in bars.values():
            bar.close()
    audio = np.concatenate(pieces)
    write_wav(output, audio, engine.sample_rate)
    if not args.quiet:
        print(f"wrote {output} ({len(audio) / engine.sample_rate:.2f} s at {engine.sample_rate} Hz)", file=sys.stderr)


def _serve(args: argparse.Namespace) -> None:
    import os

    from vivace.server.app import ServerSettings
    from vivace.server.run import serve

    for name in ("port", "max_duration", "default_duration", "grace"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise VivaceError(f"--{name.replace('_', '-')} must be > 0, got {value}")
    if args.port > 65535:
        raise VivaceError(f"--port must be at most 65535, got {args.port}")
    settings = ServerSettings(
        host=args.host, port=args.port, api_key=args.api_key or os.environ.get("VIVACE_API_KEY") or None,
        model_name=args.model_name, max_duration_s=args.max_duration, default_duration_s=args.default_duration,
        shutdown_grace_s=args.grace,
    )
    engine_options = {
        "device": args.device, "dtype": args.dtype, "quantize": args.quantize, "codec_backend": args.codec_backend,
        "kv_cache_gb": args.kv_cache_gb, "max_running": args.max_running, "max_waiting": args.max_queue,
    }
    if args.ray:
        from vivace.server.run import serve_on_ray

        serve_on_ray(args.pack, settings, engine_options, replica_options(args), args.ray_address)
        return
    if len(args.pack) > 1:
        raise VivaceError("several --pack need --ray (one process serves one pack)")
    serve(args.pack[0], settings, engine_options)


def replica_options(args: argparse.Namespace) -> dict:
    """Serve's deployment options from --replicas / --replica-cpus / --replica-gpus."""
    if args.replicas != "auto" and not (args.replicas.isdigit() and int(args.replicas) > 0):
        raise VivaceError(f"--replicas must be a positive integer or 'auto', got {args.replicas!r}")
    if args.replica_cpus < 0 or args.replica_gpus < 0:
        raise VivaceError("--replica-cpus and --replica-gpus must be >= 0")
    replicas = "auto" if args.replicas == "auto" else int(args.replicas)
    # Serve may send a replica twice what its engine holds, so a full engine answers the 503, with Retry-After in
    # OpenAI's shape; Serve queues only while every replica is past that (a replica restarting, say), and its own
    # rejection past its queue is plain text without Retry-After.
    capacity = args.max_running + args.max_queue
    return {"num_replicas": replicas, "ray_actor_options": {"num_cpus": args.replica_cpus, "num_gpus": args.replica_gpus},
            "max_ongoing_requests": 2 * capacity, "max_queued_requests": capacity, "graceful_shutdown_timeout_s": args.grace}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "generate":
            _generate(args)
        elif args.command == "serve":
            _serve(args)
        elif args.command == "info":
            from vivace.engine import Engine

            print(json.dumps(Engine.from_pack(args.pack).info(), indent=2))
        elif args.command == "random-pack":
            from vivace.families.musiclm.random_pack import random_pack

            print(random_pack(Path(args.output), preset=args.preset, seed=args.seed))
        elif args.command == "convert":
            from vivace.export.musicgen import convert_musicgen

            print(convert_musicgen(args.src, args.output, window_s=args.window, stride_s=args.stride))
        elif args.command == "export":
            from vivace.export.onnx_codec import export_pack_codec

            print(json.dumps(export_pack_codec(args.pack, opset=args.opset)))
    except VivaceError as exc:
        print(f"vivace: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vivace: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
