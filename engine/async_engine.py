"""AsyncEngine: an Engine whose core steps in one background thread, for many asyncio tasks and threads at once.

Every caller's rows join the same running batch. `stream_async` / `events_async` are async iterators; `stream`,
`events` and `generate` block the calling thread and are safe to call from many threads. Leaving a loop early,
cancelling the task that reads it, or closing the iterator aborts the call's requests and frees their blocks
before the core's next step. A reader is woken only for what it reads (Forward): audio chunks for stream and
generate; windows, chunks and the end for events, each preceded by its stages' latest progress, not a progress
event per step.

The core's thread is the one thread that runs torch's parallel regions: starting it frees the calling thread's
OpenMP team (vivace.threads.release_thread_team), which would otherwise slow every region of both.

An event loop never waits for a running step: `submit_async` adds requests from a worker thread, and an async
call's abort is handed to the core's thread, which applies it before its next step. A server's other streams keep
flowing while one request joins or leaves.
"""
from __future__ import annotations

import asyncio
import queue
import threading
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from vivace.arguments import PromptLike, check_bool
from vivace.core.engine_core import RequestOutput
from vivace.engine import Call, Engine, Sink, assemble
from vivace.events import AudioChunk, Event, StageProgress
from vivace.threads import release_thread_team


class Forward:
    """A call's sink that wakes its reader (an event loop or a thread) only for what the reader needs, instead of at
    every step: with audio_only, outputs without audio are dropped with their other events; otherwise an output
    carrying nothing but progress is held, and its stages' latest progress goes out at the head of the request's
    next output (a window, a chunk, the end). Final and failed outputs always go out."""

    def __init__(self, put: Sink, audio_only: bool) -> None:
        self.put = put
        self.audio_only = audio_only
        self._progress: dict[int, dict[str, StageProgress]] = {}

    def __call__(self, output: RequestOutput) -> None:
        if self.audio_only:
            output.events = [event for event in output.events if isinstance(event, AudioChunk)]
        elif all(isinstance(event, StageProgress) for event in output.events):
            held = self._progress.setdefault(output.request_id, {})
            held.update((event.stage, event) for event in output.events)
            if not (output.finished or output.error is not None):
                return
            output.events = []
        if output.events or output.finished or output.error is not None:
            output.events = [*self._progress.pop(output.request_id, {}).values(), *output.events]
            self.put(output)


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._work = threading.Condition()
        self._stopped = False
        self._aborts: list[int] = []  # requests to abort before the core's next step (from event loops)
        self._thread = threading.Thread(target=self._run_core, name="vivace-engine-core", daemon=True)
        release_thread_team()  # the engine was loaded (and maybe run) here: see the module docstring
        self._thread.start()

    @classmethod
    def from_pack(cls, *args: Any, **kwargs: Any) -> AsyncEngine:
        """Engine.from_pack's arguments."""
        return cls(Engine.from_pack(*args, **kwargs))

    @property
    def sample_rate(self) -> int:
        return self.engine.sample_rate

    @property
    def running(self) -> bool:
        """The core's thread is alive (not closed, not crashed)."""
        return self._thread.is_alive() and not self._stopped

    def _run_core(self) -> None:
        while True:
            with self._work:
                while not self._stopped and not self._aborts and not self.engine.core.has_unfinished():
                    self._work.wait()
                if self._stopped:
                    return
                aborts, self._aborts = self._aborts, []
            self.engine.abort(aborts)
            self.engine.step()

    def abort_soon(self, request_ids: Iterable[int]) -> None:
        """Aborts requests before the core's next step, without waiting for the running one (event loops call this)."""
        with self._work:
            self._aborts.extend(request_ids)
            self._work.notify()

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
            self.engine.abort(self._aborts)
            self.engine.deliver(self.engine.core.fail_all("the engine was closed"))

    def __enter__(self) -> AsyncEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- asyncio -----------------------------------------------------------------------------------------------
    async def events_async(
        self, prompt: PromptLike, duration_s: float | None = None, seed: int | Sequence[int] = 0, **options: Any,
    ) -> AsyncIterator[Event]:
        async for event in self._events_async(self.engine.requests(prompt, duration_s, seed, options), audio_only=False):
            yield event

    async def stream_async(
        self, prompt: PromptLike, duration_s: float | None = None, seed: int | Sequence[int] = 0, **options: Any,
    ) -> AsyncIterator[AudioChunk]:
        specs = self.engine.requests(prompt, duration_s, seed, self.engine.family.stream_options(options))
        async for event in self._events_async(specs, audio_only=True):
            yield event

    async def generate_async(
        self, prompt: PromptLike, duration_s: float | None = None, seed: int | Sequence[int] = 0, *,
        return_codes: bool = False, **options: Any,
    ) -> np.ndarray | tuple[np.ndarray, list[np.ndarray]]:
        check_bool(return_codes, "return_codes")
        specs = self.engine.requests(prompt, duration_s, seed, self.engine.family.whole_options(options))
        chunks = [event async for event in self._events_async(specs, audio_only=True)]
        return assemble(chunks, return_codes)

    async def submit_async(
        self, prompt: PromptLike, duration_s: float | None = None, seed: int | Sequence[int] = 0, *, stream: bool = True,
        **options: Any,
    ) -> AsyncCall:
        """Validates the arguments and adds the call's requests now (VivaceError / EngineBusy are raised here, before
        any output), in a worker thread; the returned AsyncCall yields their events (audio chunks as they are
        decoded when stream, whole clips otherwise) and must be closed (`async with` or close())."""
        family = self.engine.family
        options = family.stream_options(options) if stream else family.whole_options(options)
        # Refuse at once when not even one more request fits (read without the lock, which a running step holds:
        # requests only leave meanwhile, so this never refuses what the locked check below would take).
        self.engine.core.check_capacity(1)
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[RequestOutput | None] = asyncio.Queue()

        def submit() -> Call:
            specs = self.engine.requests(prompt, duration_s, seed, options)
            return self._submit(specs, Forward(lambda output: loop.call_soon_threadsafe(inbox.put_nowait, output), audio_only=False))

        def abort_when_added(done: asyncio.Future[Call]) -> None:
            if done.exception() is None:
                self.abort_soon(done.result().pending)

        pending = loop.run_in_executor(None, submit)
        try:
            call = await asyncio.shield(pending)
        except asyncio.CancelledError:  # the caller left while its requests were being added
            pending.add_done_callback(abort_when_added)
            raise
        return AsyncCall(self, call, inbox)

    async def _events_async(self, specs: list[Any], audio_only: bool) -> AsyncIterator[Event]:
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[RequestOutput | None] = asyncio.Queue()
        forward = Forward(lambda output: loop.call_soon_threadsafe(inbox.put_nowait, output), audio_only)
        call = AsyncCall(self, self._submit(specs, forward), inbox)
        async with call:
            async for event in call:
                yield event

    # -- threads -----------------------------------------------------------------------------------------------
    def events(self, prompt: PromptLike, duration_s: float | None = None, seed: int | Sequence[int] = 0, **options: Any) -> Iterator[Event]:
        return self._events(self.engine.requests(prompt, duration_s, seed, options), audio_only=False)

    def stream(self, prompt: PromptLike, duration_s: float | None = None, seed: int | Sequence[int] = 0, **options: Any) -> Iterator[AudioChunk]:
        specs = self.engine.requests(prompt, duration_s, seed, self.engine.family.stream_options(options))
        return self._events(specs, audio_only=True)

    def generate(
        self, prompt: PromptLike, duration_s: float | None = None, seed: int | Sequence[int] = 0, *,
        return_codes: bool = False, **options: Any,
    ) -> np.ndarray | tuple[np.ndarray, list[np.ndarray]]:
        check_bool(return_codes, "return_codes")
        specs = self.engine.requests(prompt, duration_s, seed, self.engine.family.whole_options(options))
        return assemble(self._events(specs, audio_only=True), return_codes)

    def _events(self, specs: list[Any], audio_only: bool) -> Iterator[Event]:
        inbox: queue.SimpleQueue[RequestOutput] = queue.SimpleQueue()
        call = self._submit(specs, Forward(inbox.put, audio_only))
        try:
            while call.pending:
                yield from call.events(inbox.get())
        finally:
            self.engine.abort(call.pending)


