"""The served models by name, and the one way a request gets scores from one of them.

Hot swap: `load` opens the new model off the event loop, starts its batcher, and only then points
the name at it; the replaced model's batcher stops taking work and answers what it already holds
before it is freed. A request that looked up the old model while it was being replaced is told
`Retired` at submit time and looks the name up again, so no request in flight is dropped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from qwen_convert.errors import QconvError
from qwen_convert.reranker import Pair
from qwen_convert.scoring.metrics import sigmoid
from qwen_convert.scoring.prefix import check_documents_fit

from .batcher import Batcher, Retired
from .engine import LoadedModel, load_model
from .metrics import ServerMetrics
from .options import ModelSpec, ServeOptions
from .protocol import InvalidRequest, ModelNotFound
from .sharing import plan_request


@dataclass
class Served:
    model: LoadedModel
    batcher: Batcher
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass(frozen=True)
class Scores:
    model: str
    p_yes: list[float]  # one per pair, in request order
    prompt_tokens: int  # tokens of the distinct prompts actually run


def prepare(model: LoadedModel, pairs: Sequence[Pair], instruction: str | None):
    """Token rows of `pairs` and, where the model shares prefixes, which rows share (off the event loop).
    A query whose prompt leaves its documents no token is refused (422): every document would get
    the query's own score, never what was asked."""
    encoder = model.encoder(instruction)
    try:
        check_documents_fit(encoder, pairs)
    except QconvError as exc:
        raise InvalidRequest(exc.message, "shorten the query or the instruction") from None
    rows = encoder.batch_ids(pairs)
    if model.prefix is None or len(rows) < 2:
        return rows, None, ()
    plan = plan_request(rows, [p.query for p in pairs])
    return rows, (plan if plan.groups else None), model.template(instruction)


class ModelRegistry:
    def __init__(self, options: ServeOptions, metrics: ServerMetrics):
        self.options = options
        self.metrics = metrics
        self.models: dict[str, Served] = {}
        self.default: str | None = None
        self._retiring: set[asyncio.Task] = set()
        self._started = False
        self._preloaded: list[LoadedModel] = []

    def preload(self, spec: ModelSpec) -> LoadedModel:
        """Open a model before the event loop runs (startup: a bad path fails before the port opens)."""
        model = load_model(spec, self.options)
        self._preloaded.append(model)
        return model

    def start(self) -> None:
        """Inside the event loop: start a batcher for every preloaded model."""
        for model in self._preloaded:
            self._install(model)
        self._preloaded.clear()
        self._started = True

    def _install(self, model: LoadedModel) -> Served:
        batcher = Batcher(model, self.options, self.metrics)
        batcher.start()
        served = Served(model, batcher)
        old = self.models.get(model.name)
        self.models[model.name] = served
        self.default = self.default or model.name
        if old is not None:
            self._retire(old)
        return served

    def _retire(self, served: Served) -> None:
        task = asyncio.get_running_loop().create_task(served.batcher.close())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def get(self, name: str | None) -> Served:
        if name is None or name == "":
            name = self.default
        served = self.models.get(name) if name is not None else None
        if served is None:
            known = ", ".join(self.models) or "none"
            raise ModelNotFound(f"model {name!r} is not served", f"served models: {known}")
        return served

    async def load(self, spec: ModelSpec) -> Served:
        model = await asyncio.to_thread(load_model, spec, self.options)
        return self._install(model)

    async def unload(self, name: str) -> None:
        served = self.get(name)
        del self.models[name]
        if self.default == name:
            self.default = next(iter(self.models), None)
        await served.batcher.close()

    async def close(self) -> None:
        """Shutdown: answer everything admitted, on every model."""
        for served in list(self.models.values()):
            await served.batcher.close()
        if self._retiring:
            await asyncio.gather(*self._retiring)

    async def score(self, name: str | None, pairs: Sequence[Pair], instruction: str | None) -> Scores:
        """P(yes) for every pair; identical pairs run once; the model is looked up again if swapped."""
        distinct = list(dict.fromkeys(pairs))
        slot = {p: i for i, p in enumerate(distinct)}
        while True:
            served = self.get(name)
            model = served.model
            rows, plan, template = await asyncio.to_thread(prepare, model, distinct, instruction)
            try:
                futures = served.batcher.submit(rows, plan, template)
            except Retired:
                continue
            break
        if len(distinct) < len(pairs):
            self.metrics.pairs_deduplicated.labels(model=model.name).inc(len(pairs) - len(distinct))
        try:
            logits = await asyncio.gather(*futures)
        except BaseException:
            for f in futures:  # client gone or a failed batch: queued pairs stop costing compute
                f.cancel()
            raise
        p = sigmoid(np.asarray(logits, dtype=np.float64))
        return Scores(model.name, [float(p[slot[pair]]) for pair in pairs], sum(len(r) for r in rows))
