"""Prometheus metrics of one server (its own registry, so two apps in one process never collide)."""

from __future__ import annotations

from dataclasses import dataclass, field

# Seconds: a tiny model answers in ~1 ms, a 0.6B int8 batch on 2 CPU cores in several seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TOKEN_BUCKETS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


@dataclass
class ServerMetrics:
    registry: object = field(init=False)

    def __post_init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes, cpu seconds, open fds
        self.requests = Counter("qconv_requests", "HTTP requests answered, by route and status", ["endpoint", "status"], registry=r)
        self.request_seconds = Histogram("qconv_request_duration_seconds", "Time to answer a request", ["endpoint"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.pairs = Counter("qconv_pairs_scored", "(query, document) pairs run through the model", ["model"], registry=r)
        self.pairs_deduplicated = Counter("qconv_pairs_deduplicated", "Pairs answered from an identical pair of the same request",
                                          ["model"], registry=r)
        self.pairs_cancelled = Counter("qconv_pairs_cancelled", "Queued pairs dropped because their request went away",
                                       ["model"], registry=r)
        self.pairs_shared = Counter("qconv_pairs_shared", "Pairs scored on top of their query's shared prompt prefix",
                                    ["model"], registry=r)
        self.templates = Counter("qconv_prefix_templates", "Requests that found their template prefix's cache kept (hit) "
                                 "or computed it (miss)", ["model", "result"], registry=r)
        self.batch_size = Histogram("qconv_batch_size", "Rows per inference batch", ["model"], buckets=BATCH_BUCKETS, registry=r)
        self.batch_tokens = Histogram("qconv_batch_tokens", "Tokens per inference batch: padded (rows x the longest) for "
                                      "full prompts, the tokens run for a shared prefix's chunk", ["model"],
                                      buckets=TOKEN_BUCKETS, registry=r)
        self.queue_seconds = Histogram("qconv_queue_duration_seconds", "Time a pair waited for its batch", ["model"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.inference_seconds = Histogram("qconv_inference_duration_seconds", "Time one batch took in the engine", ["model"],
                                           buckets=LATENCY_BUCKETS, registry=r)
        self.queue_pairs = Gauge("qconv_queue_pairs", "Pairs admitted and not yet answered", ["model"], registry=r)
        self.rejected = Counter("qconv_rejected_requests", "Requests refused before scoring, by reason", ["reason"], registry=r)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
