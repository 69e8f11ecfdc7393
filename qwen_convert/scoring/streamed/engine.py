"""The streamed forward: embed -> every prompt through layer 1, free it, layer 2, ... -> norm -> head.

One place loads and frees a layer's weights (`_layers`); the math of a layer is layer.run_layer.
The hidden states of every batch stay in memory between layers (the probe set's activations; with
`spill`, in a temporary file), the weights never do: peak memory is about one layer in fp32 (or, with
`stored`, as the checkpoint stores it, or for a layer over weights.HOLD_BYTES nothing of it but one
chunk of rows in fp32), the gathered embedding rows, and those activations, whatever the model size.

Two heads, matching the two transformers classes this stands in for:
  causal : logit(yes) - logit(no) at the last real token, positions counting real tokens only
           (exactly what scoring.CausalScorer asks of Qwen3ForCausalLM);
  seqcls : the score row at the last non-pad token, default positions (what
           Qwen3ForSequenceClassification does when called with input_ids and attention_mask).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qwen_convert.formats import ArtifactKind
from qwen_convert.progress import NULL, Reporter
from qwen_convert.reranker import EncodedBatch

HEADS = ("causal", "seqcls")
# Rows of a batch that go through a layer together: bounds the MLP's [tokens, intermediate]
# activations (three of them live at once) to ~3 x 64 MiB whatever the width. Rows are independent,
# so splitting a batch changes nothing but the peak.
MLP_ACTIVATION_BYTES = 64 << 20


@dataclass
class StreamedScorer:
    """A Scorer (scoring.Scorer) that streams the checkpoint at PATH layer by layer, in fp32."""

    path: Path
    head: str  # causal | seqcls
    yes_id: int = -1  # causal head only
    no_id: int = -1
    name: str = "causal"
    kind: ArtifactKind = ArtifactKind.CAUSAL
    precision: str = "fp32"
    engine: str = "streamed"
    reporter: Reporter = field(default=NULL, repr=False)

    def score(self, batch: EncodedBatch) -> np.ndarray:
        return self.score_batches([batch])[0]

    def score_batches(self, batches: Sequence[EncodedBatch], label: str | None = None) -> list[np.ndarray]:
        """One logit per row of every batch, streaming the weights once for all of them."""
        return stream_forward(self.path, batches, self.head, (self.yes_id, self.no_id), self.reporter,
                              label or f"{self.name} (streamed)")


def _positions(batch: EncodedBatch, head: str):
    import torch

    mask = torch.from_numpy(batch.attention_mask)
    if head == "causal":
        return (mask.cumsum(-1) - 1).clamp(min=0)  # RoPE counts real tokens, so left padding shifts nothing
    return torch.arange(mask.shape[1]).unsqueeze(0)  # transformers' default: cache_position


def _last_token(batch: EncodedBatch, head: str, pad_id: int | None) -> np.ndarray:
    if head == "causal":
        return batch.last_index
    # Qwen3ForSequenceClassification's pooling: the rightmost token that is not the pad id.
    ids = batch.input_ids
    return (np.arange(ids.shape[1])[None, :] * (ids != pad_id)).argmax(-1)


def _row_steps(batch: EncodedBatch, intermediate: int) -> list[slice]:
    rows, width = batch.input_ids.shape
    per_step = max(1, MLP_ACTIVATION_BYTES // (4 * intermediate * width))
    return [slice(i, min(rows, i + per_step)) for i in range(0, rows, per_step)]


def stream_forward(path: Path | str, batches: Sequence[EncodedBatch], head: str, yes_no: tuple[int, int] = (-1, -1),
                   reporter: Reporter = NULL, label: str = "streamed", observer: Callable | None = None,
                   embedding: Callable | None = None, stored: bool = False, spill: bool = False) -> list[np.ndarray]:
    """The streamed fp32 forward of the checkpoint at PATH over `batches`: one logit per row.

    `observer(index, layer)`, when given, is called with each decoder layer once its weights are
    loaded and before any batch runs through it (to hook its modules: calibration records the
    linear layers' inputs); a callable it returns is called once every batch has passed the layer,
    while its weights are still there. `embedding(rows)`, when given, replaces the gathered embedding
    rows (float32 [n, hidden]) before the first layer: calibration measures what a quantized
    embedding alone does to the logits. `stored`: each layer's matrices held as the checkpoint stores
    them (bf16: half the memory) and widened to fp32 one linear at a time as it runs, the same
    numbers (layer.Widening); an observer then meets weights in that dtype, or, for a layer too
    big to hold (weights.HOLD_BYTES), on the meta device with a `source` to read them from. `spill`:
    the batches' hidden states wait between layers in a temporary file, not in memory (hidden.py)."""
    import torch

    from .layer import Widening, build_layer, build_norm, load_layer, prepare_config, run_layer
    from .weights import open_weights

    if head not in HEADS:
        raise ValueError(f"head {head!r} is not one of {HEADS}")
    weights = open_weights(path, head)
    config = prepare_config(weights.config)
    _fix_mmap_threshold()
    pad_id = getattr(config, "pad_token_id", None)
    if not batches:
        return []
    with torch.inference_mode():
        states, inputs, steps = _embed(weights, config, batches, head, embedding, spill)
        task = reporter.task(f"{label}: {config.num_hidden_layers} layers x {len(batches)} batches",
                             total=config.num_hidden_layers * len(batches))
        for index in range(config.num_hidden_layers):
            layer = build_layer(config)
            tensors, sources = weights.layer(index, stored)
            load_layer(layer, tensors, index, config, sources)
            del tensors
            widening = Widening(layer) if stored else None
            done = observer(index, layer) if observer is not None else None
            for b, batch_steps in enumerate(steps):
                h = states.get(b)
                states.put(b, torch.cat([run_layer(layer, h[s], x) for s, x in zip(batch_steps, inputs[b])]))
                del h
                if spill:  # a prompt's sub-threshold temporaries, back before the next one (8B-wide: +70 MiB a layer)
                    _trim_heap()
                task.advance(1)
            if widening is not None:
                widening.close()
            if done is not None:
                done()
            # The last references to this layer's tensors (an observer's `done` closes over the layer):
            # freed before the next layer is read, or two layers are held (8B-wide: +0.8 GB).
            del layer, done, widening
            gc.collect()
            _trim_heap()

        norm = build_norm(config, weights.norm())
        last = []
        for i, b in enumerate(batches):
            h = states.get(i)
            last.append(h[torch.arange(h.shape[0]), torch.from_numpy(_last_token(b, head, pad_id))])
        del h
        states.close()
        if head == "causal":
            w = weights.head_rows(yes_no)  # [2, hidden]: logit(yes), logit(no) and nothing else of the vocabulary
            out = [(norm(x) @ w.T) for x in last]
            return [(o[:, 0] - o[:, 1]).double().numpy() for o in out]
        w = weights.score_row()
        return [(norm(x) @ w.T)[:, 0].double().numpy() for x in last]


def _embed(weights, config, batches: Sequence[EncodedBatch], head: str, embedding: Callable | None, spill: bool):
    """Each batch's embedded prompts (into a hidden-state store) and the per-batch inputs every layer
    shares; the embedding rows are those the prompts use (a few thousand of 151669), never the table."""
    import torch

    from .hidden import hidden_states
    from .layer import batch_inputs, build_rotary

    vocab = np.unique(np.concatenate([b.input_ids.reshape(-1) for b in batches]))
    if vocab[0] < 0 or vocab[-1] >= config.vocab_size:
        from qwen_convert.errors import TokenizerError

        raise TokenizerError(f"token id {int(vocab[-1] if vocab[-1] >= config.vocab_size else vocab[0])} is outside the "
                             f"model's vocabulary ({config.vocab_size})", "use the tokenizer shipped with the model")
    rows = weights.embedding_rows(vocab)
    if embedding is not None:
        rows = torch.as_tensor(embedding(rows.numpy()))
    rotary = build_rotary(config)
    steps = [_row_steps(b, config.intermediate_size) for b in batches]
    states = hidden_states([(*b.input_ids.shape, config.hidden_size) for b in batches], spill)
    inputs = []
    for i, (b, batch_steps) in enumerate(zip(batches, steps)):
        h = rows[torch.from_numpy(np.searchsorted(vocab, b.input_ids))]
        mask, positions = torch.from_numpy(b.attention_mask), _positions(b, head)
        inputs.append([batch_inputs(config, rotary, h[s], mask[s], positions[s] if positions.shape[0] > 1 else positions)
                       for s in batch_steps])
        states.put(i, h)
    return states, inputs, steps


def _trim_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's malloc_trim; a no-op elsewhere). A
    layer's many mid-sized temporaries (activations, the calibration search's candidates) stay in
    glibc's arenas after they are freed, and the next layer's tensors then come on top of them."""
    _glibc("malloc_trim", 0)


def _glibc(function: str, *args) -> None:
    """Call one of glibc's malloc tunables; a no-op where there is no glibc (macOS, musl)."""
    import ctypes

    try:
        getattr(ctypes.CDLL("libc.so.6"), function)(*args)
    except (OSError, AttributeError):
        pass


# Allocations from this size up get their own mmap, returned to the system when freed. glibc's default
# threshold rises to the largest block freed (up to 32 MiB), after which a prompt's activations (a few
# to ~30 MiB each) come from the heap and leave it fragmented across batches: measured on 8b-wide, the
# calibration forward held ~230 MiB more than with a fixed 4 MiB (1 MiB: ~30 MiB less again, ~5% slower).
MMAP_THRESHOLD = 4 << 20
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def _fix_mmap_threshold() -> None:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD (mallopt; a no-op elsewhere). Process-wide, and it
    stays: glibc has no way to go back to the moving threshold, and none is needed (it only decides
    where big blocks come from, never what any computation gives)."""
    _glibc("mallopt", _M_MMAP_THRESHOLD, MMAP_THRESHOLD)
