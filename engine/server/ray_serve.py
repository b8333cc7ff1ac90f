"""vivace on Ray Serve (the `[ray]` extra): replicas that each own one AsyncEngine and serve the same app as
`vivace serve`, behind Ray Serve's HTTP proxy.

Each pack is one Serve application whose deployment's replicas run `create_app` on their own engine: the same
endpoints, streaming, errors and metrics as one process, with `X-Vivace-Replica` naming the replica that answered.
Ray Serve routes requests among the replicas and autoscales them; several packs are several applications behind the
one proxy, each under its own route prefix (`/<model>/v1/...`), or at `/` when there is one.

`vivace serve --ray` runs it on a local or existing Ray cluster; `serve run serve_config.yaml` (or `serve deploy`)
builds the same application from `app_builder`.
"""
from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from ray import serve
from ray.serve import Application
from ray.serve import metrics as serve_metrics

from vivace.async_engine import AsyncEngine
from vivace.threads import check_threads, set_threads
from vivace.server.app import ServerSettings, create_app

SERVER_FIELDS = ("api_key", "model_name", "max_duration_s", "default_duration_s", "max_prompt_chars", "max_body_bytes", "retry_after_s")


@serve.ingress()
class VivaceReplica:
    """One replica: one engine, one app (built on the replica, after the engine exists), its metrics mirrored into
    Ray's."""

    def __init__(
        self, pack: str, engine_options: dict[str, Any], settings: ServerSettings, threads: int | None = None,
    ) -> None:
        if threads is not None:  # the replica is its own process: its torch threads are its own
            set_threads(threads)
        self.settings = replace(settings, replica_id=serve.get_replica_context().replica_tag)
        self.engine = AsyncEngine.from_pack(pack, **engine_options)
        self.mirror: MetricsMirror | None = None

    def __serve_build_asgi_app__(self) -> Any:
        app = create_app(self.engine, self.settings)
        self.mirror = MetricsMirror(app.state.vivace.metrics.registry)
        return app

    def __del__(self) -> None:
        if self.mirror is not None:
            self.mirror.stop()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


class MetricsMirror:
    """Copies a replica's Prometheus registry into Ray Serve's metrics every `period_s`, so that each node's Ray
    metrics endpoint exports every replica's figures tagged with its application, deployment and replica (the
    proxy's /metrics shows one replica at a time). Every sample is mirrored as a gauge of the same name and labels:
    counters and histogram buckets keep their values, not their types."""

    def __init__(self, registry: CollectorRegistry, period_s: float = 1.0) -> None:
        self.registry = registry
        self.period_s = period_s
        self.gauges: dict[str, serve_metrics.Gauge] = {}
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vivace-metrics-mirror", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(self.period_s):
            self.copy()

    def copy(self) -> None:
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name.endswith("_created"):  # timestamps of the counters' creation: no figure
                    continue
                gauge = self.gauges.get(sample.name)
                if gauge is None:
                    gauge = serve_metrics.Gauge(sample.name, family.documentation, tag_keys=tuple(sorted(sample.labels)))
                    self.gauges[sample.name] = gauge
                gauge.set(sample.value, tags=dict(sample.labels))

    def stop(self) -> None:
        self._stopped.set()


@dataclass(frozen=True)
class PackDeployment:
    """One pack as a Serve application: the engine's options, the server's settings and Serve's deployment options
    (num_replicas or autoscaling_config, max_ongoing_requests, max_queued_requests, ray_actor_options) and each
    replica's torch threads (None: Ray's default, the replica's num_cpus through OMP_NUM_THREADS)."""

    pack: str
    engine_options: Mapping[str, Any] = field(default_factory=dict)
    settings: ServerSettings = ServerSettings()
    deployment_options: Mapping[str, Any] = field(default_factory=dict)
    threads: int | None = None

    def application(self, name: str = "vivace") -> Application:
        deployment = serve.deployment(VivaceReplica, name=name, **self.deployment_options)
        return deployment.bind(self.pack, dict(self.engine_options), self.settings, self.threads)


def app_builder(args: dict[str, Any]) -> Application:
    """The application of a Serve config file's `args`: `pack`, and optionally `engine` (Engine.from_pack's
    options), `server` (ServerSettings fields: api_key, model_name, max_duration_s, ...), `threads` (each
    replica's torch threads) and `deployment` (Serve's deployment options; autoscaling and resources usually go in
    the config's `deployments` section instead)."""
    unknown = sorted(set(args) - {"pack", "engine", "server", "deployment", "threads"})
    if unknown or "pack" not in args:
        raise ValueError(f"vivace's Serve args take pack, engine, server, threads, deployment; got {sorted(args)}")
    server = dict(args.get("server") or {})
    bad = sorted(set(server) - set(SERVER_FIELDS))
    if bad:
        raise ValueError(f"unknown server setting {bad[0]!r} (expected one of {', '.join(SERVER_FIELDS)})")
    threads = args.get("threads")
    if threads is not None:
        check_threads(threads)
    pack = str(Path(args["pack"]).resolve())  # replicas may start in another directory: pass them an absolute path
    return PackDeployment(
        pack, dict(args.get("engine") or {}), ServerSettings(**server), dict(args.get("deployment") or {}),
        args.get("threads"),
    ).application()
