"""Safetensors in, fp32 torch tensors out: only what one step of the streamed forward needs.

Every tensor is read with safetensors_io (any stored dtype, sharded or not) and decoded to fp32, so
a bf16 checkpoint gives the same numbers transformers gets after `from_pretrained(dtype=float32)`;
or, for a layer's matrices, held as stored (layer.Widening makes each one fp32 as it runs).
Shapes are checked against the config for every layer before any compute starts: a checkpoint whose
config disagrees with its tensors fails in one line instead of after an hour.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qwen_convert.checkpoint.files import Checkpoint, open_checkpoint
from qwen_convert.checkpoint.heads import EMBED, LM_HEAD, NORM, SCORE
from qwen_convert.checkpoint.rope import transformers_config
from qwen_convert.checkpoint.safetensors_io import STORED_BITS, TensorInfo, read_row_range, read_rows, read_stored, read_tensor
from qwen_convert.errors import WeightsError

PREFIX = "model."


def layer_prefix(index: int) -> str:
    return f"{PREFIX}layers.{index}."


@dataclass(frozen=True)
class StreamedWeights:
    """A checkpoint opened for streaming: headers only until a stage asks for tensors."""

    checkpoint: Checkpoint
    config: object  # transformers Qwen3Config

    @property
    def root(self) -> Path:
        return self.checkpoint.root

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return self.checkpoint.tensors

    def info(self, name: str) -> TensorInfo:
        info = self.tensors.get(name)
        if info is None:
            raise WeightsError(f"{self.root} has no tensor {name}", "the checkpoint is incomplete; re-download or re-convert it")
        return info

    def embedding_rows(self, token_ids: np.ndarray):
        """The embedding rows of `token_ids` (unique, sorted) as one fp32 tensor: never the whole table."""
        import torch

        return torch.from_numpy(read_rows(self.info(EMBED), [int(t) for t in token_ids]))

    def layer(self, index: int, stored: bool = False) -> tuple[dict, dict[str, FileMatrix]]:
        """One decoder layer's tensors (names relative to the layer), fp32, and the matrices left in
        the file (none unless `stored`). With `stored`, its matrices as the checkpoint stores them
        (bf16, fp16, fp32: exactly the fp32 values once widened), or, where the layer's matrices
        take more than HOLD_BYTES, not read at all: meta tensors, and a FileMatrix for each that
        the linear reads from as it runs (layer.Widening)."""
        import torch

        prefix = layer_prefix(index)
        infos = {name[len(prefix):]: info for name, info in self.tensors.items() if name.startswith(prefix)}
        matrices = {n for n, info in infos.items() if stored and len(info.shape) == 2 and info.dtype in STORED_BITS}
        in_file = sum(infos[n].nbytes for n in matrices) > HOLD_BYTES
        sources = {n: FileMatrix(infos[n]) for n in matrices} if in_file else {}
        tensors = {n: torch.empty(info.shape, device="meta") if n in sources else _stored(info) if n in matrices
                   else torch.from_numpy(read_tensor(info)) for n, info in infos.items()}
        return tensors, sources

    def norm(self):
        import torch

        return torch.from_numpy(read_tensor(self.info(NORM)))

    def head_rows(self, rows: Iterable[int]):
        """Rows of the output projection: lm_head, or the embedding when the head is tied (as transformers does)."""
        import torch

        name = EMBED if getattr(self.config, "tie_word_embeddings", False) else LM_HEAD
        return torch.from_numpy(read_rows(self.info(name), list(rows)))

    def score_row(self):
        import torch

        info = self.info(SCORE)
        if len(info.shape) != 2 or info.shape[0] != 1:
            raise WeightsError(f"{self.root}: score.weight has shape {list(info.shape)}, not [1, hidden]",
                               "qconv scores one-logit rerankers; re-run `qconv seqcls`")
        return torch.from_numpy(read_tensor(info))


# A layer whose matrices take more than this as stored is not held: each matrix is read from the file
# a chunk of rows at a time as its linear runs (FileMatrix). The 0.6B's layer (30 MiB in bf16) is held;
# an 8B's (368 MiB), whose bf16 copy was a quarter of the calibrated export's peak, is not.
HOLD_BYTES = 64 << 20


@dataclass(frozen=True)
class FileMatrix:
    """A layer matrix left in the checkpoint: rows read (and decoded to fp32, exactly) on demand.
    Reads go through the page cache with read(2), so nothing of it stays in the process's memory."""

    info: TensorInfo

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.info.shape)

    def rows(self, start: int, stop: int):
        import torch

        return torch.from_numpy(read_row_range(self.info, start, stop))

    def stored(self):
        """The whole matrix as stored (bf16, fp16 or fp32), undecoded."""
        return _stored(self.info)

    def pick(self, index) -> object:
        """The rows at `index` (a 1-D tensor of row numbers, or a slice)."""
        import torch

        if isinstance(index, slice):
            start, stop, step = index.indices(self.shape[0])
            return self.rows(start, stop)[::step] if step != 1 else self.rows(start, stop)
        return torch.from_numpy(read_rows(self.info, [int(i) for i in index]))


def _stored(info: TensorInfo):
    import torch

    tensor = torch.from_numpy(read_stored(info))
    return tensor.view(torch.bfloat16) if info.dtype == "BF16" else tensor


def open_weights(path: Path | str, head: str) -> StreamedWeights:
    """Open PATH, load its config, and check every tensor the forward will read against it.

    `head`: "causal" (lm_head, or the embedding when tied) or "seqcls" (the score row)."""
    from .layer import layer_shapes, prepare_config

    checkpoint = open_checkpoint(path)
    try:
        # RoPE as the checkpoint means it under any transformers (a transformers-5 config under 4.x).
        config = transformers_config(checkpoint.root)
    except (ValueError, KeyError, TypeError) as exc:  # transformers' own config validation
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"{checkpoint.root}/config.json is not a valid Qwen3 config ({first})",
                           "the config disagrees with the tensors; re-download or re-convert the model") from exc
    expected_layer = layer_shapes(prepare_config(config))
    weights = StreamedWeights(checkpoint, config)
    tensors = weights.tensors
    hidden, vocab = config.hidden_size, config.vocab_size
    expected: dict[str, tuple[int, ...]] = {EMBED: (vocab, hidden), NORM: (hidden,)}
    for i in range(config.num_hidden_layers):
        expected.update({layer_prefix(i) + name: shape for name, shape in expected_layer.items()})
    if head == "causal" and not getattr(config, "tie_word_embeddings", False):
        expected[LM_HEAD] = (vocab, hidden)
    if head == "seqcls":
        expected[SCORE] = (1, hidden)
    for name, shape in expected.items():
        info = tensors.get(name)
        if info is None:
            raise WeightsError(f"{checkpoint.root}: config.json implies tensor {name}, which the weights lack",
                               "the config disagrees with the tensors; re-download or re-convert the model")
        if tuple(info.shape) != tuple(shape):
            raise WeightsError(f"{checkpoint.root}: {name} has shape {list(info.shape)}, config.json implies {list(shape)}",
                               "the config disagrees with the tensors; re-download or re-convert the model")
    extra = sorted(n for n in tensors if n.startswith(f"{PREFIX}layers.") and n not in expected)
    if extra:
        raise WeightsError(f"{checkpoint.root}: {len(extra)} layer tensors the config does not describe (first: {extra[0]})",
                           "the config disagrees with the tensors (num_hidden_layers?); re-download or re-convert the model")
    return weights
