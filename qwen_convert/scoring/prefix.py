"""Prefix-shared scoring: run the tokens every pair of a query shares once, then only each pair's own.

An ONNX export may carry, beside each variant, its with-past graph (onnx/prefix/<variant file>,
written by qwen_convert/onnx/prefix.py): the same reranker with per-layer key/value caches in and
out. The shared part is found on the token rows themselves, the rows full-prompt scoring would run
(PromptEncoder.ids: same truncation, same tokenizer boundaries), as their longest common prefix, so
the tokens each score sees are exactly the full prompt's and only the arithmetic is split:

  1. the prefix every row of the request shares (system prompt and instruction) is run once,
  2. each query's prefix (that plus `<Query>: ...`) once, on top of (1),
  3. each document's remaining tokens (its body and the template suffix) on top of (2).

Step 3 runs the documents in length-ordered padded batches (either padding side: the pads are
masked keys like any), cut where padding would pass SUFFIX_PADDED_RATIO, all on the one prefix
cache: the with-past graph's attention broadcasts a past of batch 1 over the rows (onnx/prefix.py). Graphs written before that (their attention was
onnxruntime's GroupQueryAttention, which takes a past only for batch 1 when more than one new token
comes, and whose outputs are `present.*`) still score, one document at a time.

Rows that share less than MIN_SHARED tokens with another row of their query (a query with one
document, or pairs that share nothing), and exports without the with-past graph, are scored with
full prompts by the caller's scorer.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from qwen_convert.errors import QconvError, SourceError
from qwen_convert.formats import PREFIX_DIR, ArtifactKind
from qwen_convert.reranker import PaddingSide, Pair, PromptEncoder, format_body, pad_rows

from .base import Scorer
from .onnx_scorers import check_variant_files, cpu_session

# A shared run costs one session call: below this many shared tokens it saves less than it costs.
MIN_SHARED = 16
# A suffix batch ends before a document that would pad it past this multiple of its real tokens (full
# prompts use batches.MAX_PADDED_RATIO, 1.25). The split attention (onnx/prefix.py) computes every
# padded query against every padded key in fp32, so a pad costs far more than in the int8 GEMMs:
# on the 0.6B int8 export, bench_peers' realistic pairs (2 queries x 20 documents of 57-303 own
# tokens), batches of 8 cut at 1.05 padded 2% instead of 15% and scored 1.14-1.21x faster than at
# 1.25 (interleaved medians, 2 threads); cut at 1.0 (no padding, mostly one document a run) 1.12x.
SUFFIX_PADDED_RATIO = 1.05
# With workers (workers.py: each batch one single-threaded run, one per core at once) a suffix batch
# holds at most this many documents: smaller runs pad less, attend less, and keep every core busy to the
# end. bench_peers' realistic pairs (0.6B int8, Zen 5, 2 workers, ad hoc, 3 processes x 2 passes):
# batches of 2 scored 3.01 pairs/s (median), of 1 2.86, of 8 2.79.
WORKER_BATCH = 2
PAST = "past_key_values."
PRESENT = "present."  # GroupQueryAttention graphs: past + new
NEW = "new_key_values."  # split-attention graphs: the new tokens' only


def prefix_graph(variant_path: Path) -> Path:
    """Where an ONNX variant's with-past graph lives: onnx/prefix/<the variant's file name>."""
    return variant_path.parent / PREFIX_DIR / variant_path.name


@dataclass(frozen=True)
class KVCache:
    """A prefix's keys and values, per layer, batch 1: {past_key_values.{i}.key/value: [1, kv, n, d]}."""

    tokens: tuple[int, ...]
    past: dict[str, np.ndarray]


