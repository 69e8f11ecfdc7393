"""Pairs into padded batches (length-ordered, cut where padding would grow) and batches into logits."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from qwen_convert.errors import QconvError
from qwen_convert.reranker import DEFAULT_INSTRUCTION, EncodedBatch, PaddingSide, Pair, PromptEncoder, open_tokenizer, pad_rows

from .base import Scorer, run_failure


def score_pairs(scorer: Scorer, batches: Sequence[EncodedBatch], on_batch: Callable[[int], None] | None = None) -> np.ndarray:
    """One logit per row over pre-encoded batches, concatenated in order (float64).

    A scorer with `score_batches` (the streamed engine) gets every batch at once: it streams the
    weights once for all of them instead of once per batch."""
    out = []
    whole = _guarded(scorer, scorer.score_batches, batches) if hasattr(scorer, "score_batches") else None
    for i, batch in enumerate(batches):
        scores = np.asarray(whole[i] if whole is not None else _guarded(scorer, scorer.score, batch), dtype=np.float64).reshape(-1)
        if scores.shape[0] != batch.input_ids.shape[0]:
            raise ValueError(f"{scorer.name} returned {scores.shape[0]} scores for a batch of {batch.input_ids.shape[0]}")
        out.append(scores)
        if on_batch is not None:
            on_batch(batch.input_ids.shape[0])
    return np.concatenate(out) if out else np.zeros(0)


def _guarded(scorer: Scorer, fn, arg):
    """fn(arg), a library's failure (onnxruntime's InvalidArgument, torch's RuntimeError ...) turned
    into one line naming the variant and file: verify, score and run all score through here."""
    try:
        return fn(arg)
    except (QconvError, ModuleNotFoundError):
        raise
    except Exception as exc:  # the engines raise their own types (onnxruntime's Fail, RuntimeException ...)
        raise run_failure(scorer, exc) from exc


# A batch of prompts in length order ends early where the next prompt would make its padded tokens
# exceed this multiple of its real ones: measured on verify's probes (ten prompts of 100-160 tokens,
# two of 512), batches of 8 padded 3,128 tokens for 2,307 real; cut at 1.25, 2,418.
MAX_PADDED_RATIO = 1.25


def encode_batches(encoder: PromptEncoder, pairs: Sequence[Pair], batch_size: int, padding_side: PaddingSide,
                   by_length: bool = False) -> list[EncodedBatch]:
    """Consecutive pairs in padded batches of at most batch_size (input order kept). by_length (pairs
    sorted from shortest prompt, see length_order): a batch also ends before a prompt that would pad it
    past MAX_PADDED_RATIO, so a long document gets a batch of its own instead of widening the others."""
    if batch_size < 1:
        raise QconvError(f"batch size {batch_size} is not positive", "use --batch-size 1 or more")
    if not by_length:
        return [encoder.encode(pairs[i : i + batch_size], padding_side) for i in range(0, len(pairs), batch_size)]
    rows = [encoder.ids(p) for p in pairs]
    return [pad_rows(rows[a:b], encoder.tokens.pad_id, padding_side) for a, b in length_batches([len(r) for r in rows], batch_size)]


def length_batches(lengths: Sequence[int], batch_size: int, ratio: float = MAX_PADDED_RATIO) -> list[tuple[int, int]]:
    """[start, stop) of each batch over ascending `lengths`: at most batch_size rows, and a row joins
    only if the batch, padded to it, stays within `ratio` × its real tokens."""
    bounds: list[tuple[int, int]] = []
    start, real = 0, 0
    for i, n in enumerate(lengths):
        rows = i - start + 1
        if i > start and (rows > batch_size or rows * n > ratio * (real + n)):
            bounds.append((start, i))
            start, real = i, 0
        real += n
    if len(lengths):
        bounds.append((start, len(lengths)))
    return bounds


def length_order(encoder: PromptEncoder, pairs: Sequence[Pair]) -> np.ndarray:
    """Indices of `pairs` from shortest to longest prompt: batching in this order halves padded tokens."""
    return np.argsort([len(encoder.ids(p)) for p in pairs], kind="stable")


def prompt_encoder(path: Path, instruction: str | None, max_length: int) -> PromptEncoder:
    return PromptEncoder(open_tokenizer(path), instruction or DEFAULT_INSTRUCTION, max_length)
