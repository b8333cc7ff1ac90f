"""Command line: vivace generate | serve | info | random-pack | export onnx | convert musicgen | convert encodec | codec.

Bad input exits with code 2 and one line on stderr (`vivace: error: ...`), before any generation where it can be
known then. Third-party progress bars and warnings (transformers, huggingface_hub, Python's warnings) are silenced
unless --verbose; the Python API is left as it is."""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vivace.errors import PackError, VivaceError

GENERATE_EPILOG = """\
sampling: every stage has the pack's own temperature / top-k / top-p (MusicLM paper: temperature 1.0, 0.95, 0.4
for semantic, coarse, fine). --temperature, --top-k and --top-p replace them for EVERY stage; --stage sets one:
  --stage semantic.KEY=V   structure and melody over time (which notes, when): lower values repeat more
  --stage coarse.KEY=V     timbre and the codec's first RVQ levels (instruments, rhythm, dynamics)
  --stage fine.KEY=V       detail: the remaining RVQ levels (texture, noise); the pack's low value keeps it clean
  --stage decoder.KEY=V    MusicGen's one stage (the same as the global flags)
KEY is temperature, top_k or top_p; --stage is repeatable and wins over the global flags for its stage. A low
global temperature or top-k / top-p (0, 0.5, 5) freezes a MusicLM pack into a drone after a few seconds: lower
`semantic` alone for steadier music.

output: -o FILE writes FILE in the format of its extension (.wav .flac .mp3 .ogg .opus) or --format; -o - writes
WAV (or --format) to stdout. --normalize (default loudness) sets the level first:
  loudness  one gain to -14 LUFS integrated (ITU-R BS.1770-4), capped so the sample peak stays <= -1 dBFS
  peak      one gain that puts the sample peak at -1 dBFS
  clip      no gain; samples past -1 dBFS (0.891) are cut
  none      the samples as generated (16/24-bit and lossy formats cut what passes full scale; --bits 32 keeps it)"""

THREADS_HELP = ("torch threads (default: OMP_NUM_THREADS, else torch's choice), or auto: all of them or one, whichever "
                "steps faster (for hosts shared with other work); audio bytes for a seed repeat exactly at one thread "
                "count and may differ in the last bits between counts")


