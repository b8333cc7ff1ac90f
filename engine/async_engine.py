"""AsyncEngine: an Engine whose core steps in one background thread, for many asyncio tasks and threads at once.

Every caller's rows join the same running batch. `stream_async` / `events_async` are async iterators; `stream`,
`events` and `generate` block the calling thread and are safe to call from many threads. Leaving a loop early,
cancelling the task that reads it, or closing the iterator aborts the call's requests and frees their blocks
before the core's next step.
"""
from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import numpy as np

from vivace.arguments import PromptLike
from vivace.core.engine_core import RequestOutput
from vivace.engine import Call, Engine, Sink, assemble
from vivace.events import AudioChunk, Event


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._work = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run_core, name="vivace-engine-core", daemon=True)
        self._thread.start()

    @classmethod
    def from_pack(cls, *args: Any, **kwargs: Any) -> AsyncEngine:
        """Engine.from_pack's arguments."""
        return cls(Engine.from_pack(*args, **kwargs))

    @property
    def sample_rate(self) -> int:
        return self.engine.sample_rate

    def _run_core(self) -> None:
        while True:
            with self._work:
                while not self._stopped and not self.engine.core.has_unfinished():
                    self._work.wait()
                if self._stopped:
                    return
            self.engine.step()

    def _submit(self, specs: list[Any], sink: Sink) -> Call:
        call = Call(self.engine.submit(specs, sink))
        with self._work:
            self._work.notify()
        return call

    def close(self) -> None:
        """Stops the core's thread (requests still running are aborted)."""
        with self._work:
            self._stopped = True
            self._work.notify()
        self._thread.join()
        with self.engine._lock:
            self.engine.deliver(self.engine.core.fail_all("the engine was closed"))

    def __enter__(self) -> AsyncEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- asyncio -----------------------------------------------------------------------------------------------
    async def events_async(
        self, prompt: PromptLike, duration_s: float | None = None, seed: int | Sequence[int] = 0, **options: Any,
    ) -> AsyncIterator[Event]:
        async for event in self._events_async(self.engine.requests(prompt, duration_s, seed, options)):
            yield event

    async def stream_async(
        self, prompt: PromptLike, duration_s: float | None = None, seed: int | Sequence[int] = 0, **options: Any,
    ) -> AsyncIterator[AudioChunk]:
        specs = self.engine.requests(prompt, duration_s, seed, self.engine.family.stream_options(options))
        async for event in self._events_async(specs):
            if isinstance(event, AudioChunk):
                yield event

    async def generate_async(
        self, prompt: PromptLike, duration_s: float | None = None, seed: int | Sequence[int] = 0, **options: Any,
    ) -> np.ndarray:
        specs = self.engine.requests(prompt, duration_s, seed, self.engine.family.whole_options(options))
        return assemble([event async for event in self._events_async(specs) if isinstance(event, AudioChunk)])

    async def _events_async(self, specs: list[Any]) -> AsyncIterator[Event]:
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[RequestOutput] = asyncio.Queue()
        call = self._submit(specs, lambda output: loop.call_soon_threadsafe(inbox.put_nowait, output))
        try:
            while call.pending:
                for event in call.events(await inbox.get()):
                    yield event
        finally:
            self.engine.abort(call.pending)

    # -- threads -----------------------------------------------------------------------------------------------
    def events(self, prompt: PromptLike, duration_s: float | None = None, seed: int | Sequence[int] = 0, **options: Any) -> Iterator[Event]:
        return self._events(self.engine.requests(prompt, duration_s, seed, options))

    def stream(self, prompt: PromptLike, duration_s: float | None = None, seed: int | Sequence[int] = 0, **options: Any) -> Iterator[AudioChunk]:
        specs = self.engine.requests(prompt, duration_s, seed, self.engine.family.stream_options(options))
        return (event for event in self._events(specs) if isinstance(event, AudioChunk))

    def generate(self, prompt: PromptLike, duration_s: float | None = None, seed: int | Sequence[int] = 0, **options: Any) -> np.ndarray:
        specs = self.engine.requests(prompt, duration_s, seed, self.engine.family.whole_options(options))
        return assemble(event for event in self._events(specs) if isinstance(event, AudioChunk))

    def _events(self, specs: list[Any]) -> Iterator[Event]:
        inbox: queue.SimpleQueue[RequestOutput] = queue.SimpleQueue()
        call = self._submit(specs, inbox.put)
        try:
            while call.pending:
                yield from call.events(inbox.get())
        finally:
            self.engine.abort(call.pending)
