"""What a Qwen3 reranker is: the official prompt template, the yes/no tokens, and padded encoding.

Shared by `score`, `verify`, the ONNX checks and the trained tiny model, so every path tokenizes
exactly the same way.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from .errors import QconvError, TokenizerError, first_line

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
        raise TokenizerError(f"cannot load the tokenizer in {path}: {first_line(exc)}", "the model directory needs tokenizer.json/tokenizer_config.json") from exc


class FastTokenizer:
    """A `tokenizers.Tokenizer` (tokenizer.json) with the few methods PromptEncoder calls.

    open_tokenizer picks it wherever tokenizer.json exists, and the serving path always uses it:
    `import transformers` imports torch, and a serving install has neither. Special tokens come
    from tokenizer_config.json / special_tokens_map.json, as transformers reads them.
    """

    def __init__(self, tokenizer, pad_token: str | None = None, unk_token: str | None = None):
        self.backend = tokenizer
        self.pad_token_id = self.convert_tokens_to_ids(pad_token) if pad_token else None
        self.unk_token_id = self.convert_tokens_to_ids(unk_token) if unk_token else None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        try:
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        except Exception as exc:  # tokenizers raises bare Exceptions (and TypeError for a non-string)
            raise _encode_failure(exc) from exc

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Many texts in one call (the Rust side runs them in parallel, without the GIL)."""
        try:
            return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]
        except Exception as exc:
            raise _encode_failure(exc) from exc

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self.backend.token_to_id(token)


def _encode_failure(exc: Exception) -> TokenizerError:
    return TokenizerError(f"the tokenizer failed to encode a prompt: {first_line(exc)}",
                          "check that the pairs are text; QCONV_DEBUG=1 shows the traceback")


def _special_token(path: Path, key: str) -> str | None:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = path / name
        if file.is_file():
            value = json.loads(file.read_text(encoding="utf-8")).get(key)
            if isinstance(value, dict):  # {"content": "<|endoftext|>", ...}
                value = value.get("content")
            if value:
                return value
    return None


def load_fast_tokenizer(path: Path | str) -> FastTokenizer:
    """Load PATH/tokenizer.json with the `tokenizers` library alone (no transformers, no torch)."""
    from tokenizers import Tokenizer

    path = Path(path)
    try:
        backend = Tokenizer.from_file(str(path / "tokenizer.json"))
        return FastTokenizer(backend, _special_token(path, "pad_token"), _special_token(path, "unk_token"))
    except Exception as exc:  # tokenizers raises a bare Exception for a bad file; json a ValueError
        raise TokenizerError(f"cannot load {path}/tokenizer.json: {first_line(exc)}", "use the tokenizer.json shipped with the model (a fast tokenizer)") from exc


def open_tokenizer(path: Path | str):
    """The tokenizer qconv scores with: PATH/tokenizer.json through `tokenizers` where the directory
    has one (the file transformers' fast tokenizer runs and TEI and transformers.js read; the ids are
    the same, tests compare them on every fixture), else transformers' AutoTokenizer. Not importing
    transformers (and with it torch) saves ~5 s of a verify whose reference scores are cached."""
    if (Path(path) / "tokenizer.json").is_file():
        return load_fast_tokenizer(path)
    return load_tokenizer(path)


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

    def batch_ids(self, pairs: Sequence[Pair]) -> list[list[int]]:
        """ids() of many pairs, in one batch call when the tokenizer has one (FastTokenizer)."""
        bodies = [format_body(p.query, p.document, self.instruction) for p in pairs]
        encode_batch = getattr(self.tokenizer, "encode_batch", None)
        rows = encode_batch(bodies) if encode_batch else [self.tokenizer.encode(b, add_special_tokens=False) for b in bodies]
        return [self.prefix_ids + row[: self.body_budget] + self.suffix_ids for row in rows]

    def truncated(self, pair: Pair) -> bool:
        return len(self.body_ids(pair)) > self.body_budget

    def encode(self, pairs: Sequence[Pair], padding_side: PaddingSide = "left") -> EncodedBatch:
        return pad_rows([self.ids(p) for p in pairs], self.tokens.pad_id, padding_side)


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, padding_side: PaddingSide = "left", width: int = 0) -> EncodedBatch:
    """Token rows -> one padded batch as wide as its longest row, or `width` if wider (the server pads
    rows it tokenized earlier, per batch; verify's padding probe pads past every row)."""
    width = max(width, *(len(r) for r in rows))
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        if padding_side == "left":
            input_ids[i, width - len(row):] = row
            mask[i, width - len(row):] = 1
        else:
            input_ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
    return EncodedBatch(input_ids, mask)
