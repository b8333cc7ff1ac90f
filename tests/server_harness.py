"""A vivace server on localhost for one test: uvicorn in a background thread on an ephemeral port, always stopped."""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from vivace import AsyncEngine, Engine
from vivace.server.app import ServerSettings
from vivace.server.run import uvicorn_server

START_TIMEOUT_S = 30.0


@dataclass
class Served:
    url: str  # http://127.0.0.1:PORT
    engine: Engine
    shared: AsyncEngine
    server: object  # uvicorn.Server

    @property
    def state(self):  # the app's ServerState
        return self.server.config.app.state.vivace


@contextmanager
def running_server(engine: Engine, settings: ServerSettings = ServerSettings()) -> Iterator[Served]:
    shared = AsyncEngine(engine)
    server = uvicorn_server(shared, replace(settings, host="127.0.0.1", port=0, shutdown_grace_s=2.0), log_level="warning")
    thread = threading.Thread(target=server.run, name="vivace-test-server", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield Served(f"http://127.0.0.1:{port}", engine, shared, server)
    finally:
        server.should_exit = True
        thread.join(timeout=START_TIMEOUT_S)
        shared.close()
        assert not thread.is_alive(), "the test server did not stop"


@pytest.fixture(scope="module")
def offline(tiny_pack: Path) -> Engine:
    """The tiny pack's engine for offline references (a module's own: served engines are separate objects)."""
    return Engine.from_pack(tiny_pack)


@pytest.fixture(scope="module")
def served(tiny_pack: Path) -> Iterator[Served]:
    """A server on the tiny pack for a test module."""
    with running_server(Engine.from_pack(tiny_pack)) as served:
        yield served
