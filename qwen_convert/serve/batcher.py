"""One queue and one batching task per model (text-embeddings-inference's router, in small).

Pairs arrive already tokenized. The task takes the oldest waiting pair, lets it wait at most
`max_wait_ms` for company, then fills its batch with the pairs closest to it in length among the
next few batches' worth of waiting pairs (so requests finish in arrival order),
within `max_batch_tokens` padded tokens and `max_batch_size` rows: batches stay length-homogeneous
(little padding) and no pair waits behind an endless stream of better-fitting ones. Inference runs
on the model's own worker thread, never on the event loop; while it runs, the next batch gathers.

Prefix-shared requests (sharing.py) queue as one item per query: its rows share one key/value
cache, so they batch with each other, never with other requests' rows. Items run in arrival order:
when the oldest waiting item is such a group, its next chunk runs (the query prefix first), with no
wait for company; it stays at the head until its last row is answered, so a request finishes before
the next one starts, as the full-prompt batches' window keeps them in order.

Admission is bounded: a request whose pairs would push the model past `max_queue` admitted pairs
is refused whole (the caller answers 503). A pair whose request was cancelled (client gone) is
dropped before it reaches a batch; a shared group stops between chunks.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from qwen_convert.reranker import pad_rows
from qwen_convert.scoring.denormals import flush_denormals_here

from .metrics import ServerMetrics
from .options import ServeOptions
from .protocol import Overloaded
from .sharing import SharedGroup, run_step

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
        self.pending: list[Work | SharedGroup] = []
        self.admitted = 0  # pairs submitted and not yet answered
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task | None = None
        # The model's sessions run on this thread, which did not create them: it flushes its own denormals.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"qconv-{model.name}", initializer=flush_denormals_here)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.model.name}")

    def submit(self, rows: list[list[int]], plan=None, template: tuple[int, ...] = ()) -> list[asyncio.Future]:
        """Queue tokenized rows; one future per row resolves to its logit. `plan` (a scoring.prefix.SharePlan):
        its groups run on their shared prefix (`template`: the model + instruction's), its other rows as full prompts."""
        if self._closing:
            raise Retired(self.model.name)
        if self.admitted + len(rows) > self.options.max_queue:
            self.metrics.rejected.labels(reason="queue_full").inc()
            raise Overloaded(f"model {self.model.name!r} has {self.admitted} pairs queued (limit {self.options.max_queue})",
                             "retry after the Retry-After delay, or add replicas", headers={"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in rows]
        self.admitted += len(futures)
        for f in futures:
            f.add_done_callback(self._answered)
        now = time.perf_counter()
        items: list[Work | SharedGroup] = []
        for shared, idx in (plan.groups if plan is not None else ()):
            items.append(SharedGroup([rows[i] for i in idx], shared, template, [futures[i] for i in idx], now))
        full = plan.full if plan is not None else range(len(rows))
        items += [Work(rows[i], futures[i], now) for i in full]
        self.pending.extend(items)
        self.metrics.queue_pairs.labels(model=self.model.name).set(self.admitted)
        self._wake.set()
        return futures

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
        while True:
            self._drop_cancelled()
            if not self.pending:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if isinstance(self.pending[0], SharedGroup):
                await self._run_shared(self.pending[0])
                continue
            await self._gather()
            self._drop_cancelled()
            if self.pending and isinstance(self.pending[0], Work):
                await self._run_full(self._pick())

    async def _run_full(self, batch: list[Work]) -> None:
        encoded = pad_rows([w.ids for w in batch], self.model.pad_id, "left")
        logits = await self._infer(self.model.engine.score, [w.enqueued for w in batch], [w.future for w in batch], encoded)
        if logits is None:
            return
        self._count(len(batch), encoded.input_ids.size)
        for w, logit in zip(batch, logits):
            if not w.future.done():
                w.future.set_result(float(logit))

    async def _run_shared(self, group: SharedGroup) -> None:
        """The group's next chunk; the group leaves the queue with its last row (or a failure)."""
        rows = group.chunk(self.options.max_batch_size, self.options.max_batch_tokens)
        futures = [group.futures[i] for i in rows]
        model = self.model
        # On a failure every row still waiting fails with it (the request is answered 500 once).
        step = await self._infer(run_step, [group.enqueued] * len(rows), group.futures[group.next:],
                                 model.prefix, model.templates, group, rows)
        group.next = rows[-1] + 1
        if step is None or group.next >= len(group.rows):
            group.cache = None  # the query prefix's keys and values are freed with the last row
            self.pending.remove(group)
            if step is None:
                return
        self._count(len(rows), step.tokens)
        self.metrics.pairs_shared.labels(model=model.name).inc(len(rows))
        if step.template_hit is not None:
            self.metrics.templates.labels(model=model.name, result="hit" if step.template_hit else "miss").inc()
        for f, logit in zip(futures, step.logits):
            if not f.done():
                f.set_result(float(logit))

    async def _infer(self, fn, enqueued: list[float], futures: list[asyncio.Future], *args):
        """fn(*args) on the worker thread, timed; on failure, `futures` fail and None is returned."""
        name = self.model.name
        started = time.perf_counter()
        for t in enqueued:
            self.metrics.queue_seconds.labels(model=name).observe(started - t)
        try:
            out = await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except Exception as exc:  # an engine failure fails this batch's requests, not the server
            for f in futures:
                if not f.done():
                    f.set_exception(exc)
            return None
        self.metrics.inference_seconds.labels(model=name).observe(time.perf_counter() - started)
        return out

    def _count(self, rows: int, tokens: int) -> None:
        name = self.model.name
        self.metrics.batch_size.labels(model=name).observe(rows)
        self.metrics.batch_tokens.labels(model=name).observe(tokens)
        self.metrics.pairs.labels(model=name).inc(rows)

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
        return sum(len(w.ids) for w in self.pending if isinstance(w, Work))

    def _pick(self) -> list[Work]:
        """The oldest pair and its nearest neighbours in length among the next WINDOW x max_batch_size
        waiting pairs (in arrival order), within the batch bounds. The window keeps requests finishing
        in arrival order under load: searching the whole queue spread every request's pairs over the
        whole backlog, so all of them finished together at its end (p50 = p99 = the run). Shared
        groups in the window are passed over: their rows run on their own prefix."""
        oldest = self.pending[0]
        width = len(oldest.ids)
        window = [w for w in self.pending[1:WINDOW * self.options.max_batch_size] if isinstance(w, Work)]
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
        kept, dropped = [], 0
        for w in self.pending:
            if isinstance(w, Work):
                if w.future.done():
                    dropped += 1
                    continue
            elif w.cancelled():
                dropped += len(w.rows) - w.next
                continue
            kept.append(w)
        if dropped:
            self.metrics.pairs_cancelled.labels(model=self.model.name).inc(dropped)
        if len(kept) != len(self.pending):
            self.pending = kept
