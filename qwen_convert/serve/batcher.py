"""One queue and one batching task per model (text-embeddings-inference's router, in small).

Pairs arrive already tokenized. The task takes the oldest waiting pair, lets it wait at most
`max_wait_ms` for company, then fills its batch with the pairs closest to it in length among the
next few batches' worth of waiting pairs (so requests finish in arrival order),
within `max_batch_tokens` padded tokens and `max_batch_size` rows: batches stay length-homogeneous
(little padding) and no pair waits behind an endless stream of better-fitting ones. Inference runs
on the model's own worker thread, never on the event loop; while it runs, the next batch gathers.

Admission is bounded: a request whose pairs would push the model past `max_queue` admitted pairs
is refused whole (the caller answers 503). A pair whose request was cancelled (client gone) is
dropped before it reaches a batch.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from qwen_convert.reranker import pad_rows

from .metrics import ServerMetrics
from .options import ServeOptions
from .protocol import Overloaded

WINDOW = 4  # a batch's candidates: this many batches' worth of the oldest waiting pairs


class Retired(Exception):
    """The batcher stopped taking work (its model was replaced or unloaded): look the model up again."""


@dataclass(eq=False)
class Work:
    ids: list[int]
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    def __init__(self, model, options: ServeOptions, metrics: ServerMetrics):
        self.model = model  # engine.LoadedModel
        self.options = options
        self.metrics = metrics
        self.pending: list[Work] = []
        self.admitted = 0  # pairs submitted and not yet answered
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"qconv-{model.name}")

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.model.name}")

    def submit(self, rows: list[list[int]]) -> list[asyncio.Future]:
        """Queue tokenized rows; one future per row resolves to its logit."""
        if self._closing:
            raise Retired(self.model.name)
        if self.admitted + len(rows) > self.options.max_queue:
            self.metrics.rejected.labels(reason="queue_full").inc()
            raise Overloaded(f"model {self.model.name!r} has {self.admitted} pairs queued (limit {self.options.max_queue})",
                             "retry after the Retry-After delay, or add replicas", headers={"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        work = [Work(row, loop.create_future()) for row in rows]
        self.admitted += len(work)
        for w in work:
            w.future.add_done_callback(self._answered)
        self.pending.extend(work)
        self.metrics.queue_pairs.labels(model=self.model.name).set(self.admitted)
        self._wake.set()
        return [w.future for w in work]

    def _answered(self, future: asyncio.Future) -> None:
        self.admitted -= 1
        self.metrics.queue_pairs.labels(model=self.model.name).set(self.admitted)

    async def close(self) -> None:
        """Stop taking work, answer everything already admitted, then free the worker thread."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await asyncio.shield(self._task)
        self._executor.shutdown(wait=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._drop_cancelled()
            if not self.pending:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._gather()
            self._drop_cancelled()
            if not self.pending:
                continue
            batch = self._pick()
            encoded = pad_rows([w.ids for w in batch], self.model.pad_id, "left")
            started = time.perf_counter()
            name = self.model.name
            for w in batch:
                self.metrics.queue_seconds.labels(model=name).observe(started - w.enqueued)
            try:
                logits = await loop.run_in_executor(self._executor, self.model.engine.score, encoded)
            except Exception as exc:  # an engine failure fails this batch's requests, not the server
                for w in batch:
                    if not w.future.done():
                        w.future.set_exception(exc)
                continue
            self.metrics.inference_seconds.labels(model=name).observe(time.perf_counter() - started)
            self.metrics.batch_size.labels(model=name).observe(len(batch))
            self.metrics.batch_tokens.labels(model=name).observe(encoded.input_ids.size)
            self.metrics.pairs.labels(model=name).inc(len(batch))
            for w, logit in zip(batch, logits):
                if not w.future.done():
                    w.future.set_result(float(logit))

    async def _gather(self) -> None:
        """Let the oldest pair wait up to max_wait_ms for others, unless a full batch is already there."""
        deadline = self.pending[0].enqueued + self.options.max_wait_ms / 1000
        while not self._closing and self._waiting_tokens() < self.options.max_batch_tokens \
                and len(self.pending) < self.options.max_batch_size:
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except asyncio.TimeoutError:
                return

    def _waiting_tokens(self) -> int:
        return sum(len(w.ids) for w in self.pending)

    def _pick(self) -> list[Work]:
        """The oldest pair and its nearest neighbours in length among the next WINDOW x max_batch_size
        waiting pairs (in arrival order), within the batch bounds. The window keeps requests finishing
        in arrival order under load: searching the whole queue spread every request's pairs over the
        whole backlog, so all of them finished together at its end (p50 = p99 = the run)."""
        oldest = self.pending[0]
        width = len(oldest.ids)
        window = self.pending[1:WINDOW * self.options.max_batch_size]
        others = sorted(window, key=lambda w: abs(len(w.ids) - width))
        batch = [oldest]
        for w in others:
            if len(batch) >= self.options.max_batch_size:
                break
            wider = max(width, len(w.ids))
            if wider * (len(batch) + 1) > self.options.max_batch_tokens:
                continue
            batch.append(w)
            width = wider
        chosen = set(map(id, batch))
        self.pending = [w for w in self.pending if id(w) not in chosen]
        return batch

    def _drop_cancelled(self) -> None:
        kept = [w for w in self.pending if not w.future.done()]
        if len(kept) != len(self.pending):
            self.metrics.pairs_cancelled.labels(model=self.model.name).inc(len(self.pending) - len(kept))
            self.pending = kept
