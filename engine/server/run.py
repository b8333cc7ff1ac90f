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
RAY_MODULES = ("ray", "ray.serve")  # the [ray] extra
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
    require(SERVE_MODULES, "serve")
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


def require(modules: tuple[str, ...], extra: str) -> None:
    missing = [name for name in modules if importlib.util.find_spec(name.split(".")[0]) is None]
    if missing:
        raise VivaceError(f"this needs the [{extra}] extra (pip install 'vivace[{extra}]'): {', '.join(missing)} missing")


def serve_on_ray(
    packs: list[str], settings: ServerSettings, engine_options: dict[str, Any], deployment_options: dict[str, Any],
    address: str | None = None, threads: int | None = None,
) -> None:
    """Serves packs on Ray Serve until SIGTERM / SIGINT: one application per pack (at / for one pack, else at
    /<pack directory name>), replicas as deployment_options say with `threads` torch threads each (None: Ray's
    default, the replica's num_cpus), Serve's HTTP proxy on settings.host:port."""
    require(SERVE_MODULES + RAY_MODULES, "ray")
    from pathlib import Path

    from vivace.packs.manifest import read_manifest

    names = [Path(pack).resolve().name for pack in packs]
    for pack in packs:
        read_manifest(pack)  # a missing or broken pack fails here, in one line, before Ray starts
    if len(set(names)) != len(names):
        raise VivaceError(f"packs need distinct directory names to be routed apart, got {names}")
    check_address(settings.host, settings.port)

    import ray
    from ray import serve

    from vivace.server.ray_serve import PackDeployment

    ray.init(address=address, configure_logging=False)
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which sets its own; a signal while deploying counts
        signal.signal(sig, lambda *_: stopped.set())
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        for pack, name in zip(packs, names):
            application = PackDeployment(pack, engine_options, settings, deployment_options, threads).application()
            serve.run(application, name=name, route_prefix="/" if len(packs) == 1 else f"/{name}")
        stopped.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
