"""Running the app: `vivace serve` builds one AsyncEngine from a pack and serves it with uvicorn until SIGTERM / SIGINT.

On SIGTERM the server stops accepting connections and /ready answers 503, running requests may finish for the grace
period, then the ones still streaming are cancelled (which aborts them in the engine) and the process exits 0.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import signal
import socket
import threading
from collections.abc import Iterator
from typing import Any

from vivace.async_engine import AsyncEngine
from vivace.errors import VivaceError
from vivace.server.app import ServerSettings, create_app

SERVE_MODULES = ("fastapi", "uvicorn", "prometheus_client", "multipart")  # the [serve] extra
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def uvicorn_server(engine: AsyncEngine, settings: ServerSettings, log_level: str = "info") -> Any:
    """A uvicorn.Server for the app on `engine` (not started)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            app.state.vivace.accepting = False  # /ready answers 503 from now on
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            """SIGINT / SIGTERM start the graceful shutdown; unlike uvicorn's own, the signal is not raised again
            afterwards, so a server stopped on purpose exits 0."""
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    app = create_app(engine, settings)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=log_level, lifespan="off",
        timeout_graceful_shutdown=settings.shutdown_grace_s, access_log=log_level == "debug",
    )
    return Server(config)


def serve(pack: str, settings: ServerSettings, engine_options: dict[str, Any]) -> None:
    """Serves a pack until stopped; bad options raise VivaceError before anything binds."""
    missing = [name for name in SERVE_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise VivaceError(f"vivace serve needs the [serve] extra (pip install 'vivace[serve]'): {', '.join(missing)} missing")
    if settings.host not in LOCAL_HOSTS and settings.api_key is None:
        logging.getLogger("vivace.server").warning(
            "serving on %s without --api-key: anyone who reaches this address can generate", settings.host,
        )
    check_address(settings.host, settings.port)
    with AsyncEngine.from_pack(pack, **engine_options) as engine:
        uvicorn_server(engine, settings).run()


def check_address(host: str, port: int) -> None:
    """Fails with one line, before the pack loads, when the address cannot be listened on (in use, unknown host)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.create_server((host, port), family=family):
            pass
    except OSError as error:
        raise VivaceError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
