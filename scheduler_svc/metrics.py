"""Prometheus metrics under vLLM's names with a `tinyvllm:` prefix, so a vLLM dashboard needs only the prefix
changed. Latency histograms are observed as requests finish (RequestMetrics); every counter and gauge is read at
scrape time from where the engine keeps it (EngineCollector over Engine.stats_proto), never counted twice."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "tinyvllm:"
# vLLM's buckets, so the histograms line up with a vLLM server's
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0]
TPOT_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0]
E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0, 7680.0]
disable_created_metrics()  # no *_created series: vLLM exports none, and they double the output
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class RequestMetrics:
    """Per-request latency histograms, in a registry of their own (not prometheus_client's global one: tests and
    several schedulers in one process must not share series)."""

    def __init__(self, model_name: str = "", registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        labels = ["model_name"]
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time from arrival to the first new token.",
                              labels, buckets=TTFT_BUCKETS, registry=self.registry).labels(model_name)
        self.tpot = Histogram(PREFIX + "time_per_output_token_seconds",
                              "Mean time between a request's new tokens after the first.", labels,
                              buckets=TPOT_BUCKETS, registry=self.registry).labels(model_name)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds",
                             "Time from arrival to the last token, of requests that finished (stop or length).",
                             labels, buckets=E2E_BUCKETS, registry=self.registry).labels(model_name)

    def observe(self, arrival: float, first_token_at: float | None, finished_at: float, completion_tokens: int,
                reason: str) -> None:
        if first_token_at is not None:
            self.ttft.observe(first_token_at - arrival)
            if completion_tokens > 1:
                self.tpot.observe((finished_at - first_token_at) / (completion_tokens - 1))
        if reason != "abort":
            self.e2e.observe(finished_at - arrival)


class EngineCollector:
    """Reads the engine's counters and load at every scrape."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        e = self.engine
        if e.scheduler is None:  # not connected to a worker yet
            return
        name = e.info.model_name
        stats = e.stats_proto()

        def counter(metric: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(PREFIX + metric, doc, labels=["model_name"])
            family.add_metric([name], value)
            return family

        def gauge(metric: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(PREFIX + metric, doc, labels=["model_name"])
            family.add_metric([name], value)
            return family

        running, waiting = e.counts()
        yield gauge("num_requests_running", "Requests in the running batch.", running)
        yield gauge("num_requests_waiting", "Requests waiting for admission.", waiting)
        total = e.blocks.total_blocks
        yield gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).",
                    (total - e.blocks.num_free) / total if total else 0.0)
        yield counter("prompt_tokens", "Prompt tokens of the requests accepted.", stats.prompt_tokens)
        yield counter("generation_tokens", "Tokens generated.", stats.generated_tokens)
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      stats.prefix_cache_queries)
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", stats.prefix_cache_hits)
        yield counter("num_preemptions", "Sequences preempted (their KV recomputed later).", stats.preemptions)
        yield counter("worker_restarts", "New worker instances the scheduler refilled.", stats.worker_restarts)
        success = CounterMetricFamily(PREFIX + "request_success", "Finished requests, by finish reason.",
                                      labels=["model_name", "finished_reason"])
        for reason in ("stop", "length", "abort"):
            success.add_metric([name, reason], stats.finished_requests.get(reason, 0))
        yield success


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
