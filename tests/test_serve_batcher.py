"""qwen_convert/serve/batcher.py's batch choice: requests finish in arrival order under load.

Run through the real Batcher with an engine that records each batch; the engine's scores are the
pairs' own lengths, so every answer can be checked against its row."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np

from qwen_convert.scoring.prefix import KVCache
from qwen_convert.serve.batcher import WINDOW, Batcher
from qwen_convert.serve.metrics import ServerMetrics
from qwen_convert.serve.options import ServeOptions
from qwen_convert.serve.sharing import TemplateCache, plan_request


class RecordingEngine:
    def __init__(self):
        self.batches: list[list[int]] = []

    def score(self, encoded):
        real = encoded.attention_mask.sum(axis=1)
        self.batches.append([int(n) for n in real])
        return real.astype(np.float32)


async def serve_requests(requests: list[list[int]], options: ServeOptions):
    engine = RecordingEngine()
    batcher = Batcher(SimpleNamespace(name="m", pad_id=0, engine=engine, prefix=None), options, ServerMetrics())
    futures = [batcher.submit([[1] * n for n in lengths]) for lengths in requests]  # all queued before the task runs
    finished: list[tuple[int, int]] = []  # (request, batches run when its last pair was answered), in order
    for i, fs in enumerate(futures):
        asyncio.gather(*fs).add_done_callback(lambda _f, i=i: finished.append((i, len(engine.batches))))
    batcher.start()
    answers = [await asyncio.gather(*fs) for fs in futures]
    await batcher.close()
    return engine.batches, answers, finished


def test_requests_finish_in_arrival_order_not_all_at_the_end():
    """64 requests of 10 documents of mixed lengths, all queued at once (the load test's shape).
    Matching lengths over the whole queue took one pair of the oldest request and the rest from
    everyone, so every request finished near the end of the backlog (p50 = p99 = the run)."""
    rng = np.random.default_rng(0)
    requests = [[int(n) for n in rng.integers(20, 120, 10)] for _ in range(64)]
    options = ServeOptions(max_batch_size=8, max_batch_tokens=100_000, max_wait_ms=0.0)
    batches, answers, finished = asyncio.run(serve_requests(requests, options))
    assert answers == [[float(n) for n in r] for r in requests]  # every pair got its own score
    assert sum(len(b) for b in batches) == 640 and max(len(b) for b in batches) <= 8
    total = len(batches)
    at = sorted(batch for _request, batch in finished)
    assert at[len(at) // 2] <= 0.65 * total, (at[len(at) // 2], total)  # the median request, not the last
    assert at[0] <= 0.2 * total, (at[0], total)
    order = [request for request, _batch in finished]
    assert max(order[:16]) < 16 + 4 * WINDOW, order[:16]  # early finishers are early arrivals
    # Batches still group by length inside the window: padding stays small.
    padded = sum(len(b) * max(b) for b in batches)
    assert padded <= 1.3 * sum(sum(r) for r in requests), padded / sum(sum(r) for r in requests)


# --- prefix-shared groups (serve/sharing.py) -------------------------------------------------------

class FakePrefix:
    """scoring.prefix.PrefixScorer's interface with arithmetic in place of a graph: a row's logit is its
    length (prefix tokens + own tokens), so every answer is checked against its row; runs are recorded."""

    def __init__(self, fail_at: int | None = None):
        self.runs: list[tuple[str, int]] = []  # ("extend" | "score", new tokens)
        self.fail_at = fail_at

    def empty(self):
        return KVCache((), {})

    def extend(self, base, tokens):
        self.runs.append(("extend", len(tokens) - len(base.tokens)))
        return KVCache(tuple(tokens), {})

    def score_suffix(self, cache, suffix):
        if self.fail_at is not None and sum(kind == "score" for kind, _ in self.runs) == self.fail_at:
            self.fail_at = None  # once
            raise RuntimeError("engine failure")
        self.runs.append(("score", len(suffix)))
        return float(len(cache.tokens) + len(suffix))

    def score_suffixes(self, cache, suffixes, batch_size=8, padding_side="left", pad_id=0, on_rows=None):
        return np.array([self.score_suffix(cache, s) for s in suffixes])

    def start_suffixes(self, cache, suffixes, batch_size=8, padding_side="left", pad_id=0, on_rows=None):
        logits = self.score_suffixes(cache, suffixes)
        return lambda: logits


TEMPLATE = list(range(100, 130))  # 30 tokens every prompt starts with


def rows_of(query: int, lengths: list[int]) -> list[list[int]]:
    """Rows of one query: the template, 5 query tokens, then a document of each length."""
    return [TEMPLATE + [query] * 5 + [1000 + query * 100 + j] * n for j, n in enumerate(lengths)]


async def serve_mixed(requests, options: ServeOptions, prefix: FakePrefix, cancel_after_first: int | None = None):
    """requests: (rows, shared?) each; shared ones go through plan_request as the registry sends them."""
    engine = RecordingEngine()
    model = SimpleNamespace(name="m", pad_id=0, engine=engine, prefix=prefix, templates=TemplateCache(prefix))
    metrics = ServerMetrics()
    batcher = Batcher(model, options, metrics)
    futures, finished = [], []
    for i, (rows, shared) in enumerate(requests):
        plan = plan_request(rows, [f"q{r[30]}" for r in rows]) if shared else None
        fs = batcher.submit(rows, plan, tuple(TEMPLATE))
        futures.append(fs)
        asyncio.gather(*fs, return_exceptions=True).add_done_callback(lambda _f, i=i: finished.append(i))
    batcher.start()
    if cancel_after_first is not None:
        await futures[cancel_after_first][0]
        for f in futures[cancel_after_first]:
            f.cancel()
    answers = [await asyncio.gather(*fs, return_exceptions=True) for fs in futures]
    await batcher.close()
    return engine.batches, answers, finished, metrics


def sample(metrics: ServerMetrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, {"model": "m", **labels}) or 0.0


def test_shared_groups_run_in_arrival_order_in_bounded_chunks_on_one_kept_template():
    requests = [(rows_of(1, [4]), False), (rows_of(2, [3, 9, 5, 7, 2]), True), (rows_of(3, [6, 6]), False),
                (rows_of(4, [8, 1, 3]), True)]
    prefix = FakePrefix()
    options = ServeOptions(max_batch_size=2, max_batch_tokens=100_000, max_wait_ms=0.0)
    batches, answers, finished, metrics = asyncio.run(serve_mixed(requests, options, prefix))
    assert answers == [[float(len(r)) for r in rows] for rows, _ in requests]
    assert finished == [0, 1, 2, 3]  # a request finishes before the next one starts
    # Only the unshared requests reach the full-prompt engine; the oldest pair's batch still takes a later
    # request's pair (request 3's), as full-prompt batches always have, passing over the shared group.
    assert batches == [[39, 41], [41]]
    # request 2: the template once (30), its query (5), then chunks of at most 2 documents; request 4 finds the template kept
    assert prefix.runs == [("extend", 30), ("extend", 5), ("score", 3), ("score", 9), ("score", 5), ("score", 7),
                           ("score", 2), ("extend", 5), ("score", 8), ("score", 1), ("score", 3)]
    assert sample(metrics, "qconv_pairs_shared_total") == 8 and sample(metrics, "qconv_pairs_scored_total") == 11
    assert sample(metrics, "qconv_prefix_templates_total", result="miss") == 1
    assert sample(metrics, "qconv_prefix_templates_total", result="hit") == 1
    assert sample(metrics, "qconv_batch_size_count") == 2 + 3 + 2  # full batches, then the groups' chunks
    assert sample(metrics, "qconv_queue_pairs") == 0


def test_a_cancelled_group_stops_between_chunks_and_a_failure_fails_its_request():
    options = ServeOptions(max_batch_size=1, max_batch_tokens=100_000, max_wait_ms=0.0)
    prefix = FakePrefix()
    requests = [(rows_of(1, [3] * 10), True), (rows_of(2, [2, 2]), True)]
    _, answers, _, metrics = asyncio.run(serve_mixed(requests, options, prefix, cancel_after_first=0))
    assert answers[0][0] == 38.0 and answers[1] == [37.0, 37.0]
    scored = sum(kind == "score" for kind, _ in prefix.runs)
    assert scored <= 4  # the first document, at most one more in flight when the client left, then request 2's
    assert sample(metrics, "qconv_pairs_cancelled_total") + sample(metrics, "qconv_pairs_shared_total") == 12
    assert sample(metrics, "qconv_queue_pairs") == 0

    failing = FakePrefix(fail_at=1)  # the second document of the first request fails
    _, answers, _, _ = asyncio.run(serve_mixed([(rows_of(1, [3, 4, 5]), True), (rows_of(2, [2, 2]), True)], options, failing))
    assert answers[0][0] == 38.0 and all(isinstance(a, RuntimeError) for a in answers[0][1:])
    assert answers[1] == [37.0, 37.0]  # the next request is served
