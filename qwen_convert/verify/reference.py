"""reference_scores(): the causal reference's logits on every padding side, from the cache or computed.

The engine is chosen by memory (scoring.choose_engine): transformers when the whole fp32 model fits,
the streamed forward otherwise (either can be forced). A computed result is stored in the cache
(cache.py) under a key of everything it depends on; the next `verify` of another variant, or a
`qconv run` re-run, reads it back instead of recomputing. A stale or corrupt entry is reported in
one line and recomputed.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qwen_convert.errors import QconvError
from qwen_convert.progress import NULL, Reporter
from qwen_convert.reranker import EncodedBatch


@dataclass(frozen=True)
class ReferenceRun:
    scores: dict[str, np.ndarray]  # side -> logits, in the pairs' own order (NaN: not scored on that side)
    engine: str  # transformers | streamed (the one that computed them, also on a cache hit)
    peak_rss: int | None  # bytes, this process during the pass (None on a cache hit)
    seconds: float
    cache: str  # off | hit | miss | stale | corrupt
    cache_path: Path | None
    needed: int  # estimated bytes of the engine


def padded_tokens(batches: Mapping[str, Sequence[EncodedBatch]]) -> tuple[int, int]:
    """(padded tokens over every batch and side, padded tokens of the largest batch)."""
    sizes = [b.input_ids.size for side in batches.values() for b in side]
    return sum(sizes), max(sizes, default=0)


def scored_rows(orders: Mapping[str, np.ndarray]) -> int:
    """The number of pairs behind `orders` (side -> pair index of each batch row, in batch order): at
    least one side scores every pair; another may score only a padding probe."""
    return max((len(o) for o in orders.values()), default=0)


def all_finite(scores: Mapping[str, np.ndarray], orders: Mapping[str, np.ndarray]) -> bool:
    """Every score that was computed is finite (pairs a side did not score hold NaN)."""
    return all(np.isfinite(scores[side][orders[side]]).all() for side in orders)


def score_sides(scorer, batches: Mapping[str, Sequence[EncodedBatch]], orders: Mapping[str, np.ndarray],
                reporter: Reporter, label: str) -> dict[str, np.ndarray]:
    """Logits per padding side in the pairs' own order, NaN for pairs that side did not score; a
    streamed scorer gets every side in one pass."""
    from qwen_convert.scoring.batches import score_pairs

    sides = list(batches)
    n = scored_rows(orders)
    out = {side: np.full(n, np.nan) for side in sides}
    if hasattr(scorer, "score_batches"):
        flat = [b for side in sides for b in batches[side]]
        scores = score_pairs(scorer, flat)
        start = 0
        for side in sides:
            rows = len(orders[side])
            out[side][orders[side]] = scores[start:start + rows]
            start += rows
        return out
    for side in sides:
        task = reporter.task(f"{label} ({side} padding)", total=len(orders[side]))
        out[side][orders[side]] = score_pairs(scorer, batches[side], on_batch=task.advance)
    return out


def reference_scores(path: Path, batches: Mapping[str, Sequence[EncodedBatch]], orders: Mapping[str, np.ndarray], settings: Mapping,
                     engine: str = "auto", cache_dir: Path | None = None, budget: int | None = None,
                     reporter: Reporter = NULL) -> ReferenceRun:
    """The causal reference at PATH scored on `batches` (rows: `orders`, see score_sides), cached under `cache_dir`."""
    from qwen_convert.checkpoint.files import load_config
    from qwen_convert.formats import ArtifactKind
    from qwen_convert.scoring.memory import activation_bytes, describe, peak_rss, reset_peak
    from qwen_convert.scoring.registry import choose_engine, load_scorers

    from .cache import ScoreCache, reference_key

    config = load_config(path)
    total, largest = padded_tokens(batches)
    hidden, inter = int(config.get("hidden_size", 0)), int(config.get("intermediate_size", 0))
    gc.collect()
    choice = choose_engine(path, ArtifactKind.CAUSAL, engine, "float32", budget,
                           activation_bytes(total if engine != "transformers" else largest, hidden, inter))
    if choice.engine == "streamed" and not choice.fits:
        raise QconvError(f"the reference needs about {describe(choice.needed)} even streamed ({choice.what}), "
                         f"and {describe(choice.budget)} is available",
                         "free memory, use fewer or shorter pairs (--pairs, --max-length), or raise --memory-limit")

    sizes = {side: scored_rows(orders) for side in batches}
    cache = ScoreCache(Path(cache_dir)) if cache_dir is not None else None
    material = reference_key(path, batches, choice.engine, settings) if cache else None
    status, where = "off", None
    if cache is not None:
        found = cache.lookup(material, sizes)
        status, where = found.status, found.path
        if found.scores is not None:
            reporter.log(f"reference: cached scores {found.path}")
            return ReferenceRun(found.scores, choice.engine, None, 0.0, "hit", found.path, choice.needed)
        if found.reason:
            reporter.log(f"reference cache entry {found.path} is {found.status} ({found.reason}); recomputing")

    reporter.log(f"reference: {path} ({choice.engine}, fp32)")
    reset_peak()
    started = time.perf_counter()
    scorer = load_scorers(path, (), "float32", ArtifactKind.CAUSAL, engine=choice.engine, reporter=reporter)[0]
    scores = score_sides(scorer, batches, orders, reporter, "reference")
    seconds = time.perf_counter() - started
    peak = peak_rss()
    del scorer
    gc.collect()
    if cache is not None and all_finite(scores, orders):
        where = cache.store(material, scores, {"engine": choice.engine, "seconds": round(seconds, 3)})
    return ReferenceRun(scores, choice.engine, peak, seconds, status, where, choice.needed)