@dataclass
class PrefixScorer:
    """onnxruntime over one variant's with-past graph."""

    path: Path
    name: str
    precision: str
    threads: int | None = None
    kind: ArtifactKind = ArtifactKind.ONNX
    workers: int = 1  # batches run at once (workers.py), each on `threads` intra-op threads
    _session: object = field(default=None, repr=False)

    @property
    def session(self):
        if self._session is None:
            session = cpu_session(self)
            self._past_names = [i.name for i in session.get_inputs() if i.name.startswith(PAST)]
            if not self._past_names:
                raise SourceError(f"{self.path} has no {PAST}* inputs: not a with-past graph", "re-export it with qconv export-onnx")
            outputs = {o.name for o in session.get_outputs()}
            self.batched = NEW + self._past_names[0][len(PAST):] in outputs
            self._out_names = [(NEW if self.batched else PRESENT) + n[len(PAST):] for n in self._past_names]
            self._session = session
        return self._session

    def empty(self) -> KVCache:
        session = self.session
        past = {}
        for i in session.get_inputs():
            if i.name.startswith(PAST):
                dtype = np.float16 if "float16" in i.type else np.float32
                past[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), dtype=dtype)
        return KVCache((), past)

    def _feeds(self, base: KVCache, new: Sequence[int]) -> dict:
        total = len(base.tokens) + len(new)
        return {"input_ids": np.asarray([new], dtype=np.int64), "attention_mask": np.ones((1, total), dtype=np.int64), **base.past}

    def extend(self, base: KVCache, tokens: Sequence[int]) -> KVCache:
        """The cache of `tokens`, which start with base.tokens: only the rest is run."""
        tokens = tuple(tokens)
        if tokens[: len(base.tokens)] != base.tokens or len(tokens) <= len(base.tokens):
            raise ValueError("extend() needs tokens that continue the base prefix")
        session = self.session
        outs = session.run(self._out_names, self._feeds(base, tokens[len(base.tokens):]))
        if not self.batched:
            return KVCache(tokens, dict(zip(self._past_names, outs)))
        return KVCache(tokens, {n: np.concatenate([base.past[n], a], axis=2) for n, a in zip(self._past_names, outs)})

    def score_suffix(self, cache: KVCache, suffix: Sequence[int]) -> float:
        """The logit of the row cache.tokens + suffix (suffix non-empty)."""
        (logits,) = self.session.run(["logits"], self._feeds(cache, suffix))
        return float(logits[0, 0])

    def score_suffixes(self, cache: KVCache, suffixes: Sequence[Sequence[int]], batch_size: int = 8,
                       padding_side: PaddingSide = "left", pad_id: int = 0,
                       on_rows: Callable[[int], None] | None = None, padded_ratio: float = SUFFIX_PADDED_RATIO) -> np.ndarray:
        """The logits of the rows cache.tokens + suffix, one per suffix (each non-empty): in
        length-ordered padded batches of at most `batch_size` rows and `padded_ratio` x their real
        tokens on the one cache, or one at a time on a graph that cannot batch a past
        (GroupQueryAttention)."""
        return self.start_suffixes(cache, suffixes, batch_size, padding_side, pad_id, on_rows, padded_ratio)()

    def start_suffixes(self, cache: KVCache, suffixes: Sequence[Sequence[int]], batch_size: int = 8,
                       padding_side: PaddingSide = "left", pad_id: int = 0,
                       on_rows: Callable[[int], None] | None = None,
                       padded_ratio: float = SUFFIX_PADDED_RATIO) -> Callable[[], np.ndarray]:
        """score_suffixes in two steps: this queues the batches and returns the call that waits for
        their logits. With workers > 1 the batches start at once on the worker threads (workers.py),
        so the caller may make the next query's cache meanwhile, in batches of at most WORKER_BATCH;
        else they run inside the wait."""
        from .batches import length_batches

        batch_size = min(batch_size, WORKER_BATCH) if self.workers > 1 else batch_size
        out = np.empty(len(suffixes))
        self.session  # noqa: B018 (loads the graph: `batched` says what it can take)
        if not self.batched:
            runs = [([i], partial(self._one, cache, suffix)) for i, suffix in enumerate(suffixes)]
        else:
            past = self._bound(cache)
            order = sorted(range(len(suffixes)), key=lambda i: len(suffixes[i]))
            runs = []
            for a, b in length_batches([len(suffixes[i]) for i in order], batch_size, padded_ratio):
                idx = order[a:b]
                batch = pad_rows([list(suffixes[i]) for i in idx], pad_id, padding_side)
                mask = np.concatenate([np.ones((len(idx), len(cache.tokens)), np.int64), batch.attention_mask.astype(np.int64)], axis=1)
                runs.append((idx, partial(self._logits, batch.input_ids.astype(np.int64), mask, past)))
        futures = None
        if self.workers > 1:
            from .workers import pool

            futures = [pool(self.workers).submit(run) for _, run in runs]

        def wait() -> np.ndarray:
            try:
                for k, (idx, run) in enumerate(runs):
                    out[idx] = (futures[k].result() if futures else run())[:, 0]
                    if on_rows is not None:
                        on_rows(len(idx))
            except BaseException:
                for f in futures or ():
                    f.cancel()  # a failed query's batches not started yet need not run
                raise
            return out

        return wait

    def _one(self, cache: KVCache, suffix: Sequence[int]) -> np.ndarray:
        return np.array([[self.score_suffix(cache, suffix)]])

    @staticmethod
    def _bound(cache: KVCache) -> dict:
        """The cache as OrtValues over its arrays (no copy), made once for all of a query's batches:
        fed as numpy to every run instead, the same scoring was 1.04x slower (bench_peers'
        realistic pairs, 0.6B int8, interleaved medians of 5)."""
        import onnxruntime as ort

        return {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in cache.past.items()}

    def _logits(self, input_ids: np.ndarray, mask: np.ndarray, past: dict) -> np.ndarray:
        """logits [batch, 1] of one padded batch on a bound cache (io_binding: only logits come back)."""
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("attention_mask", mask)
        for name, value in past.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]


