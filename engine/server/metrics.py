"""Prometheus metrics of one server: requests by state and end, time to first audio, real-time factor, audio made,
KV blocks, tokens, KV cache reads and host time per stage. Each server has its own registry (no process-wide state),
read at scrape time from the core."""
from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from vivace.engine import Engine

REASONS = ("done", "aborted", "rejected", "error")
FIRST_AUDIO_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
RTF_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 4, 8, 16, 32)


# the core's per-stage counters (StepStats fields): (metric name, help, field); each is exported with `_total`
STAGE_COUNTERS = (
    ("vivace_prefill_tokens", "Prompt tokens computed by prefill", "prefill_tokens"),
    ("vivace_decode_tokens", "Rows computed by decode steps (a guided pair is two rows)", "decode_tokens"),
    ("vivace_preemptions", "Sequences preempted because the stage's KV pool was full", "preemptions"),
    ("vivace_prefill_seconds", "Host wall seconds in prefill calls", "prefill_s"),
    ("vivace_decode_seconds", "Host wall seconds in decode steps", "decode_s"),
)


class EngineCollector(Collector):
    """The core's state when scraped: requests running and waiting, KV blocks used and total per stage, and the
    core's counters: tokens, preemptions, KV cache bytes read and host seconds per stage, steps, and host seconds in
    the requests' pipelines."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        core = self.engine.core
        yield GaugeMetricFamily("vivace_requests_running", "Requests in the engine core's running batch", value=core.num_running)
        yield GaugeMetricFamily("vivace_requests_waiting", "Requests waiting for a place in the running batch", value=core.num_waiting)
        used = GaugeMetricFamily("vivace_kv_blocks_used", "KV cache blocks in use", labels=["stage"])
        total = GaugeMetricFamily("vivace_kv_blocks_total", "KV cache blocks in the stage's pool", labels=["stage"])
        for stage, runner in core.runners.items():
            used.add_metric([stage], runner.pool.num_blocks - runner.allocator.num_free)
            total.add_metric([stage], runner.pool.num_blocks)
        yield used
        yield total
        for name, documentation, field in STAGE_COUNTERS:
            counter = CounterMetricFamily(name, documentation, labels=["stage"])
            for stage, runner in core.runners.items():
                counter.add_metric([stage], getattr(runner.stats, field))
            yield counter
        read = CounterMetricFamily("vivace_kv_read_bytes", "KV cache bytes read by decode steps (every key attended, every layer)", labels=["stage"])
        for stage, runner in core.runners.items():
            read.add_metric([stage], runner.kv_bytes_read)
        yield read
        yield CounterMetricFamily("vivace_engine_steps", "Steps of the engine core", value=core.steps)
        yield CounterMetricFamily(
            "vivace_request_pipeline_seconds",
            "Host wall seconds in the requests' pipelines (token bookkeeping, events, codec decode)", value=core.request_s,
        )


class ServerMetrics:
    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine))
        self.finished = Counter(
            "vivace_requests_finished", "Requests ended, by reason (done, aborted, rejected, error)", ["reason"],
            registry=self.registry,
        )
        for reason in REASONS:
            self.finished.labels(reason)  # every reason is exported from the start, at 0
        self.rejections = Counter("vivace_queue_rejections", "Requests refused with 503: the queue was full", registry=self.registry)
        self.first_audio = Histogram(
            "vivace_time_to_first_audio_seconds", "From a request's arrival to its first decoded audio",
            buckets=FIRST_AUDIO_BUCKETS, registry=self.registry,
        )
        self.real_time_factor = Histogram(
            "vivace_real_time_factor", "A finished request's wall time over the seconds of audio it produced",
            buckets=RTF_BUCKETS, registry=self.registry,
        )
        self.audio_seconds = Counter("vivace_audio_seconds", "Seconds of audio generated", registry=self.registry)
