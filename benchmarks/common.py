"""What every suite shares: the machine record, timing, peak RSS, tables and the JSON result files."""
from __future__ import annotations

import datetime
import gc
import importlib.metadata
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "numpy", "triton", "onnx", "onnxruntime", "vivace")


@dataclass(frozen=True)
class Options:
    """The command line, as every suite sees it."""

    quick: bool
    work_dir: Path
    device: str
    threads: int | None
    musiclm_dtype: str
    modes: tuple[str, ...] = ()  # the musicgen suite's vivace modes to run (empty: all); float32, its reference, always runs


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def gpu_name() -> str | None:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    found["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return found


def machine(device: str) -> dict[str, Any]:
    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "device": device,
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu_name(),
        "load_average": os.getloadavg(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "versions": versions(),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
    }


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_calls(call: Callable[[], object], device: str, repeats: int, warmup: int = 1) -> list[float]:
    """Seconds per call, each measured alone."""
    for _ in range(warmup):
        call()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def median_ms(times: Sequence[float]) -> float:
    return statistics.median(times) * 1e3


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS mark of this process (Linux clear_refs 5), so that getrusage reports the
    peak of what follows; False when the kernel does not allow it (then the peak is since process start)."""
    release_memory()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mb() -> float:
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def rss_mb() -> float:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except OSError:
        return float("nan")
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS:
    """with PeakRSS() as memory: ...; memory.record() -> the process RSS before and its peak during the block
    (and the peak of allocated CUDA memory when a GPU is present)."""

    def __enter__(self) -> PeakRSS:
        self.reset = reset_peak_rss()
        self.before = rss_mb()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak = peak_rss_mb()
        self.gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None

    def record(self) -> dict[str, Any]:
        found = {"rss_before_mb": round(self.before, 1), "peak_rss_mb": round(self.peak, 1), "peak_reset": self.reset}
        return found if self.gpu_peak is None else {**found, "peak_cuda_allocated_mb": round(self.gpu_peak, 1)}


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = [" | ".join(h.rjust(w) for h, w in zip(headers, widths)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(([title] if title else []) + lines)


def write_result(suite: str, options: Options, config: dict[str, Any], results: dict[str, Any]) -> Path:
    now = datetime.datetime.now(datetime.timezone.utc)
    report = {
        "suite": suite,
        "date": now.isoformat(timespec="seconds"),
        "machine": machine(options.device),
        "config": {"quick": options.quick, "threads": torch.get_num_threads(), **config},
        "results": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = result_path(suite, options.device, report["machine"], now.date())
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return path


def result_path(suite: str, device: str, machine_record: dict[str, Any], day: datetime.date) -> Path:
    """A file name under RESULTS that holds no earlier result: figures are appended, never overwritten.

    The first run of a day is <suite>[-<device>]-<date>.json; another machine's first run of that day gets its CPU (and
    GPU) in the name, and each later run on the same machine -run2, -run3, ...
    """
    kind = torch.device(device).type
    suffix = "" if kind == "cpu" else f"-{kind}"  # CPU files keep their historical names
    path = RESULTS / f"{suite}{suffix}-{day.isoformat()}.json"
    if _written_elsewhere(path, machine_record):  # another machine's figures of the day stay beside these
        slug = re.sub(r"[^a-z0-9]+", "-", f"{machine_record['cpu']} {machine_record['gpu'] or ''}".lower()).strip("-")
        path = path.with_name(f"{path.stem}-{slug[:60]}.json")
    stem, run = path.stem, 2
    while path.exists():
        path = path.with_name(f"{stem}-run{run}.json")
        run += 1
    return path


def _written_elsewhere(path: Path, machine_record: dict[str, Any]) -> bool:
    """Whether path holds a result of another CPU or GPU."""
    try:
        previous = json.loads(path.read_text()).get("machine", {})
    except (OSError, ValueError, AttributeError):
        return False
    return (previous.get("cpu"), previous.get("gpu")) != (machine_record.get("cpu"), machine_record.get("gpu"))


def latest_result(suite: str, device: str = "cpu") -> tuple[Path, dict[str, Any]] | None:
    """The newest benchmarks/results/<suite>[-<device>]-<date>.json run on this kind of device, by recorded date."""
    found = []
    for path in RESULTS.glob(f"{suite}-*.json"):
        try:
            report = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        ran_on = torch.device(report.get("machine", {}).get("device", "cpu")).type
        if report.get("suite") == suite and ran_on == torch.device(device).type:
            found.append((report.get("date", ""), path, report))
    if not found:
        return None
    _, path, report = max(found, key=lambda item: item[0])
    return path, report
