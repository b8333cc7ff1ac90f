"""Host time of one decode step besides the model: the step's inputs, the draw and the advance of every sequence.

Three ways to do the same step, on the same logits:
- "C++ step": vivace._C.DecodeBatch, what the engine runs: missing_blocks() + prepare() + sample_and_advance(logits);
- "Py + C sampler": the per-sequence Python bookkeeping the engine ran before (ids, positions, slots, block tables,
  SamplingBatch, append) around vivace._C.sample;
- "Python": the same bookkeeping around the plain-torch reference sampler vivace.kernels.sampling.sample.
Also the sampler alone (vivace._C.sample), one thread and one per core.

Run from the repository root: python -m benchmarks.host_overhead [--quick]
Prints a table and writes benchmarks/results/host_overhead-<date>.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import cpu_model, git, versions
from vivace import _C
from vivace.kernels.sampling import SamplingBatch, sample

BATCHES = (1, 16, 64, 256)
VOCABS = (1024, 2048)
PARAMS = {
    "top_k=250": dict(temperature=1.0, top_k=250, top_p=1.0),
    "temp=0.95": dict(temperature=0.95, top_k=0, top_p=1.0),  # MusicLM's stages: temperature only
    "top_p=0.9": dict(temperature=1.0, top_k=0, top_p=0.9),
}
LOGIT_STD = 3.0
PROMPT_LEN = 64
BLOCK_SIZE = 16
MIN_SECONDS = 0.25
MIN_CALLS = {"native": 200, "python": 5}
MAX_CALLS = 20_000  # the C++ step's sequences hold this many new tokens
TARGET = dict(batch=64, vocab=1024, params="top_k=250", us_per_step=50.0)


def median_us(step: Callable[[], object], kind: str) -> float:
    step()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < MIN_CALLS[kind] or (time.perf_counter() - start < MIN_SECONDS and len(times) < MAX_CALLS):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e6)


class NativeStep:
    """A batch of one-level time-major sequences over the whole vocabulary, stepped by vivace._C.DecodeBatch."""

    def __init__(self, batch: int, vocab: int, params: dict, seeds: np.ndarray, logits: np.ndarray, steps: int) -> None:
        self.logits = logits.reshape(batch, 1, vocab)
        schedule = _C.TokenSchedule.time_major(1, vocab, 0)
        max_len = PROMPT_LEN + steps
        self.states = [_C.SequenceState(schedule, np.zeros((PROMPT_LEN, 1), np.int64), max_len) for _ in range(batch)]
        for i, state in enumerate(self.states):
            blocks = -(-max_len // BLOCK_SIZE)
            state.block_table = list(range(i * blocks, (i + 1) * blocks))
        self.batch = _C.DecodeBatch(
            BLOCK_SIZE, [[state] for state in self.states],
            temperature=np.full(batch, params["temperature"]), top_k=np.full(batch, params["top_k"], np.int64),
            top_p=np.full(batch, params["top_p"]), seed=seeds, stream=np.arange(batch, dtype=np.uint64),
            guidance_scale=np.ones(batch),
        )

    def __call__(self) -> None:
        self.batch.missing_blocks()
        self.batch.prepare()
        self.batch.sample_and_advance(self.logits)


class PythonStep:
    """The same step as per-sequence Python: inputs from lists, a SamplingBatch, one sampler call, appends."""

    def __init__(self, batch: int, vocab: int, params: dict, seeds: np.ndarray, logits: np.ndarray, native: bool) -> None:
        self.vocab, self.params, self.seeds = vocab, params, seeds
        self.logits = torch.from_numpy(logits)
        self.rows = [[(0,)] * PROMPT_LEN for _ in range(batch)]
        blocks = 1 << 12
        self.tables = [list(range(i * blocks, (i + 1) * blocks)) for i in range(batch)]
        self.native = native

    def __call__(self) -> None:
        ids, positions, slots = [], [], []
        for rows, table in zip(self.rows, self.tables):
            pos = len(rows) - 1
            ids.append(rows[pos])
            positions.append(pos)
            slots.append(table[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE)
        used = max(-(-len(rows) // BLOCK_SIZE) for rows in self.rows)
        torch.tensor(ids), torch.tensor(positions), torch.tensor(slots)
        torch.tensor([table[:used] for table in self.tables], dtype=torch.int32)
        torch.tensor([len(rows) for rows in self.rows], dtype=torch.int32)
        n, p = len(self.rows), self.params
        batch = SamplingBatch(
            temperature=torch.tensor([p["temperature"]] * n, dtype=torch.float64),
            top_k=torch.tensor([p["top_k"]] * n, dtype=torch.int64),
            top_p=torch.tensor([p["top_p"]] * n, dtype=torch.float64),
            vocab_lo=torch.tensor([0] * n, dtype=torch.int64), vocab_hi=torch.tensor([self.vocab] * n, dtype=torch.int64),
            seed=self.seeds, stream=np.arange(n, dtype=np.uint64),
            step=np.array([len(rows) for rows in self.rows], dtype=np.uint64),
        )
        if self.native:
            tokens = _C.sample(self.logits, batch.temperature.numpy(), batch.top_k.numpy(), batch.top_p.numpy(),
                               batch.vocab_lo.numpy(), batch.vocab_hi.numpy(), batch.seed, batch.stream, batch.step)
            drawn = tokens.tolist()
        else:
            drawn = sample(self.logits, batch).tolist()
        for rows, token in zip(self.rows, drawn):
            rows.append((token,))


def measure(batch: int, vocab: int, params: dict, rng: np.random.Generator) -> dict:
    logits = rng.normal(0.0, LOGIT_STD, (batch, vocab)).astype(np.float32)
    seeds = rng.integers(0, 2**63, batch, dtype=np.uint64)
    native_steps = MAX_CALLS + 2

    check = NativeStep(batch, vocab, params, seeds, logits, 4)
    reference = PythonStep(batch, vocab, params, seeds, logits, native=False)
    for _ in range(3):
        check()
        reference()
    assert [s.rows().ravel().tolist() for s in check.states] == [[r[0] for r in rows] for rows in reference.rows], \
        "C++ step and Python reference disagree"

    columns = dict(
        temperature=np.full(batch, params["temperature"]), top_k=np.full(batch, params["top_k"], np.int64),
        top_p=np.full(batch, params["top_p"]), vocab_lo=np.zeros(batch, np.int64), vocab_hi=np.full(batch, vocab, np.int64),
        seed=seeds, stream=np.arange(batch, dtype=np.uint64),
    )
    step_counter = iter(range(1 << 40))

    def sampler(threads: int) -> Callable[[], object]:
        return lambda: _C.sample(logits, **columns, step=np.full(batch, next(step_counter), np.uint64), num_threads=threads)

    return {
        "step_us": {
            "C++ step": median_us(NativeStep(batch, vocab, params, seeds, logits, native_steps), "native"),
            "Py + C sampler": median_us(PythonStep(batch, vocab, params, seeds, logits, native=True), "native"),
            "Python": median_us(PythonStep(batch, vocab, params, seeds, logits, native=False), "python"),
        },
        "sampler_us": {"threads=1": median_us(sampler(1), "native"), "threads=auto": median_us(sampler(0), "native")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 1 and 64, vocabulary 1024, top-k only")
    args = parser.parse_args()
    # The reference runs single-threaded: on a shared host torch's intra-op threads wait at barriers for
    # a busy core, which would flatter the native side.
    torch_default_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    load_before = os.getloadavg()
    batches, vocabs = ((1, 64), (1024,)) if args.quick else (BATCHES, VOCABS)
    params_set = {"top_k=250": PARAMS["top_k=250"]} if args.quick else PARAMS
    rows = []
    header = (f"{'batch':>5} {'vocab':>5} {'params':>9} | {'C++ step':>9} {'Py + C':>9} {'Python':>9} | "
              f"{'sampler 1 thr':>13} {'auto':>8}  (us per step)")
    print(header)
    print("-" * len(header))
    for name, params in params_set.items():
        for vocab in vocabs:
            for batch in batches:
                r = measure(batch, vocab, params, rng)
                s = r["step_us"]
                rows.append(dict(batch=batch, vocab=vocab, params=name, **r))
                print(f"{batch:>5} {vocab:>5} {name:>9} | {s['C++ step']:>9.1f} {s['Py + C sampler']:>9.1f} {s['Python']:>9.1f} | "
                      f"{r['sampler_us']['threads=1']:>13.1f} {r['sampler_us']['threads=auto']:>8.1f}")
    target_row = next(r for r in rows if r["batch"] == TARGET["batch"] and r["vocab"] == TARGET["vocab"] and r["params"] == TARGET["params"])
    measured = target_row["step_us"]["C++ step"]
    met = measured <= TARGET["us_per_step"]
    print(f"\ntarget: batch {TARGET['batch']}, vocab {TARGET['vocab']}, {TARGET['params']}: C++ step {measured:.1f} us "
          f"(goal <= {TARGET['us_per_step']:.0f} us) -> {'met' if met else 'not met'}")

    now = datetime.datetime.now(datetime.timezone.utc)
    report = {
        "benchmark": "host_overhead",
        "date": now.isoformat(timespec="seconds"),
        "device": {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "load_average_before": load_before,
                   "load_average_after": os.getloadavg()},
        "versions": versions(),
        "git_commit": git("rev-parse", "HEAD"),
        "config": {
            "quick": args.quick, "batches": batches, "vocabs": vocabs, "params": params_set,
            "logits": f"normal(0, {LOGIT_STD}) float32, whole vocabulary allowed, one level per sequence",
            "sequences": f"time-major, {PROMPT_LEN}-row prompt, block size {BLOCK_SIZE}, blocks assigned up front",
            "timing": f"median wall time of one step over >= {MIN_SECONDS} s and >= {MIN_CALLS} calls",
            "C++ step": "DecodeBatch.missing_blocks() + prepare() + sample_and_advance(logits), default threads",
            "Py + C sampler": "per-sequence Python inputs, SamplingBatch and appends around vivace._C.sample",
            "Python": f"the same around vivace.kernels.sampling.sample, torch.set_num_threads(1) (default here: {torch_default_threads})",
            "sampler": "vivace._C.sample alone, num_threads 1 and 0 (= one per hardware thread, capped by the work)",
        },
        "target": {**TARGET, "measured_us": measured, "met": met},
        "results": rows,
    }
    out = Path(__file__).parent / "results" / f"host_overhead-{now.date().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