def common_length(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of `rows`, leaving every row at least one token of its own
    (the score is read at a row's last token, which must be run with the row)."""
    limit = min(len(r) for r in rows) - 1
    first = rows[0]
    n = 0
    while n < limit and all(r[n] == first[n] for r in rows):
        n += 1
    return n


@dataclass(frozen=True)
class SharePlan:
    """Which rows go through a shared prefix and which through full prompts."""

    template: int  # tokens shared by every shared group (0: none worth a run)
    groups: tuple[tuple[int, tuple[int, ...]], ...]  # (shared length, row indices) per query
    full: tuple[int, ...]  # rows scored with full prompts

    @property
    def shared_rows(self) -> int:
        return sum(len(idx) for _, idx in self.groups)


def plan_sharing(rows: Sequence[Sequence[int]], groups: Sequence[Sequence[int]], min_shared: int = MIN_SHARED) -> SharePlan:
    """Per group of rows (one query's pairs): share its common prefix when it has two or more rows
    and they share at least `min_shared` tokens; everything else is scored with full prompts."""
    shared: list[tuple[int, tuple[int, ...]]] = []
    full: list[int] = []
    for idx in groups:
        n = common_length([rows[i] for i in idx]) if len(idx) > 1 else 0
        if n >= min_shared:
            shared.append((n, tuple(idx)))
        else:
            full.extend(idx)
    template = 0
    if len(shared) > 1:
        # The groups' shared prefixes, each cut one token longer: common_length keeps that token out.
        template = common_length([rows[idx[0]][: n + 1] for n, idx in shared])
        template = template if template >= min_shared else 0
    return SharePlan(template, tuple(shared), tuple(sorted(full)))


def score_shared(prefix: PrefixScorer, rows: Sequence[Sequence[int]], plan: SharePlan,
                 on_row: Callable[[int], None] | None = None, batch_size: int = 8, padding_side: PaddingSide = "left",
                 pad_id: int = 0, start: KVCache | None = None) -> dict[int, float]:
    """Logits of the plan's shared rows, by row index (each query's documents in padded batches of
    at most `batch_size`, cut at SUFFIX_PADDED_RATIO). `start`: a cache every group's shared tokens
    begin with, used instead of running plan.template (`qconv serve` keeps its template's)."""
    empty = prefix.empty()
    if start is not None:
        template = start
    else:
        template = prefix.extend(empty, rows[plan.groups[0][1][0]][: plan.template]) if plan.template else empty
    out: dict[int, float] = {}
    started: deque = deque()
    for n, idx in plan.groups:
        first = rows[idx[0]]
        cache = prefix.extend(template, first[:n]) if n > len(template.tokens) else template
        started.append((idx, prefix.start_suffixes(cache, [rows[i][n:] for i in idx], batch_size, padding_side, pad_id, on_row)))
        # The previous query's documents ran (on the workers, where there are) while this cache was
        # made; collect them now, so at most two queries' caches are held.
        if len(started) > 1:
            done, wait = started.popleft()
            out.update(zip(done, wait().tolist()))
    for done, wait in started:
        out.update(zip(done, wait().tolist()))
    return out


def score_rows(full: Scorer, prefix: PrefixScorer | None, rows: Sequence[Sequence[int]], groups: Sequence[Sequence[int]],
               batch_size: int, padding_side: PaddingSide, pad_id: int,
               on_rows: Callable[[int], None] | None = None) -> tuple[np.ndarray, SharePlan]:
    """One logit per row: shared rows through `prefix`, the rest in length-ordered padded batches
    through `full` (as score_documents batches them)."""
    from .batches import length_batches, score_pairs

    plan = plan_sharing(rows, groups) if prefix is not None else SharePlan(0, (), tuple(range(len(rows))))
    logits = np.empty(len(rows))
    if plan.groups:
        for i, v in score_shared(prefix, rows, plan, on_rows, batch_size, padding_side, pad_id).items():
            logits[i] = v
    if plan.full:
        order = sorted(plan.full, key=lambda i: len(rows[i]))
        batches = [pad_rows([rows[i] for i in order[a:b]], pad_id, padding_side)
                   for a, b in length_batches([len(rows[i]) for i in order], batch_size)]
        logits[order] = score_pairs(full, batches, on_batch=on_rows)
    return logits, plan


def load_prefix_scorer(scorer: Scorer, parallel: bool = False) -> PrefixScorer | None:
    """The with-past graph of an ONNX variant scorer (open_prefix_scorer), or None where the scorer
    is not an ONNX file."""
    path = getattr(scorer, "path", None)
    if scorer.kind is not ArtifactKind.ONNX or path is None:
        return None
    return open_prefix_scorer(Path(path), f"{scorer.name}+prefix", scorer.precision, getattr(scorer, "threads", None), parallel)


def open_prefix_scorer(variant: Path, name: str, precision: str, threads: int | None,
                       parallel: bool) -> PrefixScorer | None:
    """The scorer of the with-past graph beside ONNX variant file `variant` (prefix_graph), its files
    checked, on `threads` cores (None: all physical cores); None where the export has none (older
    exports, the optimum exporter). `parallel` (many documents to score: `qconv score`, `qconv
    serve`): its batches run one per core at once, each on one intra-op thread (workers.py); else one
    batch at a time on all `threads` (verify)."""
    graph = prefix_graph(variant)
    if not graph.is_file():
        return None
    check_variant_files(graph)
    if parallel:
        from .workers import physical_cores

        workers = threads or physical_cores()
        if workers > 1:
            return PrefixScorer(graph, name, precision, 1, workers=workers)
    return PrefixScorer(graph, name, precision, threads)


def check_documents_fit(encoder: PromptEncoder, pairs: Sequence[Pair]) -> None:
    """Refuse a query whose prompt leaves its documents no token under the max length: every such
    pair would score the query alone (the same score for every document), never what was asked."""
    seen: set[str] = set()
    for pair in pairs:
        if pair.query in seen:
            continue
        seen.add(pair.query)
        # The body up to `<Document>:` (the space before the document merges into its first word).
        head = format_body(pair.query, "", encoder.instruction).rstrip()
        used = len(encoder.tokenizer.encode(head, add_special_tokens=False))
        if used >= encoder.body_budget:
            short = pair.query if len(pair.query) <= 40 else pair.query[:39] + "…"
            raise QconvError(
                f"query {short!r} with the instruction takes {used} tokens; max length {encoder.max_length} leaves "
                f"{encoder.body_budget} for query and document, so its documents would be cut away entirely",
                f"raise --max-length above {encoder.max_length - encoder.body_budget + used}, or shorten the query",
            )



@dataclass
class SharedPrefixScorer:
    """A with-past graph behind the Scorer protocol, for `verify`: a padded batch is unpadded, the
    tokens all its rows share run once, and each row's rest against them; where the rows share fewer
    than MIN_SHARED tokens each row runs whole with an empty past. Either way every score comes
    from the with-past graph, so verify holds it to the reference like any variant."""

    prefix: PrefixScorer

    def __post_init__(self):
        self.path, self.name, self.precision = self.prefix.path, self.prefix.name, self.prefix.precision
        self.threads, self.kind = self.prefix.threads, ArtifactKind.ONNX

    def score(self, batch) -> np.ndarray:
        rows = [[int(t) for t, m in zip(ids, mask) if m] for ids, mask in zip(batch.input_ids, batch.attention_mask)]
        plan = plan_sharing(rows, [list(range(len(rows)))])
        out = np.empty(len(rows))
        if plan.groups:
            for i, v in score_shared(self.prefix, rows, plan).items():
                out[i] = v
        empty = self.prefix.empty() if plan.full else None
        for i in plan.full:
            out[i] = self.prefix.score_suffix(empty, rows[i])
        return out


def shared_prefix_candidate(scorer: Scorer) -> SharedPrefixScorer | None:
    """verify's candidate for an ONNX variant's with-past graph, or None where there is none."""
    prefix = load_prefix_scorer(scorer)
    return SharedPrefixScorer(prefix) if prefix is not None else None
