"""Ranking metrics on per-query score lists: NDCG@k and Kendall's tau. Plain numpy, no scipy."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def sigmoid(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -x))  # overflow-free 1 / (1 + e^-x)


def ranking(scores: Sequence[float]) -> np.ndarray:
    """Indices from best to worst score; ties keep input order (stable)."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")


def dcg_at_k(gains_in_rank_order: np.ndarray, k: int) -> float:
    g = np.asarray(gains_in_rank_order, dtype=np.float64)[:k]
    return float(np.sum((2.0 ** g - 1.0) / np.log2(np.arange(2, g.size + 2))))


def ndcg_at_k(scores: Sequence[float], gains: Sequence[float], k: int = 10) -> float | None:
    """NDCG@k of the ranking by `scores` against graded `gains` (exponential gain 2^g − 1).

    None when the query has no relevant document (ideal DCG is 0): such a query says nothing.
    """
    gains = np.asarray(gains, dtype=np.float64)
    ideal = dcg_at_k(np.sort(gains)[::-1], k)
    if ideal <= 0:
        return None
    return dcg_at_k(gains[ranking(scores)], k) / ideal


def mean_ndcg(groups: Sequence[Sequence[int]], scores: np.ndarray, gains: np.ndarray, k: int = 10) -> float | None:
    values = [ndcg_at_k(scores[idx], gains[idx], k) for idx in groups]
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-b between two score lists of one query (1.0 = same order; 1.0 for < 2 items)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.size < 2:
        return 1.0
    i, j = np.triu_indices(a.size, k=1)
    da, db = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
    n_a, n_b = np.count_nonzero(da), np.count_nonzero(db)
    if n_a == 0 or n_b == 0:
        return 1.0 if n_a == n_b else 0.0
    return float(np.sum(da * db) / np.sqrt(n_a * n_b))
