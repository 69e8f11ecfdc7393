"""Prefix sharing in the server: a request's documents run on top of their query's cached prefix.

An ONNX export with its with-past graph (onnx/prefix/<variant file>, qwen_convert/onnx/prefix.py) is
scored the way `qconv score` scores it (scoring/prefix.py), request by request:

  1. the template prefix (system prompt, instruction, `<Query>:`) is run once per model and
     instruction and kept (`TemplateCache`, bounded: instructions come from clients),
  2. each request's query prefix once, on top of (1), when its first document reaches the worker,
  3. its documents' own tokens (document body and template suffix) on top of (2), in chunks, so a
     cancelled request stops between chunks.

Which rows share is decided on the token rows themselves, exactly as `qconv score` decides it
(plan_sharing: a query's rows with at least MIN_SHARED common tokens); everything else (a request
with one document, /score pairs of different queries) goes through the full-prompt graph in
length-grouped batches. A step runs on the model's worker thread only, so the caches need no lock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from qwen_convert.reranker import Pair
from qwen_convert.scoring.prefix import MIN_SHARED, KVCache, PrefixScorer, SharePlan, common_length, plan_sharing, score_shared

# Templates kept per model: one per instruction in use. Each holds a cache of ~50 tokens (~10 MB for
# the 0.6B in fp32); clients choose instructions, so the count is bounded and the oldest dropped.
TEMPLATES_KEPT = 8
# Queries whose first tokens pin down where the template ends: their common prefix is the template.
PROBES = ("a", "Z", "0", "?")


def template_tokens(encoder) -> tuple[int, ...]:
    """The tokens every prompt of this encoder (model + instruction) starts with, up to `<Query>:`;
    () when that is too short to be worth a run. Tokenizer merges across the boundary are handled
    where it is used: a request's rows must start with these tokens for the cache to serve them."""
    rows = encoder.batch_ids([Pair(q, "d") for q in PROBES])
    n = common_length(rows)
    return tuple(rows[0][:n]) if n >= MIN_SHARED else ()


def plan_request(rows: Sequence[Sequence[int]], queries: Sequence[str]) -> SharePlan:
    """Which rows share their query's prefix (qconv score's rule) and which run as full prompts."""
    by_query: dict[str, list[int]] = {}
    for i, q in enumerate(queries):
        by_query.setdefault(q, []).append(i)
    return plan_sharing(rows, list(by_query.values()))


class TemplateCache:
    """KV caches of template prefixes, by their tokens, least recently used dropped first."""

    def __init__(self, prefix: PrefixScorer, kept: int = TEMPLATES_KEPT):
        self.prefix, self.kept = prefix, kept
        self._caches: OrderedDict[tuple[int, ...], KVCache] = OrderedDict()

    def get(self, tokens: tuple[int, ...]) -> tuple[KVCache, bool]:
        """(the cache of `tokens`, whether it was kept already)."""
        cache = self._caches.get(tokens)
        if cache is not None:
            self._caches.move_to_end(tokens)
            return cache, True
        cache = self.prefix.extend(self.prefix.empty(), tokens)
        self._caches[tokens] = cache
        while len(self._caches) > self.kept:
            self._caches.popitem(last=False)
        return cache, False


@dataclass(eq=False)
class SharedGroup:
    """One query's rows of one request, scored on top of their common prefix of `shared` tokens."""

    rows: list[list[int]]
    shared: int
    template: tuple[int, ...]  # the model + instruction's template tokens (may not fit these rows: then unused)
    futures: list
    enqueued: float
    cache: KVCache | None = field(default=None, repr=False)  # the query prefix's, once step 2 ran
    next: int = 0  # rows before this one are answered

    def chunk(self, max_rows: int, max_tokens: int) -> list[int]:
        """The next rows to run: at most max_rows, and rows x their longest own part within max_tokens."""
        out: list[int] = []
        longest = 0
        for i in range(self.next, len(self.rows)):
            own = len(self.rows[i]) - self.shared
            if out and (len(out) >= max_rows or max(longest, own) * (len(out) + 1) > max_tokens):
                break
            out.append(i)
            longest = max(longest, own)
        return out

    def cancelled(self) -> bool:
        return all(f.done() for f in self.futures[self.next:])


@dataclass
class StepResult:
    logits: list[float]
    tokens: int  # tokens run in this step (the prefixes it computed, then the rows' own parts)
    template_hit: bool | None  # None: the template cache was not consulted in this step


def run_step(prefix: PrefixScorer, templates: TemplateCache, group: SharedGroup, rows: list[int]) -> StepResult:
    """Score `rows` of `group` (the worker thread's work): the query prefix first if not yet run."""
    tokens, hit = 0, None
    if group.cache is None:
        first = group.rows[0]
        t = group.template
        base = prefix.empty()
        if t and len(t) <= group.shared and tuple(first[: len(t)]) == t:
            base, hit = templates.get(t)
            tokens += 0 if hit else len(t)
        group.cache = prefix.extend(base, first[: group.shared]) if group.shared > len(base.tokens) else base
        tokens += group.shared - len(base.tokens)
    plan = SharePlan(0, ((group.shared, tuple(rows)),), ())
    logits = score_shared(prefix, group.rows, plan, batch_size=max(1, len(rows)), start=group.cache)
    tokens += sum(len(group.rows[i]) - group.shared for i in rows)
    return StepResult([logits[i] for i in rows], tokens, hit)