class CallClosed(Exception):
    """Raised to the reader of an AsyncCall that was closed while its requests were still running."""


class AsyncCall:
    """The requests of one call as an event loop reads them: `async for event in call` yields their events in order
    and raises VivaceError when one fails; close() aborts what is still running (before the core's next step) and
    wakes a reader still waiting, with CallClosed."""

    def __init__(self, owner: AsyncEngine, call: Call, inbox: asyncio.Queue[RequestOutput | None]) -> None:
        self._owner = owner
        self._call = call
        self._inbox = inbox
        self._ready: deque[Event] = deque()
        self._closed = False

    @property
    def request_ids(self) -> list[int]:
        return self._call.request_ids

    def __aiter__(self) -> AsyncCall:
        return self

    async def __anext__(self) -> Event:
        while not self._ready:
            if not self._call.pending:
                raise StopAsyncIteration
            if self._closed:
                raise CallClosed(f"requests {sorted(self._call.pending)} were aborted")
            output = await self._inbox.get()
            if output is not None:  # None: close() woke this reader
                self._ready.extend(self._call.events(output))
        return self._ready.popleft()

    def close(self) -> None:
        if self._call.pending and not self._closed:
            self._owner.abort_soon(self._call.pending)
            self._inbox.put_nowait(None)
        self._closed = True

    async def __aenter__(self) -> AsyncCall:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
