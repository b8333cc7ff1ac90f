"""Serving over HTTP, one process against Ray Serve: `vivace serve` and `vivace serve --ray` with 1 and 2 replicas.

Three servers in turn on the demo pack (int8), each in a subprocess on a free localhost port, driven by serve_load's
clients and closed-loop phases (1, 4, 16 clients; --quick: fewer requests and 1 s clips), the same requests and seeds
for each; T = --threads (default: the machine's logical CPUs):
- plain: `vivace serve`, one process, T torch threads;
- ray 1: `vivace serve --ray --replicas 1 --replica-cpus T`, one replica process of T threads behind Serve's proxy;
- ray 2: `--replicas 2 --replica-cpus T/2`, two replica processes of T/2 threads each.
Each engine's --max-running + --max-queue is at least the largest client count, so no request may be refused.
serve_load's burst is left out: its planned 503s rest on one engine admitting R + Q; with N replicas the burst's split
among them is Serve's routing choice, so how many are refused is not known in advance.

Threads: torch takes its intra-op threads from OMP_NUM_THREADS as it is imported. Ray workers inherit the environment
of the process that started the cluster (here `vivace serve --ray`), and Ray sets OMP_NUM_THREADS to floor(num_cpus),
at least 1, in a worker only where it is unset (ray._private.utils.set_omp_num_threads_if_unset): an inherited value
wins even when it disagrees with --replica-cpus. Each server here gets OMP_NUM_THREADS (and MKL_NUM_THREADS) = T / N
in its environment, which with --replica-cpus T / N is also what Ray would choose. After the load the benchmark
counts, with gdb where it is installed, the OpenMP worker threads (threads started in libgomp's gomp_thread_start) in
each engine process: none at 1 thread, at least one at more.

What a machine with few cores can show: every server shares the same T cores. Two replicas of T/2 threads are not
more compute than one of T: they trade intra-op parallelism for two engines that each batch about half the clients
(and each hold their own copy of the model). Ray adds a hop (client -> Serve's proxy process -> replica) and processes
of its own (the proxy, Serve's controller, the GCS, the raylet, the dashboard) that take CPU from the same cores; the
process table reports each one's CPU seconds during the load. So these figures measure Ray's overhead and the split of
the same cores, not scaling; that needs replicas on cores (or nodes) of their own.

Reported per server and phase: serve_load's columns and the spread of requests over replicas (count per
X-Vivace-Replica); per server: seconds to ready and to stop, CPU seconds of each process during the load (and of the
clients), OpenMP worker threads per engine process, load averages before and after.
Checked, each failure a one-line reason and a non-zero exit (the results are written first): every answer 200; each
Ray server answered from exactly N replicas; each replica's /metrics (the proxy answers /metrics from one replica at a
time, so it is polled until every replica has shown itself idle) and the plain server's show no request running or
waiting and no KV block in use, and finished counts equal to the answers that carried that replica's id; a call's clip
is the same bytes from every server, replica and phase at one thread count (generation at 1 and 2 torch threads rounds
differently, offline too: how many calls differ across thread counts is reported, not checked); a sample of each
server's clips equals offline generation at that server's thread count; the OpenMP worker count agrees with the thread
count where gdb could count them; no process of a server outlives its stop.

Needs the [serve] and [ray] extras and httpx (and gdb to count threads); it runs only when named:
python -m benchmarks ray_load [--quick] [--threads N].
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import resource
import shutil
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch

from benchmarks import serve_load
from benchmarks.common import Options, table, write_result
from benchmarks.serve_load import (
    SETTLE_S, Phase, Plan, Reply, Server, busy, closed_loops, columns, finish, http_client, metrics_failures, offline_failures,
    parse_metrics, samples, send, served_model, status_failures, summary,
)
from benchmarks.serving import requests

MAX_CLIENTS = 16  # serve_load's phases up to this many clients: 64 would triple the run for three servers
GDB_TIMEOUT_S = 120.0
GONE_TIMEOUT_S = 15.0  # after the server's own exit, for Ray's processes to follow it


@dataclass(frozen=True)
class Setup:
    name: str
    replicas: int | None  # None: one process, no Ray
    threads: int  # torch threads per engine process
    extra: tuple[str, ...]  # past serve_load's command line


def setups(threads: int) -> list[Setup]:
    found = [Setup("plain", None, threads, ())]
    for replicas in (1, 2):
        cpus = threads / replicas
        found.append(Setup(f"ray {replicas}", replicas, max(1, threads // replicas),
                           ("--ray", "--replicas", str(replicas), "--replica-cpus", f"{cpus:g}")))
    return found


def plan(quick: bool) -> Plan:
    base = serve_load.plan(quick)
    return dataclasses.replace(base, clients={c: n for c, n in base.clients.items() if c <= MAX_CLIENTS})


@dataclass
class Served:
    """One server's run."""

    setup: Setup
    command: list[str]
    sample_rate: int
    ready_s: float
    warmups: list[Reply]
    phases: list[Phase]
    metrics: dict[str | None, dict[str, float]]  # replica id (None: the plain server) -> its /metrics after the load
    settle_s: float
    processes: list[dict[str, Any]]
    engines: list[int]  # pids of the processes that own an engine
    clients_cpu_s: float
    stop_s: float
    left_over: list[int]
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]

    @property
    def replicas_seen(self) -> set[str | None]:
        return {r.replica for r in self.replies() if r.status == 200}

    def replies(self) -> list[Reply]:
        return self.warmups + [r for phase in self.phases for r in phase.replies]


