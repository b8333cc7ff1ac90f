"""Which product a float32 linear layer runs on the CPU for a few rows, chosen by measuring on this machine.

For 2 to 64 rows, x W^T (F.linear) and W x^T (one matrix product that reads W once) are both candidates: which is
faster depends on the CPU, the BLAS torch was built with and the thread count (docs/performance.md has a host where
W x^T is the faster at 2 rows and one where it is 2x slower). `measure` times both for each layer shape and row bucket
and keeps W x^T only where it wins by a margin, so a layer is never slower than the plain op by more than the noise of
the measurement. Plans are cached per CPU model, torch version and thread count (`PlanCache`), so a machine measures
once and every later engine on it runs the same products (bytes repeat across processes).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from vivace.errors import VivaceError

ROW_BUCKETS = (2, 4, 8, 16, 32, 64)  # rows r run as the smallest bucket >= r; 1 row and > 64 rows take F.linear
MODES = ("auto", "linear", "matmul")
WIN_MARGIN = 0.9  # W x^T is kept only when it takes under 90 % of F.linear's time
REPEATS = 5  # timed rounds per candidate, alternating; the median counts
ROUND_S = 0.002  # a round repeats the product until it takes this long (at most MAX_CALLS calls)
MAX_CALLS = 50


def bucket(rows: int) -> int | None:
    """The row bucket a batch of rows runs as (None: F.linear, whatever the plan)."""
    if rows < 2 or rows > ROW_BUCKETS[-1]:
        return None
    return next(b for b in ROW_BUCKETS if b >= rows)


def matmul_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = torch.matmul(weight, x.T).T.contiguous()
    return y + bias if bias is not None else y


@dataclass(frozen=True)
class LinearPlan:
    """The row buckets at which each (in_features, out_features) layer runs W x^T instead of F.linear."""

    matmul_buckets: dict[tuple[int, int], frozenset[int]] = field(default_factory=dict)

    def buckets(self, in_features: int, out_features: int) -> frozenset[int]:
        return self.matmul_buckets.get((in_features, out_features), frozenset())

    @staticmethod
    def everywhere(shapes: Iterable[tuple[int, int]]) -> LinearPlan:
        """W x^T at every bucket: the rule vivace used before it measured (mode "matmul")."""
        return LinearPlan({shape: frozenset(ROW_BUCKETS) for shape in shapes})


def planned_shapes(model: torch.nn.Module) -> set[tuple[int, int]]:
    """The (in_features, out_features) of the layers below model that follow a plan (vivace.model.transformer.Linear
    on the CPU in float32; an int8 or bfloat16 layer has no such choice)."""
    return {
        (m.in_features, m.out_features) for m in model.modules()
        if hasattr(m, "matmul_buckets") and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"
    }


def apply(plan: LinearPlan, model: torch.nn.Module) -> None:
    for module in model.modules():
        if hasattr(module, "matmul_buckets"):
            module.matmul_buckets = plan.buckets(module.in_features, module.out_features)


def _time(call: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - start) / calls


def median_seconds(candidates: Sequence[Callable[[], object]]) -> list[float]:
    """Seconds per call of each candidate, after one warm-up call each: medians of REPEATS alternating rounds, a
    round repeating a call until the first candidate has run about ROUND_S (at most MAX_CALLS calls)."""
    for call in candidates:
        call()
    calls = max(1, min(MAX_CALLS, round(ROUND_S / max(_time(candidates[0], 1), 1e-7))))
    times: list[list[float]] = [[] for _ in candidates]
    for _ in range(REPEATS):
        for index, call in enumerate(candidates):
            times[index].append(_time(call, calls))
    return [statistics.median(t) for t in times]


def timings(weight: torch.Tensor, rows: int, generator: torch.Generator) -> tuple[float, float]:
    """Seconds per call of F.linear and of W x^T on rows x in_features of random float32 data (the products' speed
    does not depend on the values)."""
    x = torch.randn(rows, weight.shape[1], generator=generator)
    linear_s, matmul_s = median_seconds([lambda: F.linear(x, weight), lambda: matmul_product(x, weight, None)])
    return linear_s, matmul_s


@torch.inference_mode()
def measure(shapes: Iterable[tuple[int, int]], buckets: Iterable[int] = ROW_BUCKETS) -> LinearPlan:
    """Times both products for each shape and bucket; W x^T is kept where it takes under WIN_MARGIN of F.linear's
    time."""
    plan: dict[tuple[int, int], frozenset[int]] = {}
    generator = torch.Generator().manual_seed(0)
    for in_features, out_features in sorted(set(shapes)):
        weight = torch.randn(out_features, in_features, generator=generator)
        wins = set()
        for rows in buckets:
            linear_s, matmul_s = timings(weight, rows, generator)
            if matmul_s < WIN_MARGIN * linear_s:
                wins.add(rows)
        plan[(in_features, out_features)] = frozenset(wins)
    return LinearPlan(plan)


def cpu_and_torch() -> str:
    """The CPU model and torch's version and build."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu} | torch {torch.__version__}"


