"""The process's torch intra-op threads (torch.set_num_threads): a setting of the process, not of an engine.

Tokens are drawn from numbers hashed from seed, window and step, and the stage transformers' logits came out
identical at 1 and 2 threads in every case tried, so tokens do not move with the thread count. Codec audio does, in
its last bits: oneDNN's convolutions choose their blocking by the thread count, so the same codes decoded at 1 and at 2
threads differ by a few float32 ulps (under 1e-5 of full scale; tests/test_threads.py). Bytes are identical between
runs at the same thread count, which is why `vivace serve --threads` and the Ray replicas' `threads` exist: pin
them to the count of the reference the served audio is compared with.
"""
from __future__ import annotations

import torch

from vivace.errors import VivaceError


def check_threads(threads: object) -> int:
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise VivaceError(f"threads must be a positive integer, got {threads!r}")
    return threads


def set_threads(threads: int) -> None:
    """torch's intra-op threads for this process, from now on."""
    torch.set_num_threads(check_threads(threads))
