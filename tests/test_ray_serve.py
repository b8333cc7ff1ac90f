"""vivace on Ray Serve: a local Ray cluster on this machine, two replicas of a tiny pack behind Serve's HTTP proxy.
Responses equal offline generation, requests spread over both replicas, and a replica killed mid-run fails only its
own in-flight requests, cleanly, while later requests are served. The cluster is always shut down."""
from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import ray
import yaml
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from server_harness import offline  # noqa: F401 - fixture

from vivace import Engine
from vivace.server.audio_formats import pcm16
from vivace.server.ray_serve import PackDeployment, app_builder

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Serve's own pydantic-v1-style fields

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = httpx.Timeout(120.0)
REPLICAS = 2
MAX_ONGOING = 3  # per replica: more concurrent requests than one replica takes must spread over both


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_vivace_serve_ray_routes_two_packs_and_stops_on_sigterm(tiny_pack: Path, offline: Engine, tmp_path: Path) -> None:
    """The command line: `vivace serve --ray` with two packs starts a local cluster, serves each pack under its own
    prefix through Serve's proxy, and shuts the cluster down on SIGTERM (exit 0). Runs before the module's
    in-process cluster exists."""
    second = Path(shutil.copytree(tiny_pack, tmp_path / "second"))
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "vivace", "serve", "--ray", "--pack", str(tiny_pack), "--pack", str(second),
         "--port", str(port), "--replicas", "1", "--replica-cpus", "0.5", "--threads", "1", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,  # --threads 1: the offline reference's count (conftest)
    )
    urls = [f"http://127.0.0.1:{port}/{tiny_pack.name}", f"http://127.0.0.1:{port}/second"]
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if all(httpx.get(f"{url}/ready", timeout=5).status_code == 200 for url in urls):
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "vivace serve --ray did not become ready"
            time.sleep(0.2)
        replicas = set()
        for url in urls:
            result = speech(url, 7, 0.5)
            assert result["status"] == 200 and result["audio"] == pcm16(offline.generate("piano", 0.5, seed=7)[0])
            replicas.add(result["replica"])
        assert len(replicas) == 2  # one replica per pack
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=90) == 0, server.stdout.read().decode()[-2000:]
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_the_repository_serve_config_is_valid_and_builds(tmp_path: Path) -> None:
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    (application,) = config["applications"]
    assert application["import_path"] == "vivace.server.ray_serve:app_builder"
    assert app_builder({**application["args"], "pack": str(REPO / application["args"]["pack"])}) is not None


@pytest.fixture(scope="module")
def ray_metrics_url() -> str:
    return f"http://127.0.0.1:{free_port()}/metrics"