def machine_key(threads: int | None = None) -> str:
    """What a plan depends on: the CPU model, torch's version and build, and the thread count."""
    threads = torch.get_num_threads() if threads is None else threads
    return f"{cpu_and_torch()} | {threads} threads"


def default_cache_path() -> Path:
    """$VIVACE_CACHE_DIR, else $XDG_CACHE_HOME/vivace, else ~/.cache/vivace; the plans are linear_plans.json."""
    root = os.environ.get("VIVACE_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vivace"
    return Path(root) / "linear_plans.json"


@dataclass(frozen=True)
class PlanCache:
    """Measured plans on disk, one per machine_key; a shape measured once is not measured again."""

    path: Path

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def entries(self, key: str) -> dict:
        """What is stored under key ({} if nothing, or something unreadable)."""
        stored = self._read().get(key)
        return stored if isinstance(stored, dict) else {}

    def store(self, key: str, entries: dict) -> None:
        """Stores entries under key, keeping every other key. A cache that cannot be written (a read-only home)
        costs a measurement per engine, nothing else."""
        data = self._read()
        data[key] = entries
        self._write(data)

    def plan(self, shapes: Iterable[tuple[int, int]], key: str | None = None) -> LinearPlan:
        """The plan for shapes on this machine, measuring (and storing) the shapes not measured before."""
        key = machine_key() if key is None else key
        stored = self.entries(key)
        known: dict[tuple[int, int], frozenset[int]] = {}
        for name, value in stored.items():
            try:
                in_features, out_features = (int(v) for v in name.split("x"))
                known[(in_features, out_features)] = frozenset(int(b) for b in value if int(b) in ROW_BUCKETS)
            except (ValueError, TypeError):
                continue
        wanted = set(shapes)
        missing = wanted - set(known)
        if missing:
            known.update(measure(missing).matmul_buckets)
            self.store(key, {f"{i}x{o}": sorted(buckets) for (i, o), buckets in sorted(known.items())})
        return LinearPlan({shape: known[shape] for shape in wanted})

    def _write(self, data: dict) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=self.path.parent, suffix=".tmp", delete=False) as file:
                json.dump(data, file, indent=1, sort_keys=True)
            os.replace(file.name, self.path)
        except OSError:
            pass


def check_linear_products(mode: object) -> str:
    if mode not in MODES:
        raise VivaceError(f"linear_products must be one of {', '.join(MODES)}, got {mode!r}")
    return mode  # type: ignore[return-value]


def plan_linears(models: Iterable[torch.nn.Module], mode: str, cache: PlanCache | None = None) -> LinearPlan:
    """Sets the products of every planned layer of models: "auto" measures (once per machine, cached), "linear" runs
    F.linear everywhere, "matmul" W x^T for every 2 to 64 rows."""
    models = list(models)
    shapes = set().union(*(planned_shapes(model) for model in models))
    if mode == "linear" or not shapes:
        plan = LinearPlan()
    elif mode == "matmul":
        plan = LinearPlan.everywhere(shapes)
    else:
        plan = (cache or PlanCache(default_cache_path())).plan(shapes)
    for model in models:
        apply(plan, model)
    return plan
