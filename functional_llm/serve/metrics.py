"""Prometheus metrics (vLLM's names, our prefix) in a registry of the app's own, so several
apps (tests) never share one. Latencies and token counts are measured per request by the
server as outputs reach it; the engine's gauges and preemptions are read from
AsyncLLM.counters when /metrics is scraped."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

P = "functional_llm:"
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                   5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class _EngineCollector:
    """Gauges and counters the engine keeps itself, read at scrape time."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        c = self.engine.counters
        yield GaugeMetricFamily(P + "num_requests_running", "Requests scheduled in the engine",
                                value=c["num_running"])
        yield GaugeMetricFamily(P + "num_requests_waiting", "Requests waiting to be scheduled",
                                value=c["num_waiting"])
        yield GaugeMetricFamily(P + "kv_cache_usage_perc", "Fraction of KV blocks with a reference",
                                value=c["blocks_in_use"] / max(c["num_blocks"], 1))
        yield CounterMetricFamily(P + "num_preemptions", "Sequences preempted (recomputed later)",
                                  value=c["preemptions"])


class Metrics:
    """The app's metrics; `request()` gives a tracker for one choice's outputs."""

    def __init__(self, engine):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry

        def hist(name, doc):
            return Histogram(P + name, doc, buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = hist("time_to_first_token_seconds", "Arrival to the first token")
        self.itl = hist("inter_token_latency_seconds", "Time between two outputs of a request, per token")
        self.e2e = hist("e2e_request_latency_seconds", "Arrival to the last token")
        self.queue = hist("request_queue_time_seconds",
                          "Arrival to the first output, whose prefill step it includes")
        self.prompt_tokens = Counter(P + "prompt_tokens", "Prompt tokens of served requests", registry=r)
        self.generation_tokens = Counter(P + "generation_tokens", "Generated tokens", registry=r)
        self.cache_queries = Counter(P + "prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                     registry=r)
        self.cache_hits = Counter(P + "prefix_cache_hits", "Prompt tokens served from the prefix cache",
                                  registry=r)
        self.success = Counter(P + "request_success", "Finished requests", ["finished_reason"], registry=r)
        r.register(_EngineCollector(engine))

    def request(self) -> "RequestTimer":
        return RequestTimer(self)


class RequestTimer:
    """One choice's clock: observe(out) for each RequestOutput, in order."""

    def __init__(self, metrics: Metrics):
        self.m, self.start, self.last = metrics, time.monotonic(), None

    def observe(self, out) -> None:
        now, m, new = time.monotonic(), self.m, len(out.delta_token_ids)
        if self.last is None:
            m.queue.observe(now - self.start)
            m.prompt_tokens.inc(len(out.prompt_token_ids))
            m.cache_queries.inc(len(out.prompt_token_ids))
            m.cache_hits.inc(out.num_cached_tokens)
            if new:
                m.ttft.observe(now - self.start)
        elif new:
            m.itl.observe((now - self.last) / new)
        self.last = now if new or self.last is None else self.last
        m.generation_tokens.inc(new)
        if out.finished:
            m.e2e.observe(now - self.start)
            m.success.labels(finished_reason=out.finish_reason).inc()

