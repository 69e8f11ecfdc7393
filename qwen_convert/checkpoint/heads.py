"""A reranker checkpoint's output side: which tensor holds the token rows (tied or not), the
yes/no/pad ids, and the one-logit score row W[yes] - W[no] read by seeking two rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qwen_convert.errors import WeightsError
from qwen_convert.reranker import RerankerTokens, open_tokenizer, reranker_tokens

from .files import Checkpoint
from .safetensors_io import DTYPE_CODES, TensorInfo, encode, read_rows

# The tensor names of a Qwen3 checkpoint's two ends, shared by every reader of them.
EMBED = "model.embed_tokens.weight"
NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"
SCORE = "score.weight"


def read_reranker_tokens(root: Path) -> RerankerTokens:
    """yes/no/pad ids of a model directory, validated as single real tokens (from tokenizer.json
    alone where there is one: transformers' AutoTokenizer imports torch, ~400 MB resident, which
    would break the conversion's memory bound)."""
    return reranker_tokens(open_tokenizer(root))


def head_tensor(ckpt: Checkpoint) -> tuple[TensorInfo, bool]:
    """The matrix whose rows are the output token vectors, and whether it is the tied embedding."""
    tensors = ckpt.tensors
    if LM_HEAD in tensors:
        return tensors[LM_HEAD], False
    if EMBED not in tensors:
        raise WeightsError(f"{ckpt.root} has neither {LM_HEAD} nor {EMBED}", "this is not a complete Qwen3 checkpoint")
    if ckpt.config.get("tie_word_embeddings") is False:
        raise WeightsError(
            f"{ckpt.root} has untied embeddings but no {LM_HEAD}",
            "the checkpoint is incomplete; re-download it",
        )
    return tensors[EMBED], True


def score_row(head: TensorInfo, tokens: RerankerTokens, dtype: str) -> bytes:
    rows = read_rows(head, [tokens.yes_id, tokens.no_id])  # float32, exact for bf16/fp16/fp32 sources
    diff = rows[0].astype(np.float32) - rows[1].astype(np.float32)
    return encode(diff, DTYPE_CODES[dtype])