@pytest.fixture(scope="module")
def cluster(tiny_pack: Path, ray_metrics_url: str):
    port = free_port()
    ray.init(
        num_cpus=REPLICAS, include_dashboard=False, log_to_driver=False, configure_logging=False,
        _metrics_export_port=int(ray_metrics_url.split(":")[2].split("/")[0]),
        _system_config={"metrics_report_interval_ms": 500},  # the replicas' mirrored metrics show up within a second
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # threads=1: the offline reference's count (conftest); audio bytes repeat exactly only at one count
        deployment = PackDeployment(str(tiny_pack), threads=1, deployment_options={
            "num_replicas": REPLICAS, "max_ongoing_requests": MAX_ONGOING, "ray_actor_options": {"num_cpus": 1},
            "health_check_period_s": 1,
        })
        serve.run(deployment.application(), route_prefix="/")
        tight = PackDeployment(str(tiny_pack), {"max_running": 1, "max_waiting": 0}, threads=1, deployment_options={
            "num_replicas": 1, "max_ongoing_requests": 4, "max_queued_requests": 1, "ray_actor_options": {"num_cpus": 0},
        })
        serve.run(tight.application(), name="tight", route_prefix="/tight")  # one engine place, behind the same proxy
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def speech(url: str, seed: int, duration: float, result: dict | None = None) -> dict:
    """One streamed request: its status, replica, the bytes it got and how it ended (filled in as it goes)."""
    body = {"model": "random-tiny", "input": "piano", "duration": duration, "seed": seed, "response_format": "pcm"}
    result = result if result is not None else {}
    result.update(seed=seed, status=None, replica=None, audio=b"", error=None)
    try:
        with httpx.stream("POST", f"{url}/v1/audio/speech", json=body, timeout=TIMEOUT) as response:
            result["status"], result["replica"] = response.status_code, response.headers.get("x-vivace-replica")
            for chunk in response.iter_raw():
                result["audio"] += chunk
    except httpx.HTTPError as error:
        result["error"] = type(error).__name__
    return result


def concurrently(url: str, seeds: list[int], duration: float) -> list[dict]:
    results: dict[int, dict] = {}
    threads = [threading.Thread(target=lambda s=s: results.__setitem__(s, speech(url, s, duration))) for s in seeds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert not any(thread.is_alive() for thread in threads), "a request hung"
    return [results[s] for s in seeds]


def test_replicas_serve_offline_audio_and_share_the_load(cluster: str, offline: Engine) -> None:
    results = concurrently(cluster, list(range(10, 10 + REPLICAS * MAX_ONGOING)), 1.0)
    for result in results:
        assert result["status"] == 200 and result["error"] is None, result
        assert result["audio"] == pcm16(offline.generate("piano", 1.0, seed=result["seed"])[0])
    assert len({r["replica"] for r in results}) == REPLICAS
    models = httpx.get(f"{cluster}/v1/models", timeout=TIMEOUT).json()
    assert models["data"][0]["id"] == "random-tiny"


def test_a_full_engine_answers_503_with_retry_after_through_the_proxy(cluster: str, offline: Engine) -> None:
    # long enough that the admitted request still decodes when the second one arrives through the proxy (2 s left a
    # window of about 0.15 s after the first chunk, as in test_server's full-queue test)
    body = {"model": "random-tiny", "input": "piano", "duration": 12.0, "seed": 3, "response_format": "pcm"}
    with httpx.stream("POST", f"{cluster}/tight/v1/audio/speech", json=body, timeout=TIMEOUT) as running:
        chunks = running.iter_raw()
        audio = next(chunks)  # the engine's one place is taken
        busy = httpx.post(f"{cluster}/tight/v1/audio/speech", json={**body, "seed": 4}, timeout=TIMEOUT)
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["code"] == "engine_busy"
        audio += b"".join(chunks)
    assert audio == pcm16(offline.generate("piano", 12.0, seed=3)[0])


def test_each_replicas_metrics_reach_rays_metrics_endpoint(cluster: str, ray_metrics_url: str) -> None:
    """After the requests above: Ray's node metrics carry vivace's figures of every replica, tagged by replica."""
    deadline = time.monotonic() + 60
    while True:
        done = {}
        for family in text_string_to_metric_families(httpx.get(ray_metrics_url, timeout=TIMEOUT).text):
            for sample in family.samples:
                labels = sample.labels
                if sample.name == "ray_vivace_requests_finished_total" and labels.get("reason") == "done" \
                        and labels.get("application") == "default":
                    done[sample.labels["replica"]] = sample.value
        if len(done) == REPLICAS and sum(done.values()) >= REPLICAS * MAX_ONGOING:
            break
        assert time.monotonic() < deadline, f"Ray's metrics never showed both replicas' requests: {done}"
        time.sleep(0.5)


def test_a_killed_replica_fails_only_its_requests_and_the_rest_go_on(cluster: str, offline: Engine) -> None:
    replicas = {r["replica"] for r in concurrently(cluster, list(range(20, 20 + REPLICAS * MAX_ONGOING)), 0.3)}
    assert len(replicas) == REPLICAS
    victim = sorted(replicas)[0]
    seeds = list(range(40, 40 + REPLICAS * MAX_ONGOING))
    in_flight: dict[int, dict] = {seed: {"audio": b""} for seed in seeds}
    threads = [threading.Thread(target=speech, args=(cluster, seed, 8.0, in_flight[seed])) for seed in seeds]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 120
    while not all(result["audio"] for result in in_flight.values()):  # every request is streaming
        assert time.monotonic() < deadline, "the requests did not start streaming"
        time.sleep(0.05)
    assert victim in {result["replica"] for result in in_flight.values()}
    actor = next(name for name in replica_actor_names() if name.endswith(victim))
    ray.kill(ray.get_actor(actor, namespace="serve"), no_restart=True)
    for thread in threads:
        thread.join(timeout=180)
    assert not any(thread.is_alive() for thread in threads), "a request hung after its replica died"
    for seed in seeds:
        result = in_flight[seed]
        if result["replica"] == victim:
            # the proxy cuts the stream (no terminating chunk): a client cannot take it for a whole clip
            assert result["error"] == "RemoteProtocolError" and len(result["audio"]) < 8.0 * offline.sample_rate * 2
        else:
            assert result["error"] is None and result["audio"] == pcm16(offline.generate("piano", 8.0, seed=seed)[0])
    later = concurrently(cluster, [60, 61, 62], 0.3)
    for result in later:
        assert result["status"] == 200 and result["audio"] == pcm16(offline.generate("piano", 0.3, seed=result["seed"])[0])
    assert victim not in {r["replica"] for r in later}


def replica_actor_names() -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("SERVE_REPLICA::")]


def test_app_builder_reads_a_serve_config_and_refuses_unknown_args(tiny_pack: Path) -> None:
    app = app_builder({"pack": str(tiny_pack), "engine": {"quantize": "int8"}, "server": {"max_duration_s": 30}})
    assert app is not None
    with pytest.raises(ValueError, match="pack, engine, server, threads, deployment"):
        app_builder({"pack": str(tiny_pack), "replicas": 2})
    with pytest.raises(ValueError, match="unknown server setting"):
        app_builder({"pack": str(tiny_pack), "server": {"port": 1}})