# -- processes -----------------------------------------------------------------------------------------------------
TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def process_tree(root: int) -> dict[int, float]:
    """CPU seconds (user + system) of root and each of its descendants, by pid."""
    parents, cpu = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        parents[int(entry.name)] = int(fields[1])
        cpu[int(entry.name)] = (int(fields[11]) + int(fields[12])) * TICK_S
    tree, frontier = {root}, [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier and pid not in tree]
        tree.update(children)
        frontier = children
    return {pid: cpu[pid] for pid in tree if pid in cpu}


def process_name(pid: int) -> str:
    """A process's title where it set one (Ray's workers: ray::ServeReplica:<app>:<deployment>, with the method it
    runs after a dot; the dashboard's modules: ray-dashboard-<module>), else its program or Python script."""
    try:
        args = [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return "?"
    if not args:
        return "?"
    if not args[0].startswith("/"):
        title = args[0].split()[0]
        return title.split(".")[0] if title.startswith("ray::") else title
    program, rest = Path(args[0]).name, args[1:]
    if not program.startswith("python"):
        return program
    while rest and rest[0].startswith("-") and rest[0] not in ("-m", "-c"):
        rest = rest[1:]  # interpreter flags: -u, -B
    if not rest:
        return program
    if rest[0] in ("-m", "-c"):
        return f"python -m {rest[1]}" if rest[0] == "-m" and len(rest) > 1 else f"python {rest[0]}"
    return Path(rest[0]).name


def environment(pid: int, name: str) -> str | None:
    try:
        for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            if item.startswith(name.encode() + b"="):
                return item.split(b"=", 1)[1].decode()
    except OSError:
        pass
    return None


def openmp_workers(pid: int) -> int | None:
    """Threads of pid started by libgomp (one pool of threads - 1 per thread that ran a parallel region), or None
    where gdb is missing or may not attach."""
    if shutil.which("gdb") is None:
        return None
    # Symbols of libgomp alone: loading torch's too takes gdb tens of seconds per process.
    commands = ["set debuginfod enabled off", "set auto-solib-add off", f"attach {pid}", "sharedlibrary libgomp",
                "thread apply all bt 8"]
    try:
        out = subprocess.run(
            ["gdb", "-nx", "-batch", *(arg for command in commands for arg in ("-ex", command))],
            capture_output=True, text=True, timeout=GDB_TIMEOUT_S,
        ).stdout
    except subprocess.TimeoutExpired:
        return None
    return out.count("gomp_thread_start") if "\nThread " in f"\n{out}" else None


def gone(pids: list[int]) -> list[int]:
    """The pids still alive after GONE_TIMEOUT_S."""
    deadline = time.monotonic() + GONE_TIMEOUT_S
    while True:
        alive = [pid for pid in pids if Path(f"/proc/{pid}").exists() and not zombie(pid)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def zombie(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}") / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def clients_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- one server ----------------------------------------------------------------------------------------------------
def wait_for_replicas(url: str, replicas: int, deadline: float) -> set[str]:
    """The replica ids /ready answered from, polled until there are `replicas` of them: a replica that is still
    loading its pack would otherwise first be met in the load."""
    seen: set[str] = set()
    while len(seen) < replicas and time.monotonic() < deadline:
        try:
            response = httpx.get(f"{url}/ready", timeout=2)
            if response.status_code == 200 and "x-vivace-replica" in response.headers:
                seen.add(response.headers["x-vivace-replica"])
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return seen


async def warm_up(url: str, model: str, plan: Plan, replicas: int) -> list[Reply]:
    """One clip at a time until every replica has served one, so no replica's first-call costs land in the load."""
    replies: list[Reply] = []
    async with http_client(url, 1) as client:
        start = time.perf_counter()
        for call in requests(4 * replicas, plan.seconds, seed=99):
            replies.append(await send(client, model, call, start))
            if len({r.replica for r in replies if r.status == 200}) >= replicas:
                break
    return replies


def replica_metrics(url: str, replicas: set[str | None]) -> tuple[dict[str | None, dict[str, float]], float]:
    """Each replica's /metrics once it is idle (or after SETTLE_S), and the seconds that took: the proxy answers from
    the replica it picks, so it is scraped until every replica has been met idle."""
    found: dict[str | None, dict[str, float]] = {}
    start = time.monotonic()
    while True:
        response = httpx.get(f"{url}/metrics", timeout=10)
        found[response.headers.get("x-vivace-replica")] = parse_metrics(response.text)
        waited = time.monotonic() - start
        if all(r in found and not busy(found[r]) for r in replicas) or waited > SETTLE_S:
            return found, waited
        time.sleep(0.2)


def serve(setup: Setup, chosen: Plan, options: Options) -> Served:
    log = options.work_dir / f"ray_load-{setup.name.replace(' ', '')}.log"
    server = Server(chosen, options, log, setup.extra, setup.threads, suite="ray_load")
    load_before = os.getloadavg()
    started = time.perf_counter()
    with server as url:
        assert server.process is not None
        if setup.replicas is not None:
            wait_for_replicas(url, setup.replicas, time.monotonic() + serve_load.READY_TIMEOUT_S)
        ready_s = time.perf_counter() - started
        print(f"{setup.name}: ready in {ready_s:.1f} s at {url} (log: {log})", flush=True)
        model, sample_rate = served_model(url)
        warmups = asyncio.run(warm_up(url, model, chosen, setup.replicas or 1))
        cpu_before, clients_before = process_tree(server.process.pid), clients_cpu_s()
        phases = asyncio.run(closed_loops(url, model, chosen))
        cpu_after, clients_after = process_tree(server.process.pid), clients_cpu_s()
        seen = {r.replica for r in warmups + [r for phase in phases for r in phase.replies] if r.status == 200}
        metrics, settle_s = replica_metrics(url, seen)
        processes = [
            {"pid": pid, "name": process_name(pid), "cpu_s": cpu_after[pid] - cpu_before.get(pid, 0.0),
             "omp_num_threads": environment(pid, "OMP_NUM_THREADS")}
            for pid in cpu_after
        ]
        engines = ([server.process.pid] if setup.replicas is None
                   else [p["pid"] for p in processes if p["name"].startswith("ray::ServeReplica")])
        counting = time.perf_counter()
        for entry in processes:
            if entry["pid"] in engines:
                entry["openmp_workers"] = openmp_workers(entry["pid"])
        count_s = time.perf_counter() - counting
        tree = list(process_tree(server.process.pid))
        stopping = time.perf_counter()
    stop_s = time.perf_counter() - stopping
    print(f"{setup.name}: load {sum(p.wall_s for p in phases):.1f} s, threads counted in {count_s:.1f} s, "
          f"stopped in {stop_s:.1f} s", flush=True)
    return Served(
        setup, server.command[2:], sample_rate, ready_s, warmups, phases, metrics, settle_s,
        sorted(processes, key=lambda p: -p["cpu_s"]), engines, clients_after - clients_before, stop_s, gone(tree),
        load_before, os.getloadavg(),
    )


# -- results and checks --------------------------------------------------------------------------------------------
def short(replica: str | None) -> str:
    return "-" if replica is None else replica.rsplit("#", 1)[-1]


def spread(phase: Phase) -> dict[str, int]:
    return dict(sorted(Counter(short(r.replica) for r in phase.replies if r.status == 200).items()))


def server_failures(run: Served) -> list[str]:
    name, failures = run.setup.name, []
    failures += [f"{name}: warm-up answered {r.status} ({r.error})" for r in run.warmups if r.status != 200]
    failures += [f"{name}, {failure}" for failure in status_failures(run.phases)]
    seen = run.replicas_seen
    if run.setup.replicas is not None and (len(seen) != run.setup.replicas or None in seen):
        failures.append(f"{name}: answered from {len(seen)} replicas ({', '.join(map(str, seen))}), "
                        f"{run.setup.replicas} deployed")
    if len(run.engines) != (run.setup.replicas or 1):
        failures.append(f"{name}: {len(run.engines)} engine processes found, {run.setup.replicas or 1} expected")
    for replica in sorted(seen, key=str):
        metrics = run.metrics.get(replica)
        if metrics is None:
            failures.append(f"{name}: /metrics never answered from replica {replica} within {SETTLE_S:.0f} s")
            continue
        mine = [dataclasses.replace(p, replies=[r for r in p.replies if r.replica == replica]) for p in run.phases]
        warmups = sum(r.replica == replica for r in run.warmups)
        label = name if replica is None else f"{name} replica {short(replica)}"
        failures += [f"{label}: {failure}" for failure in metrics_failures(metrics, mine, warmups)]
    for entry in run.processes:
        workers = entry.get("openmp_workers")
        if workers is not None and (workers > 0) != (run.setup.threads > 1):
            failures.append(f"{name}: engine process {entry['pid']} has {workers} OpenMP worker threads at "
                            f"{run.setup.threads} torch threads")
    if run.left_over:
        failures.append(f"{name}: processes {run.left_over} still running {GONE_TIMEOUT_S:.0f} s after the server "
                        "stopped")
    return failures


def identity(runs: list[Served]) -> tuple[list[str], dict[str, int]]:
    """A call's clip must be the same bytes whichever server, replica, phase or batch served it at one thread count.
    Across thread counts it need not be: torch's kernels split their sums by thread, so generation at 1 and 2
    threads rounds differently (offline too); those are counted, not checked."""
    first: dict[tuple[int, tuple[str, float, int]], tuple[str, bytes]] = {}
    failures = []
    for run in runs:
        for phase in run.phases:
            for reply in phase.replies:
                if reply.status != 200:
                    continue
                where = f"{run.setup.name}, {phase.name}"
                seen = first.setdefault((run.setup.threads, reply.call), (where, reply.body))
                if seen[1] != reply.body:
                    difference = serve_load.first_difference(reply.body, seen[1])
                    failures.append(f"{reply.call} served by {where} differs from {seen[0]} ({difference})")
    bodies: dict[tuple[str, float, int], list[bytes]] = {}
    for (_, call), (_, body) in first.items():
        bodies.setdefault(call, []).append(body)
    several = [found for found in bodies.values() if len(found) > 1]
    return failures, {"calls": len(bodies), "served_at_several_thread_counts": len(several),
                      "differing_across_thread_counts": sum(len(set(found)) > 1 for found in several)}


def offline(runs: list[Served], options: Options) -> tuple[list[dict[str, Any]], list[str]]:
    """serve_load's offline check on each server's sample, generated at that server's thread count."""
    rows, failures, threads = [], [], torch.get_num_threads()
    try:
        for run in runs:
            torch.set_num_threads(run.setup.threads)
            chosen = [(f"{run.setup.name}, {phase}", reply) for phase, reply in samples(run.phases)]
            found, failed = offline_failures(chosen, options)
            rows += [{**row, "torch_threads": run.setup.threads} for row in found]
            failures += failed
    finally:
        torch.set_num_threads(threads)
    return rows, failures


def ray_cpu(run: Served) -> float:
    return sum(p["cpu_s"] for p in run.processes if p["pid"] not in run.engines)


def print_tables(runs: list[Served], chosen: Plan, summaries: list[list[dict[str, Any]]], threads: int) -> None:
    rows = []
    for run, found in zip(runs, summaries):
        for phase, s in zip(run.phases, found):
            rows.append([run.setup.name, *columns(s), " ".join(f"{k}:{v}" for k, v in spread(phase).items())])
    print(table(["server", *serve_load.COLUMNS, "replicas"], rows,
                title=f"demo pack int8, pcm streams of {chosen.seconds} s, {threads} torch threads in all per server"),
          flush=True)
    rows = []
    for run in runs:
        engines = [p for p in run.processes if p["pid"] in run.engines]
        rows.append([
            run.setup.name, run.setup.threads, " ".join(str(p.get("omp_num_threads")) for p in engines),
            " ".join("-" if p.get("openmp_workers") is None else str(p["openmp_workers"]) for p in engines),
            run.ready_s, run.stop_s, sum(p["cpu_s"] for p in engines), ray_cpu(run), run.clients_cpu_s,
            " ".join(f"{x:.2f}" for x in run.load_before), " ".join(f"{x:.2f}" for x in run.load_after),
        ])
    print(table(
        ["server", "threads", "OMP env", "OMP workers", "ready s", "stop s", "engine CPU s", "other CPU s",
         "clients CPU s", "load before", "load after"],
        rows, title="per server (CPU s: during the closed loops; other: the server's processes without an engine)",
    ), flush=True)
    for run in runs:
        others: dict[str, list[float]] = {}
        for p in run.processes:
            if p["pid"] not in run.engines:
                others.setdefault(p["name"], []).append(p["cpu_s"])
        shown = sorted(((sum(v), name, len(v)) for name, v in others.items() if sum(v) >= 0.05), reverse=True)
        if shown:
            print(f"{run.setup.name}, other processes' CPU s: "
                  + ", ".join(f"{name}{f' (x{n})' if n > 1 else ''} {cpu:.1f}" for cpu, name, n in shown), flush=True)


def record(run: Served, found: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "server": run.setup.name, "replicas": run.setup.replicas, "threads": run.setup.threads, "command": run.command,
        "ready_s": run.ready_s, "stop_s": run.stop_s, "warmups": len(run.warmups),
        "phases": [{**s, "replicas": spread(phase)} for s, phase in zip(found, run.phases)],
        "replicas_seen": sorted(map(str, run.replicas_seen)),
        "metrics_after": {str(k): v for k, v in run.metrics.items()}, "settle_s": run.settle_s,
        "processes": run.processes, "engine_pids": run.engines, "clients_cpu_s": run.clients_cpu_s,
        "left_over": run.left_over, "load_average_before": run.load_before, "load_average_after": run.load_after,
    }


def run(options: Options) -> None:
    chosen = plan(options.quick)
    threads = options.threads or os.cpu_count() or 1
    print(f"servers: {', '.join(s.name for s in setups(threads))}; max-running {chosen.max_running}, max-queue "
          f"{chosen.max_queue} per engine; phases {chosen.clients} (clients: requests); no burst", flush=True)
    runs = [serve(setup, chosen, options) for setup in setups(threads)]
    summaries = [[summary(phase, served.sample_rate) for phase in served.phases] for served in runs]
    print_tables(runs, chosen, summaries, threads)
    comparisons, failures = offline(runs, options)
    for row in comparisons:
        print(f"offline check, {row['phase']}: {row['call']} {'equal' if row['equal'] else 'DIFFERENT'} "
              f"({row['served_bytes']} bytes, {row['torch_threads']} threads)")
    same, across = identity(runs)
    print(f"clips compared across thread counts: {across['served_at_several_thread_counts']} calls served at more than "
          f"one, {across['differing_across_thread_counts']} of them differ in bytes (not a check: see identity())")
    failures = [f for served in runs for f in server_failures(served)] + same + failures
    config = {
        "clients": chosen.clients, "clip_seconds": chosen.seconds, "max_running": chosen.max_running,
        "max_queue": chosen.max_queue, "threads_per_server": threads, "gdb": shutil.which("gdb") is not None,
        "servers": [{"name": s.name, "replicas": s.replicas, "threads": s.threads, "extra": list(s.extra)}
                    for s in setups(threads)],
    }
    results = {"servers": [record(r, s) for r, s in zip(runs, summaries)], "offline": comparisons,
               "across_thread_counts": across, "failures": failures}
    finish("ray_load", write_result("ray_load", options, config, results), failures)
    print(f"checks passed: every answer 200; Ray answered from {', '.join(str(r.setup.replicas) for r in runs[1:])} "
          f"replicas as deployed; every engine idle with its counts matching its answers; each clip the same bytes "
          f"from every server at one thread count; {len(comparisons)} sample clips equal to offline generation")