def _threads(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer or auto, got {text!r}") from None

LINEAR_HELP = ("float32 CPU linears at 2-64 rows: auto measures F.linear against W x^T per layer shape on this machine "
               "(once, cached), linear / matmul fix one")
INT8_KERNEL_HELP = ("--quantize int8 on the CPU: auto times torch's int8 pack mm against vivace's kernel (AMX-INT8, "
                    "AVX-512 VNNI, AVX2: the same bits) per layer shape (once per CPU model and torch version, "
                    "cached); pack_mm / amx / vnni / avx2 fix one")

KV_DTYPE_HELP = ("the KV caches' dtype: auto (--dtype's), bfloat16 under float32 (half the bytes each decode step "
                 "reads) or int8 (rows of int8 values with a scale each: about a quarter); CPU only")

# API argument names whose command-line flag has another dest (the others are found by dest: top_k -> --top-k)
_API_DESTS = {"duration_s": "duration", "stage_sampling": "stage", "max_waiting": "max_queue"}
_STAGE_KEYS = {"temperature": "temperature", "top_k": "top_k", "top-k": "top_k", "top_p": "top_p", "top-p": "top_p"}
_GLOBAL_SAMPLING = (("temperature", "--temperature"), ("top_k", "--top-k"), ("top_p", "--top-p"))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, as every other error: argparse's usage block is --help's
        self.exit(2, f"vivace: error: {message} (see `{self.prog} --help`)\n")


def _parser() -> argparse.ArgumentParser:
    # --verbose is accepted before or after the subcommand; SUPPRESS keeps a subcommand from resetting the first
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parser = _Parser(prog="vivace", description="Fast inference for token-based text-to-music models.")
    parser.add_argument("--verbose", action="store_true",
                        help="show third-party progress bars and warnings (transformers, huggingface_hub, Python's)")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", parents=[common], help="generate music from a prompt or a story",
                         epilog=GENERATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    gen.add_argument("prompt", nargs="?", help="text prompt (omit when --segment is used)")
    gen.add_argument("--pack", required=True, help="pack directory")
    gen.add_argument("--duration", type=float, help="seconds of audio")
    gen.add_argument("--segment", nargs=2, action="append", metavar=("PROMPT", "SECONDS"),
                     help="story mode: one segment; repeat for each (the condition switches at the boundaries)")
    gen.add_argument("--unconditional", action="store_true",
                     help="MusicGen: no text condition (give no prompt); a melody pack may still take --melody")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--temperature", type=float, help="every stage (default: each stage's own; see below)")
    gen.add_argument("--top-k", type=int, dest="top_k", help="every stage (0 = off)")
    gen.add_argument("--top-p", type=float, dest="top_p", help="every stage (1 = off)")
    gen.add_argument("--stage", action="append", default=[], metavar="STAGE.KEY=VALUE",
                     help="one stage's sampling, e.g. fine.temperature=0.4 (repeatable; see below)")
    gen.add_argument("--guidance", type=float, dest="guidance_scale", help="classifier-free guidance scale (1 = off): MusicGen, and MusicLM packs with a guided stage")
    gen.add_argument("--melody", help="MusicGen-Melody: a reference sound file (WAV, FLAC, ...) whose chroma conditions the music")
    gen.add_argument("--negative-prompt", dest="negative_prompt", metavar="TEXT",
                     help="what guidance steers away from (the null row's text instead of none)")
    gen.add_argument("--audio-prompt", dest="audio_prompt", metavar="FILE",
                     help="MusicGen: a sound file to continue; the output begins with it and --duration counts it")
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--threads", type=_threads, help=THREADS_HELP)
    gen.add_argument("--dtype", default="float32")
    gen.add_argument("--quantize", choices=["int8", "int4", "bfloat16"],
                     help="int8 stage linears (see --int8-kernel); int4: 4-bit group-wise layer weights, int8 heads "
                          "(AVX-512 VNNI or AVX2); bfloat16: bfloat16 weights, float32 activations (AVX-512)")
    gen.add_argument("--codec-backend", default="auto", dest="codec_backend", help="auto | torch | onnxruntime | tensorrt")
    gen.add_argument("--linear-products", default="auto", dest="linear_products", choices=["auto", "linear", "matmul"],
                     help=LINEAR_HELP)
    gen.add_argument("--int8-kernel", default="auto", dest="int8_kernel", choices=["auto", "pack_mm", "amx", "vnni", "avx2"],
                     help=INT8_KERNEL_HELP)
    gen.add_argument("--kv-cache-dtype", default="auto", dest="kv_cache_dtype", help=KV_DTYPE_HELP)
    gen.add_argument("--steps-per-sync", type=int, default=1, dest="steps_per_sync",
                     help="CUDA: decode steps per host sync (not yet verified on a GPU)")
    gen.add_argument("--cuda-graphs", action="store_true", dest="cuda_graphs", help="CUDA: replay those steps as CUDA graphs")
    gen.add_argument("-o", "--output", required=True, help="output file (.wav .flac .mp3 .ogg .opus), or - for stdout")
    gen.add_argument("--format", choices=["wav", "flac", "mp3", "ogg", "opus"],
                     help="output format (default: the output's extension; WAV for stdout). ogg: Vorbis, opus: Opus in Ogg")
    gen.add_argument("--bits", type=int, choices=[16, 24, 32],
                     help="WAV and FLAC sample size (default 16; 32: float, WAV only, keeps samples past full scale)")
    gen.add_argument("--normalize", choices=["loudness", "peak", "clip", "none"], default="loudness",
                     help="level of the written audio (default loudness: -14 LUFS, peak <= -1 dBFS; see below)")
    gen.add_argument("--quiet", action="store_true", help="no progress bar, warnings or summary line")
    serve = sub.add_parser("serve", parents=[common], help="serve a pack over HTTP (OpenAI's /v1/audio/speech, /v1/music/generations, a web page)")
    serve.add_argument("--pack", required=True, action="append",
                       help="pack directory (with --ray: repeat for several packs, each under /<pack name>/)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    serve.add_argument("--threads", type=_threads, help=THREADS_HELP + " (--ray: each replica's)")
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
    serve.add_argument("--quantize", choices=["int8", "int4", "bfloat16"],
                     help="int8 stage linears (see --int8-kernel); int4: 4-bit group-wise layer weights, int8 heads "
                          "(AVX-512 VNNI or AVX2); bfloat16: bfloat16 weights, float32 activations (AVX-512)")
    serve.add_argument("--codec-backend", default="auto", dest="codec_backend")
    serve.add_argument("--linear-products", default="auto", dest="linear_products", choices=["auto", "linear", "matmul"],
                       help=LINEAR_HELP)
    serve.add_argument("--int8-kernel", default="auto", dest="int8_kernel", choices=["auto", "pack_mm", "amx", "vnni", "avx2"],
                       help=INT8_KERNEL_HELP)
    serve.add_argument("--kv-cache-dtype", default="auto", dest="kv_cache_dtype", help=KV_DTYPE_HELP)
    serve.add_argument("--kv-cache-gb", type=float, default=4.0, dest="kv_cache_gb")
    serve.add_argument("--log-level", default="info", dest="log_level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--ray", action="store_true", help="serve on Ray Serve: replicas behind its HTTP proxy ([ray] extra)")
    serve.add_argument("--ray-address", dest="ray_address", help="an existing Ray cluster (default: start one here)")
    serve.add_argument("--replicas", default="1", help="--ray: replicas per pack, or 'auto' (Serve's autoscaling)")
    serve.add_argument("--replica-cpus", type=float, default=1.0, dest="replica_cpus", help="--ray: CPUs per replica")
    serve.add_argument("--replica-gpus", type=float, default=0.0, dest="replica_gpus", help="--ray: GPUs (or a fraction) per replica")

    info = sub.add_parser("info", parents=[common], help="describe a pack")
    info.add_argument("pack")

    rand = sub.add_parser("random-pack", parents=[common], help="write a pack with random weights (tests, benchmarks)")
    rand.add_argument("output")
    rand.add_argument("--preset", default="tiny", choices=["tiny", "paper"])
    rand.add_argument("--seed", type=int, default=0)
    rand.add_argument("--force", action="store_true",
                      help="write into a directory that is not empty (its pack files are replaced, others kept)")

    export = sub.add_parser("export", parents=[common], help="write an exported form of a pack component into the pack")
    formats = export.add_subparsers(dest="format", required=True)
    onnx = formats.add_parser("onnx", parents=[common], help="the codec decoder as PACK/codec.onnx, checked against torch")
    onnx.add_argument("pack")
    onnx.add_argument("--opset", type=int, default=17)

    convert = sub.add_parser("convert", parents=[common], help="convert a checkpoint of another format into a pack")
    families = convert.add_subparsers(dest="family", required=True)
    musicgen = families.add_parser(
        "musicgen", parents=[common], help="a transformers MusicgenForConditionalGeneration or MusicgenMelodyForConditionalGeneration directory (or hub id)",
    )
    musicgen.add_argument("src")
    musicgen.add_argument("output")
    musicgen.add_argument("--window", type=float, default=30.0, help="seconds one decoder window generates")
    musicgen.add_argument("--stride", type=float, default=18.0, help="continuation stride in seconds")
    encodec = families.add_parser("encodec", parents=[common], help="a transformers EncodecModel directory: a codec pack")
    encodec.add_argument("src")
    encodec.add_argument("output")

    codec = sub.add_parser("codec", parents=[common], help="encode audio into codes or decode codes with a codec pack")
    codec_commands = codec.add_subparsers(dest="codec_command", required=True)
    encode = codec_commands.add_parser("encode", parents=[common], help="a sound file -> codes [levels, frames] (.npy)")
    encode.add_argument("audio")
    encode.add_argument("--pack", required=True, help="a codec pack (vivace convert encodec)")
    encode.add_argument("--levels", type=int, help="RVQ levels (default: all the pack has)")
    encode.add_argument("-o", "--output", required=True, help="codes file (.npy, int64)")
    decode = codec_commands.add_parser("decode", parents=[common], help="codes (.npy) -> a sound file")
    decode.add_argument("codes")
    decode.add_argument("--pack", required=True, help="a codec pack (vivace convert encodec)")
    decode.add_argument("-o", "--output", required=True, help="output file (.wav .flac .mp3 .ogg .opus)")
    decode.add_argument("--bits", type=int, choices=[16, 24, 32], help="WAV and FLAC sample size (default 16)")
    return parser




# -- generate ------------------------------------------------------------------------------------------------------
def stage_sampling(entries: Sequence[str]) -> dict[str, dict[str, float | int]]:
    """--stage STAGE.KEY=VALUE entries as the API's stage_sampling ({stage: {key: value}}); the last of a repeated
    STAGE.KEY wins. Only the form and the numbers are checked here: the engine checks the stage names and ranges."""
    result: dict[str, dict[str, float | int]] = {}
    for entry in entries:
        name, equals, text = entry.partition("=")
        stage, dot, key = name.strip().partition(".")
        if not equals or not dot or not stage or key not in _STAGE_KEYS:
            raise VivaceError(
                f"--stage {entry!r}: expected STAGE.KEY=VALUE with KEY temperature, top_k or top_p "
                "(e.g. --stage fine.temperature=0.4)"
            )
        key = _STAGE_KEYS[key]
        try:
            value: float | int = int(text) if key == "top_k" and text.strip().lstrip("+-").isdigit() else float(text)
        except ValueError:
            raise VivaceError(f"--stage {entry!r}: {text!r} is not a number") from None
        result.setdefault(stage, {})[key] = value
    return result


def _flag_names(message: str, parser: argparse.ArgumentParser) -> str:
    """An engine message with the API's argument names (guidance_scale, stage_sampling['fine'] top_k, ...) written as
    this command's flags. Names without a flag here stay as they are."""
    flags = {
        action.dest: action.option_strings[-1] for action in parser._actions
        if action.option_strings and action.option_strings[-1].startswith("--")
    }

    def flag(name: str) -> str | None:
        return flags.get(_API_DESTS.get(name, name))

    def unknown(match: re.Match) -> str:
        name, expected = match.group(1), match.group(2).split(", ")
        if flag(name) is None:
            return match.group(0)
        takes = [flag(e) for e in expected if flag(e) is not None]
        return f"{flag(name)} does not apply to this pack (it takes {', '.join(takes)})"

    message = re.sub(r"unknown sampling argument '(\w+)' \(expected ([\w, ]*)\)", unknown, message)
    message = re.sub(r"stage_sampling\['([^']*)'\] (temperature|top_k|top_p)", r"--stage \1.\2", message)
    message = re.sub(r"^(temperature|seed|duration)\b", lambda m: flag(m.group(1)) or m.group(1), message)
    return re.sub(r"(?<![\w.\-'/])([a-z]+(?:_[a-z]+)+)\b", lambda m: flag(m.group(1)) or m.group(1), message)


@contextlib.contextmanager
def _engine_errors(parser: argparse.ArgumentParser) -> Iterator[None]:
    try:
        yield
    except PackError:
        raise  # names the pack's own keys, which are not flags
    except VivaceError as exc:
        raise VivaceError(_flag_names(str(exc), parser)) from None


def _output(args: argparse.Namespace) -> tuple[Path | None, Any]:
    """The output file (None: stdout) and its format, refused before the pack loads if they cannot be written."""
    from vivace.audio import audio_format, check_output_path

    if args.output == "-":
        if sys.stdout.isatty():
            raise VivaceError("-o - writes audio to stdout, which is a terminal: redirect it (> out.wav, | player -)")
        return None, audio_format(None, args.format, args.bits)
    return check_output_path(args.output, args.format, args.bits), audio_format(args.output, args.format, args.bits)


def _prompt(args: argparse.Namespace) -> Any:
    from vivace.engine import Story

    if args.unconditional:
        if args.prompt is not None or args.segment:
            raise VivaceError("--unconditional takes no prompt and no --segment entries")
        return None
    if args.segment:
        if args.prompt is not None:
            raise VivaceError("give either a prompt or --segment entries, not both")
        try:
            return Story(tuple((text, float(seconds)) for text, seconds in args.segment))
        except ValueError:
            raise VivaceError(f"--segment seconds must be numbers, got {[s for _, s in args.segment]}") from None
    if args.prompt is None:
        raise VivaceError("a prompt (or --segment entries, or --unconditional) is required")
    return args.prompt


def _check_before_loading(args: argparse.Namespace, sampling: dict[str, Any], per_stage: dict[str, dict]) -> None:
    """The checks that need no pack, run before it loads (seconds on a CPU): the seed, a positive duration and the
    sampling values. The engine repeats them with the pack's limits and stage names; the messages are the same."""
    from vivace.arguments import check_seconds, check_seed
    from vivace.core.sampling import SamplingParams

    check_seed(args.seed)
    if args.duration is not None and args.duration != math.inf:  # too long needs the pack's limit
        check_seconds(args.duration, "duration", math.inf)
    SamplingParams(**{key: sampling[key] for key in ("temperature", "top_k", "top_p") if key in sampling}).validate()
    for stage, entry in per_stage.items():
        SamplingParams(**entry).validate(f"stage_sampling[{stage!r}] ")


def _override_warning(engine: Any, sampling: dict[str, Any], per_stage: dict[str, dict]) -> str | None:
    """One line when --temperature / --top-k / --top-p replaces a value a stage of the pack sets for itself."""
    defaults_of = getattr(engine.family, "sampling", None)  # MusicLM's per-stage defaults; MusicGen has one stage
    if defaults_of is None:
        return None
    defaults = defaults_of({})
    if len(defaults) < 2:
        return None
    replaced, given = [], []
    for key, flag in _GLOBAL_SAMPLING:
        if sampling.get(key) is None:
            continue
        stages = [s for s, p in defaults.items() if getattr(p, key) != sampling[key] and key not in per_stage.get(s, {})]
        if stages:
            given.append(f"{flag} {sampling[key]:g}")
            replaced.append(f"{key} " + ", ".join(f"{s} {getattr(defaults[s], key):g}" for s in stages))
    if not replaced:
        return None
    return (
        f"vivace: warning: {' and '.join(given)} replace{'s' if len(given) == 1 else ''} the pack's per-stage values "
        f"({'; '.join(replaced)}); a low value on every stage can freeze the music into a drone: "
        "--stage STAGE.KEY=VALUE sets one stage (see vivace generate --help)"
    )


def _terminal_size() -> tuple[int, int]:
    """stderr's terminal columns and lines, or 80 x 24 where it reports none: a pseudo-terminal without a size
    reads as 0 x 0, with which tqdm draws nothing."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return 80, 24
    return size.columns or 80, size.lines or 24


class _Progress:
    """One bar on stderr in seconds of audio, with the time left and the speed (seconds of audio per second).
    Audio is counted from AudioChunk events; until the first arrives (a family that decodes each clip whole sends
    one at the end) the last stage's token count stands for it, as its tokens are the clip's frames."""

    def __init__(self, total_s: float, last_stage: str) -> None:
        from tqdm import tqdm

        self.total_s, self.last_stage = total_s, last_stage
        self.decoded_s = 0.0
        self.started = time.monotonic()
        columns, lines = _terminal_size()
        self.bar = tqdm(
            total=round(total_s, 2), file=sys.stderr, leave=True,
            ncols=columns, nrows=lines,
            bar_format="{percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} s of audio [{elapsed}<{remaining}{postfix}]",
        )

    def _move(self, seconds: float, note: str) -> None:
        seconds = min(round(seconds, 2), self.bar.total)
        if seconds > self.bar.n:
            self.bar.update(seconds - self.bar.n)
        self.bar.set_postfix_str(note, refresh=False)
        self.bar.update(0)  # redraws at tqdm's interval, so the clock moves while nothing is decoded

    def audio(self, seconds: float) -> None:
        self.decoded_s += seconds
        speed = self.decoded_s / max(time.monotonic() - self.started, 1e-9)
        self._move(self.decoded_s, f"{speed:.2f}x real time")

    def tokens(self, stage: str, done: int, total: int) -> None:
        if self.decoded_s == 0 and stage == self.last_stage and total > 0:
            self._move(self.total_s * done / total, stage)
        elif self.decoded_s == 0:
            self._move(self.bar.n, stage)

    def close(self) -> None:
        self.bar.close()


def _generate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from vivace import audio as vaudio
    from vivace.engine import Engine
    from vivace.events import AudioChunk, StageProgress

    output, fmt = _output(args)
    prompt = _prompt(args)
    adaptive = _set_threads(args.threads)
    per_stage = stage_sampling(args.stage)
    sampling = {k: getattr(args, k) for k in ("temperature", "top_k", "top_p", "guidance_scale") if getattr(args, k) is not None}
    if per_stage:
        sampling["stage_sampling"] = per_stage
    if args.melody is not None:
        sampling["melody"] = args.melody
    for key in ("audio_prompt", "negative_prompt"):
        if getattr(args, key) is not None:
            sampling[key] = getattr(args, key)
    terminal = not args.quiet and sys.stderr.isatty()
    with _engine_errors(parser):
        _check_before_loading(args, sampling, per_stage)
        engine = Engine.from_pack(
            args.pack, device=args.device, dtype=args.dtype, quantize=args.quantize, codec_backend=args.codec_backend,
            linear_products=args.linear_products, adaptive_threads=adaptive, int8_kernel=args.int8_kernel,
            steps_per_sync=args.steps_per_sync, cuda_graphs=args.cuda_graphs, kv_cache_dtype=args.kv_cache_dtype,
        )
        vaudio.check_sample_rate(fmt, engine.sample_rate)
        events = engine.events(prompt, args.duration, seed=args.seed, **sampling)
        if terminal:
            warning = _override_warning(engine, sampling, per_stage)
            if warning:
                print(warning, file=sys.stderr)
    total_s = args.duration if args.duration is not None else sum(seconds for _, seconds in prompt.segments)
    progress = _Progress(total_s, list(engine.family.stages())[-1]) if terminal else None
    pieces: list[np.ndarray] = []
    try:
        # a third-party print during generation must not corrupt audio sent to stdout
        with contextlib.redirect_stdout(sys.stderr) if output is None else contextlib.nullcontext():
            for event in events:
                if isinstance(event, AudioChunk):
                    pieces.append(event.pcm)
                    if progress:
                        progress.audio(len(event.pcm) / engine.sample_rate)
                elif isinstance(event, StageProgress) and progress:
                    progress.tokens(event.stage, event.done, event.total)
    finally:
        if progress:
            progress.close()
    raw = np.concatenate(pieces)
    audio = vaudio.normalize(raw, args.normalize, engine.sample_rate)
    clipped = vaudio.clipped_samples(audio, fmt)
    if output is None:
        _write_stdout(vaudio.encode(audio, engine.sample_rate, fmt))
    else:
        vaudio.write_audio(output, audio, engine.sample_rate, args.format, args.bits)
    if not args.quiet:
        level = vaudio.loudness(audio, engine.sample_rate)
        summary = (
            f"wrote {'stdout' if output is None else output} ({len(audio) / engine.sample_rate:.2f} s at "
            f"{engine.sample_rate} Hz, {fmt}; after --normalize {args.normalize}: {level:.1f} LUFS, "
            f"peak {vaudio.peak_dbfs(audio):.1f} dBFS"
        )
        if clipped:
            summary += f", {clipped} samples clipped at full scale"
        print(summary + ")", file=sys.stderr)


def _info(pack: str) -> dict[str, Any]:
    from vivace.packs.manifest import read_manifest
    from vivace.packs.registry import CODEC_PACKS

    if read_manifest(pack).get("family") in CODEC_PACKS:
        from vivace.codecs.codec_pack import Codec

        return Codec.from_pack(pack).info()
    from vivace.engine import Engine

    return Engine.from_pack(pack).info()


def _codec(args: argparse.Namespace) -> None:
    """vivace codec encode | decode: the output is checked before the pack loads and written whole or not at all."""
    from vivace import audio as vaudio
    from vivace.codecs.codec_pack import Codec

    if args.codec_command == "encode":
        output = Path(args.output)
        if output.suffix != ".npy":
            raise VivaceError(f"-o {args.output}: codes are written as a .npy file")
        if not output.parent.is_dir():
            raise VivaceError(f"-o {args.output}: the folder {output.parent} does not exist")
        codec = Codec.from_pack(args.pack)
        codes = codec.encode(args.audio, levels=args.levels)
        buffer = io.BytesIO()
        np.save(buffer, codes)
        vaudio.write_atomically(output, buffer.getvalue())
        print(f"wrote {output} (codes {list(codes.shape)}: {codes.shape[0]} levels x {codes.shape[1]} frames)", file=sys.stderr)
        return
    fmt = vaudio.audio_format(args.output, None, args.bits)
    output = vaudio.check_output_path(args.output, None, args.bits)
    try:
        codes = np.load(args.codes, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise VivaceError(f"{args.codes}: not a .npy array of codes ({exc})") from None
    codec = Codec.from_pack(args.pack)
    vaudio.check_sample_rate(fmt, codec.sample_rate)
    pcm = codec.decode(codes)
    vaudio.write_audio(output, pcm, codec.sample_rate, None, args.bits)
    print(f"wrote {output} ({len(pcm) / codec.sample_rate:.2f} s at {codec.sample_rate} Hz, {fmt})", file=sys.stderr)


def _write_stdout(data: bytes) -> None:
    try:
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    except BrokenPipeError:
        # the reader left (| head): send the rest of this process's output nowhere, so exit does not fail again
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise VivaceError("stdout was closed before the audio was written") from None
    except OSError as exc:
        raise VivaceError(f"could not write the audio to stdout: {exc.strerror or exc}") from None


# -- third-party output ----------------------------------------------------------------------------------------------
_TRANSFORMERS_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
                        "error": logging.ERROR, "critical": logging.CRITICAL}


@contextlib.contextmanager
def _third_party_quiet(verbose: bool) -> Iterator[None]:
    """transformers' logging and progress bars ("Loading weights", "Writing model shards"), huggingface_hub's
    download bars and Python's warnings are silenced while a command runs, then put back as they were (a Python
    caller of main keeps its settings). transformers is not imported for this: a command that imports it finds
    huggingface_hub's bars off, which transformers' own follow, and TRANSFORMERS_VERBOSITY=error."""
    if verbose:
        yield
        return
    hub = _import_quietly("huggingface_hub.utils")
    hub_bars = hub is not None and not hub.are_progress_bars_disabled() and "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ
    if hub_bars:
        hub.disable_progress_bars()
    hf_logging = sys.modules.get("transformers.utils.logging")
    if hf_logging is not None:
        verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    saved_env = os.environ.get("TRANSFORMERS_VERBOSITY")
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if saved_env is None:
            del os.environ["TRANSFORMERS_VERBOSITY"]
        else:
            os.environ["TRANSFORMERS_VERBOSITY"] = saved_env
        loaded = sys.modules.get("transformers.utils.logging")
        if hf_logging is not None:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
        elif loaded is not None:  # imported during the command: the defaults it would have had
            loaded.set_verbosity(_TRANSFORMERS_LEVELS.get((saved_env or "").lower(), logging.WARNING))
            if hub_bars:
                loaded.enable_progress_bar()
        if hub_bars:
            hub.enable_progress_bars()


def _import_quietly(name: str) -> Any:
    """An optional module, or None when it is missing or broken (the command that needs it reports that itself)."""
    try:
        return __import__(name, fromlist=["_"])
    except Exception:
        return None


def _check_threads(threads: int | str | None) -> bool:
    """Whether --threads asks for auto; a count below 1 is refused."""
    if isinstance(threads, int) and threads < 1:
        raise VivaceError(f"--threads must be at least 1, got {threads}")
    return threads == "auto"


def _set_threads(threads: int | str | None) -> bool:
    """Sets a fixed --threads count for the process; True for auto (the engine's ThreadGovernor then chooses)."""
    from vivace.threads import set_threads

    if _check_threads(threads):
        return True
    if threads is not None:
        set_threads(int(threads))
    return False


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
        "linear_products": args.linear_products, "adaptive_threads": args.threads == "auto",
        "int8_kernel": args.int8_kernel, "kv_cache_dtype": args.kv_cache_dtype,
        "kv_cache_gb": args.kv_cache_gb, "max_running": args.max_running, "max_waiting": args.max_queue,
    }
    if args.ray:
        from vivace.server.run import serve_on_ray

        fixed = None if _check_threads(args.threads) else args.threads
        serve_on_ray(args.pack, settings, engine_options, replica_options(args), args.ray_address, fixed)
        return
    if len(args.pack) > 1:
        raise VivaceError("several --pack need --ray (one process serves one pack)")
    _set_threads(args.threads)
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
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:  # --help, or a bad flag (one line on stderr, from _Parser.error)
        return exit.code if isinstance(exit.code, int) else 2
    command = {action.dest: action for action in parser._actions}["command"].choices[args.command]
    try:
        with _third_party_quiet(args.verbose):
            if args.command == "generate":
                _generate(args, command)
            elif args.command == "serve":
                with _engine_errors(command):
                    _serve(args)
            elif args.command == "info":
                print(json.dumps(_info(args.pack), indent=2))
            elif args.command == "codec":
                _codec(args)
            elif args.command == "random-pack":
                from vivace.families.musiclm.random_pack import random_pack

                print(random_pack(Path(args.output), preset=args.preset, seed=args.seed, force=args.force))
            elif args.command == "convert" and args.family == "encodec":
                from vivace.export.encodec import convert_encodec_pack

                print(convert_encodec_pack(args.src, args.output))
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
