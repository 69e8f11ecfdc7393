"""The batches verify scores: every pair on the first padding side, in length order and cut where a
longer prompt would pad the others; on each other side every pair, or the padding probe."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from qwen_convert.reranker import PromptEncoder, pad_rows
from qwen_convert.scoring.batches import length_batches
from qwen_convert.scoring.probes import LabeledPair

from .options import VerifyOptions


@dataclass(frozen=True)
class Plan:
    """What every model scores: the pairs, their prompts' batches per padding side, and how they rank."""

    pairs: list[LabeledPair]
    source: str  # where the pairs came from (a file, the built-in probes, in-memory)
    encoder: PromptEncoder
    batches: dict[str, list]  # side -> padded batches
    orders: dict[str, np.ndarray]  # side -> the pair index of each of their rows
    groups: list[list[int]]  # pair indices per query
    use_labels: bool  # NDCG gains from the pairs' labels (else from the reference's P(yes))
    settings: dict  # what the score cache keys on besides the model and the token ids


def padding_probe(lengths: np.ndarray, by_length: np.ndarray) -> tuple[np.ndarray, int]:
    """(pair indices, batch width) of the one batch each other padding side scores: the shortest prompt
    and the next longer one (rows that end at different tokens, so a pooling index taken from the wrong
    row shows), padded to twice the shortest's length or to the longest prompt if that is shorter. At
    least half of the shortest row is padding, or the most the pairs allow, at a fraction of the cost
    of padding it to the longest prompt (2 x 204 tokens instead of 2 x 512 on the bench's probes)."""
    if not len(by_length):
        return by_length, 0
    shortest = int(by_length[0])
    longer = [int(i) for i in by_length if lengths[i] > lengths[shortest]][:1]
    rows = np.array([shortest, *longer])
    width = int(max(lengths[rows].max(), min(2 * lengths[shortest], lengths.max())))
    return rows, width


def plan_batches(encoder: PromptEncoder, pairs: Sequence[LabeledPair], options: VerifyOptions) -> tuple[dict[str, list], dict[str, np.ndarray]]:
    """(side -> padded batches, side -> the pair index of each of their rows): every pair on the first
    side, in length order (unless sort_by_length is off) and in batches cut where a longer prompt
    would pad the others past scoring.MAX_PADDED_RATIO; each other side per padding_check."""
    ids = encoder.batch_ids(pairs)  # one tokenizer call for every prompt
    lengths = np.array([len(row) for row in ids], dtype=np.int64)
    by_length = np.argsort(lengths, kind="stable")
    order = by_length if options.sort_by_length else np.arange(len(pairs))
    size = options.batch_size
    bounds = (length_batches(lengths[order], size) if options.sort_by_length
              else [(i, min(i + size, len(order))) for i in range(0, len(order), size)])
    pad = encoder.tokens.pad_id

    def batched(side: str) -> list:
        return [pad_rows([ids[i] for i in order[a:b]], pad, side) for a, b in bounds]

    first, *others = options.padding_sides
    batches, orders = {first: batched(first)}, {first: order}
    probe, width = padding_probe(lengths, by_length)
    for side in others:
        if options.padding_check == "full":
            batches[side], orders[side] = batched(side), order
        else:
            batches[side], orders[side] = [pad_rows([ids[i] for i in probe], pad, side, width)] if len(probe) else [], probe
    return batches, orders
