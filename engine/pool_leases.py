"""KV pools kept across an engine's generations, each with the device decode loops built on it.

A CUDA graph holds the addresses of the cache it was captured on, so graphs outlive a generation only if its pool
does; reusing the pool also spares each request the allocation of its cache. A generation takes one pool per stage
and gives it back when it ends (run out, closed, or collected); a generation running at the same time gets pools of
its own, so concurrent generations never share a cache.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from vivace.device_decode import DeviceLoops
from vivace.events import Event
from vivace.kv_cache import KVCachePool


@dataclass(frozen=True)
class PoolLease:
    stage: str
    num_blocks: int
    pool: KVCachePool
    device_loops: DeviceLoops


class PoolLeases:
    """At most one free pool per stage: taking a pool of another size for a stage drops the free one first."""

    def __init__(self) -> None:
        self._free: dict[str, PoolLease] = {}

    def take(self, stage: str, num_blocks: int, make: Callable[[int], tuple[KVCachePool, DeviceLoops]]) -> PoolLease:
        """The free pool of this stage and size, or a new one from make(num_blocks)."""
        free = self._free.pop(stage, None)
        if free is not None and free.num_blocks == num_blocks:
            return free
        del free  # before the new pool is allocated: at most one of them is alive
        pool, device_loops = make(num_blocks)
        return PoolLease(stage, num_blocks, pool, device_loops)

    def give_back(self, lease: PoolLease) -> None:
        lease.device_loops.unbind()
        self._free[lease.stage] = lease

    def returned_after(self, events: Iterator[Event], leases: list[PoolLease]) -> Iterator[Event]:
        """events, giving the leases back once they end, however they end."""
        try:
            yield from events
        finally:
            for lease in leases:
                self.give_back(lease)
