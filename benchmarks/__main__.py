"""python -m benchmarks [SUITE ...] [--quick] [--work-dir DIR] [--device DEV] [--threads N] [--musiclm-dtype DTYPE]
                     [--modes MODE,...]

Suites run in the order demo, musiclm, musicgen, floor, cpu_attention, serving, serve_load, ray_load, versus,
neighbour, serving_kv, stack_rows (the floor suite reads the others' newest results); each prints its tables and writes benchmarks/results/<suite>-<date>.json. Models are built
once and cached in --work-dir. Without a SUITE every suite but serve_load, ray_load, versus,
neighbour, serving_kv and stack_rows runs: the first two
start `vivace serve` (ray_load also `vivace serve --ray`, a local Ray cluster) on a free local port and need the
[serve] extra and httpx (ray_load the [ray] extra too); versus (vivace against transformers, alternating rounds)
repeats the musicgen suite's comparison at length; neighbour times a generation beside a busy process; serving_kv
alternates bfloat16 and int8 KV caches under 8 clients; stack_rows times one decode call of the native decoder stack
with its threads on row slices and on split layers. They run only when named.
"""
from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path

import torch

from benchmarks.common import Options

SUITES = {
    "demo": "benchmarks.demo_suite", "musiclm": "benchmarks.musiclm_suite", "musicgen": "benchmarks.musicgen_suite",
    "floor": "benchmarks.floor", "cpu_attention": "benchmarks.cpu_attention", "serving": "benchmarks.serving", "serve_load": "benchmarks.serve_load",
    "ray_load": "benchmarks.ray_load", "versus": "benchmarks.versus",
    "neighbour": "benchmarks.neighbour", "serving_kv": "benchmarks.serving_kv", "stack_rows": "benchmarks.stack_rows",
}
NAMED_ONLY = ("serve_load", "ray_load", "versus", "neighbour", "serving_kv", "stack_rows")
DEFAULT = [name for name in SUITES if name not in NAMED_ONLY]  # what runs when no suite is named (see the docstring)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[1])
    parser.add_argument("suites", nargs="*", metavar="SUITE",
                        help=f"any of {', '.join(SUITES)} (default: all but {' and '.join(NAMED_ONLY)})")
    parser.add_argument("--quick", action="store_true", help="short clips and fewer batch sizes (a smoke run)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/vivace-bench"), help="where built models are cached")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--musiclm-dtype", default="bfloat16", help="the MusicLM stages' dtype (the pack stores bfloat16)")
    parser.add_argument("--modes", default="", help="musicgen suite: only these vivace modes, comma-separated "
                        "(e.g. 'int8,int8 kv-int8'; float32, the agreement reference, always runs)")
    args = parser.parse_args()
    unknown = sorted(set(args.suites) - set(SUITES))
    if unknown:
        parser.error(f"unknown suite {unknown[0]!r} (choose from {', '.join(SUITES)})")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    modes = tuple(mode.strip() for mode in args.modes.split(",") if mode.strip())
    options = Options(args.quick, args.work_dir, args.device, args.threads, args.musiclm_dtype, modes)
    chosen = [name for name in SUITES if name in args.suites] if args.suites else DEFAULT
    for name in chosen:
        start = time.perf_counter()
        print(f"== {name} ==", flush=True)
        importlib.import_module(SUITES[name]).run(options)
        print(f"({name}: {time.perf_counter() - start:.0f} s)\n", flush=True)


if __name__ == "__main__":
    main()
