"""The process's torch intra-op threads (torch.set_num_threads): a setting of the process, not of an engine.

Tokens are drawn from numbers hashed from seed, window and step, and the stage transformers' logits came out
identical at 1 and 2 threads in every case tried, so tokens do not move with the thread count. Codec audio decoded
by torch's convolutions does, in its last bits: oneDNN chooses its blocking by the thread count, so the same codes
decoded at 1 and at 2 threads differ by a few float32 ulps (under 1e-5 of full scale); the native causal convolutions
(a float32 SoundStream stream on a CPU with AVX-512) sum in one order at any count and give the same bytes
(tests/test_threads.py has both). Bytes are identical between runs at the same thread count, which is why
`vivace serve --threads` and the Ray replicas' `threads` exist: pin them to the count of the reference the served
audio is compared with.
"""
from __future__ import annotations

import ctypes
import functools
import statistics
from collections import deque
from collections.abc import Callable
from pathlib import Path

import torch

from vivace.errors import VivaceError


@functools.cache
def _pause_openmp() -> Callable[[int], int] | None:
    """omp_pause_resource_all of the GNU OpenMP runtime this process loaded (torch's Linux CPU wheels ship libgomp),
    or None (another runtime, or another system)."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    paths = {line.split()[-1] for line in maps if "/libgomp" in line and ".so" in line}
    for path in sorted(paths):
        try:
            return getattr(ctypes.CDLL(path), "omp_pause_resource_all")
        except (OSError, AttributeError):
            continue
    return None


def release_thread_team() -> bool:
    """Frees the OpenMP thread team of the calling thread (torch's intra-op workers it started); its next parallel
    region starts a new one. Returns whether a GNU OpenMP runtime did so.

    libgomp keeps one team per thread that ever ran a parallel region, and counts every docked worker of every team
    against the cores: once two threads own teams on a 2-core machine, its workers stop spinning between regions
    and every region of either thread pays a futex wake-up (docs/performance.md, "Serving", has the measurement).
    AsyncEngine calls this before its core's thread starts."""
    pause = _pause_openmp()
    return pause is not None and pause(1) == 0  # 1: omp_pause_soft (the runtime keeps its state)


def check_threads(threads: object) -> int:
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise VivaceError(f"threads must be a positive integer, got {threads!r}")
    return threads


def set_threads(threads: int) -> None:
    """torch's intra-op threads for this process, from now on."""
    torch.set_num_threads(check_threads(threads))


class ThreadGovernor:
    """Chooses, between an engine's steps, whether they run on all of its threads or on one, by timing both.

    Every parallel region of torch ends with its threads waiting for each other, spinning at first; when another
    process holds one of the cores, a descheduled thread stalls the rest, and a step on 2 threads can take many times
    as long as quiet, while one thread is barely slowed (benchmarks/neighbour.py; README, "A busy neighbour"). So every `probe_every` steps
    the governor runs `probe_steps` steps on the other count, interleaved with as many on the current one, and keeps
    the faster by median (the other only when it saves a tenth: neighbouring steps cost nearly the same, a joining
    request's prefill lands in one sample of the median). A probe whose first step on the other count takes over
    LOSING times the step beside it on the current count ends there, lost: on a busy machine that is 2 threads
    against 1, in quiet 1 against 2, and the two further pairs would only repeat it slowly. A probe that loses doubles
    the wait before the next, up to `max_wait` steps, so a lasting neighbour costs few slow probes. Two steps in a row
    on all threads that take over SLOW_STEP times the median of the recent ones (a neighbour arriving) bring the next
    probe forward to the next step. One slow step does not (a joining request's prefill), nor do slow steps on one
    thread: a neighbour leaving makes steps faster, and a probe of all threads beside a neighbour costs several
    single-thread steps' time (README, "A busy neighbour").

    Tokens do not depend on the thread count (module docstring); codec audio differs in its last bits between counts,
    so a run whose bytes must repeat pins a count instead (`threads` an integer, the default).
    """

    SLOW_STEP = 2.0  # a neighbour slows every step of the native decoder stack on 2 threads 3-4x (README)
    LOSING = 1.5
    RECENT = 16

    def __init__(self, threads: int, probe_every: int = 64, probe_steps: int = 3, max_wait: int = 1024) -> None:
        self.full = check_threads(threads)
        self.current = self.full
        self.probe_every, self.probe_steps, self.max_wait = probe_every, probe_steps, max_wait
        self.wait = probe_every
        self.steps_since = 0
        self.plan: list[int] = []  # thread counts of the probe's coming steps
        self.samples: dict[int, list[float]] = {}
        self.recent: deque[float] = deque(maxlen=self.RECENT)  # the last steps' seconds on the current count
        self.slow_steps = 0  # steps in a row slower than SLOW_STEP times the recent median

    @property
    def other(self) -> int:
        return 1 if self.current != 1 else self.full

    def threads_for_next_step(self) -> int:
        """The count the next step runs on (the caller sets it and times the step)."""
        if not self.plan and self.full > 1 and self.steps_since >= self.wait:
            self.plan = [self.other, self.current] * self.probe_steps
            self.samples = {self.other: [], self.current: []}
        return self.plan[0] if self.plan else self.current

    def step_took(self, threads: int, seconds: float) -> None:
        if not self.plan:
            self.steps_since += 1
            slow = len(self.recent) >= 4 and seconds > self.SLOW_STEP * statistics.median(self.recent)
            self.slow_steps = self.slow_steps + 1 if slow else 0
            if self.slow_steps >= 2 and self.current == self.full:
                self.steps_since = max(self.steps_since, self.wait)
            self.recent.append(seconds)
            return
        self.plan.pop(0)
        self.samples[threads].append(seconds)
        other, current = self.other, self.current
        first_pair = len(self.samples[other]) == 1 and len(self.samples[current]) == 1
        if first_pair and self.samples[other][0] > self.LOSING * self.samples[current][0]:
            self.plan.clear()
        if self.plan:
            return
        if statistics.median(self.samples[other]) < 0.9 * statistics.median(self.samples[current]):
            self.current, self.wait = other, self.probe_every
            self.recent.clear()
        else:
            self.wait = min(2 * self.wait, self.max_wait)
        self.steps_since = self.slow_steps = 0
