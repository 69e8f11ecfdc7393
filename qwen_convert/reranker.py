"""What a Qwen3 reranker is: the official prompt template, the yes/no tokens, and padded encoding.

Shared by `score`, `verify`, the ONNX checks and the trained tiny model, so every path tokenizes
exactly the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from .errors import QconvError, TokenizerError

SYSTEM_PROMPT = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
    'Note that the answer can only be "yes" or "no".'
)
PREFIX = f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
DEFAULT_MAX_LENGTH = 8192
YES, NO = "yes", "no"

PaddingSide = Literal["left", "right"]


def format_body(query: str, document: str, instruction: str = DEFAULT_INSTRUCTION) -> str:
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"


def format_prompt(query: str, document: str, instruction: str = DEFAULT_INSTRUCTION) -> str:
    return PREFIX + format_body(query, document, instruction) + SUFFIX


@dataclass(frozen=True)
class Pair:
    query: str
    document: str


@dataclass(frozen=True)
class RerankerTokens:
    yes_id: int
    no_id: int
    pad_id: int


def load_tokenizer(path: Path | str):
    """Load a local tokenizer (fast tokenizer files only; no remote code)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as exc:  # transformers raises many types for a bad tokenizer
        raise TokenizerError(f"cannot load the tokenizer in {path}: {exc}", "the model directory needs tokenizer.json/tokenizer_config.json") from exc


def _single_token_id(tokenizer, word: str) -> int:
    ids = tokenizer.encode(word, add_special_tokens=False)
    tok_id = tokenizer.convert_tokens_to_ids(word)
    unk = tokenizer.unk_token_id
    if len(ids) != 1 or tok_id is None or tok_id == unk or ids[0] != tok_id:
        raise TokenizerError(
            f'the tokenizer does not encode "{word}" as one real token (got {ids})',
            "this is not a Qwen3-Reranker tokenizer; use the one shipped with the model",
        )
    return int(tok_id)


def reranker_tokens(tokenizer) -> RerankerTokens:
    yes_id = _single_token_id(tokenizer, YES)
    no_id = _single_token_id(tokenizer, NO)
    if yes_id == no_id:
        raise TokenizerError('"yes" and "no" map to the same token', "use the model's own tokenizer")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if pad_id is None or pad_id == tokenizer.unk_token_id:
        raise TokenizerError("the tokenizer has no pad token", "use the model's own tokenizer (Qwen pads with <|endoftext|>)")
    return RerankerTokens(yes_id, no_id, int(pad_id))


@dataclass(frozen=True)
class EncodedBatch:
    input_ids: np.ndarray  # int64 [batch, seq]
    attention_mask: np.ndarray  # int64 [batch, seq]

    @property
    def last_index(self) -> np.ndarray:
        """Position of the last real token in each row, for either padding side."""
        seq = self.attention_mask.shape[1]
        return seq - 1 - np.argmax(self.attention_mask[:, ::-1], axis=1)


class PromptEncoder:
    """Tokenizes (query, document) pairs with the official template.

    Prefix and suffix are tokenized once and never truncated: only the body is cut, from its end
    (the document's tail first), so a long document can never eat the `assistant` turn whose last
    token the score is read from.
    """

    def __init__(self, tokenizer, instruction: str = DEFAULT_INSTRUCTION, max_length: int = DEFAULT_MAX_LENGTH):
        self.tokenizer = tokenizer
        self.instruction = instruction
        self.max_length = max_length
        self.tokens = reranker_tokens(tokenizer)
        self.prefix_ids = tokenizer.encode(PREFIX, add_special_tokens=False)
        self.suffix_ids = tokenizer.encode(SUFFIX, add_special_tokens=False)
        self.body_budget = max_length - len(self.prefix_ids) - len(self.suffix_ids)
        if self.body_budget < 1:
            raise QconvError(
                f"max length {max_length} leaves no room for the query and document",
                f"use a max length above {len(self.prefix_ids) + len(self.suffix_ids)}",
            )

    def body_ids(self, pair: Pair) -> list[int]:
        """The untruncated body: instruction, query and document."""
        return self.tokenizer.encode(format_body(pair.query, pair.document, self.instruction), add_special_tokens=False)

    def ids(self, pair: Pair) -> list[int]:
        return self.prefix_ids + self.body_ids(pair)[: self.body_budget] + self.suffix_ids

    def truncated(self, pair: Pair) -> bool:
        return len(self.body_ids(pair)) > self.body_budget

    def encode(self, pairs: Sequence[Pair], padding_side: PaddingSide = "left") -> EncodedBatch:
        rows = [self.ids(p) for p in pairs]
        width = max(len(r) for r in rows)
        input_ids = np.full((len(rows), width), self.tokens.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            if padding_side == "left":
                input_ids[i, width - len(row):] = row
                mask[i, width - len(row):] = 1
            else:
                input_ids[i, : len(row)] = row
                mask[i, : len(row)] = 1
        return EncodedBatch(input_ids, mask)
