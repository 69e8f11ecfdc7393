"""The Qwen3 causal LM with KV cache as one ONNX graph, written from the checkpoint tensor by tensor.

    input_ids            [batch, sequence]                          int64
    attention_mask       [batch, past_sequence + sequence]          int64
    position_ids         [batch, sequence]                          int64 (honoured as given)
    past_key_values.{i}.key/.value [batch, kv_heads, past_sequence, head_dim]   activation dtype
  ->
    logits               [batch, sequence, vocab]                   float32
    present.{i}.key/.value [batch, kv_heads, past_sequence + sequence, head_dim]

The names, order and BNSH layout are optimum's "text-generation-with-past" decoder, the graph
ORTModelForCausalLM, transformers.js and onnxruntime-genai load; fp16 and q4f16 keep their cache in
fp16 (transformers.js and optimum read the cache dtype from the session's inputs), logits are fp32
in every variant.

The network is prefix.py's with-past reranker graph (embedding, norms, MLP, GroupQueryAttention
with past, each weight through the variant's Precision): only the inputs and the head differ. RoPE
angles come from `position_ids` (ORT generate and transformers.js pass cumsum(mask) - 1), the RoPE
table covers max(total, max(position_ids) + 1) rows, and the key padding bias comes from the mask,
so left-padded batches decode row by row as transformers does. The head is the final RMSNorm over
every position and lm_head (or, tied, the embedding's rows) in the variant's precision: a second
copy of the [vocab, hidden] table, as optimum's export has.

onnxruntime's GroupQueryAttention (1.2x) takes a non-empty past with more than one new token only
at batch 1; generate() never asks for that (the prompt runs with an empty past, then one token a
step), and `decode.py` follows the same two shapes.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from qwen_convert.checkpoint.files import Checkpoint
from qwen_convert.errors import SourceError
from qwen_convert.formats import EXTERNAL_DATA_THRESHOLD, QuantMode

from .build import FLOAT, BuildResult, Qwen3Shape, _folded_reader
from .prefix import PAST_KEY, PAST_VALUE, PRESENT_KEY, PRESENT_VALUE, Qwen3PrefixBuilder, _quiet_shape_inference
from .quantize import QuantizeOptions
from .shapes import GQA, GQA_HEAD_DIM_MULTIPLE, attention_kind
from .weights import GraphWriter, WeightReader

GRAPH_NAME = "qwen3_causal_lm_with_past"
# optimum's symbolic dim names: transformers.js sizes the empty first-step cache by looking the past
# inputs' dims up by these names (batch_size; an unknown name becomes 0, and GQA refuses a batch of 0).
BATCH, SEQ, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "past_sequence_length + sequence_length"


def check_causal_shape(config: dict, root: Path) -> Qwen3Shape:
    """What the causal graph refuses, from config.json alone (before OUT exists)."""
    shape = Qwen3Shape.from_config(config, root)
    if attention_kind(shape.head_dim) != GQA:
        raise SourceError(f"{root}: head_dim {shape.head_dim} is not a multiple of {GQA_HEAD_DIM_MULTIPLE}, which the "
                          "causal graph's GroupQueryAttention (with KV cache) needs", "use --exporter optimum")
    return shape


class Qwen3CausalLMBuilder(Qwen3PrefixBuilder):
    """prefix.py's network with position_ids as an input and the vocabulary head on every position."""

    head_name = "model.embed_tokens.weight"  # lm_head.weight when untied: set by build_causal_onnx

    def build(self) -> None:
        g, s = self.g, self.shape
        ids = g.input("input_ids", np.int64, [BATCH, SEQ])
        mask = g.input("attention_mask", np.int64, [BATCH, TOTAL])
        positions = g.input("position_ids", np.int64, [BATCH, SEQ])
        self.past = []
        for i in range(s.layers):
            self.past.append([g.input(name.format(i), self.act, [BATCH, s.kv_heads, PAST, s.head_dim])
                              for name in (PAST_KEY, PAST_VALUE)])
        self.make_causal_inputs(ids, mask, positions)
        self.make_lm_head(*self.make_decoder(ids))
        for i in range(s.layers):
            for name in (PRESENT_KEY, PRESENT_VALUE):
                g.output(name.format(i), self.act, [BATCH, s.kv_heads, TOTAL, s.head_dim])

    def make_causal_inputs(self, ids: str, mask: str, positions: str) -> None:
        """Batch/sequence/total sizes, the key bias over every key, GQA's lengths, the RoPE table."""
        g = self.g
        (ids_shape,) = g.node("Shape", [ids], name="ids.shape")
        (mask_shape,) = g.node("Shape", [mask], name="mask.shape")
        (self.batch,) = g.node("Gather", [ids_shape, self.const("const_dim0", [0])], name="ids.batch", axis=0)
        (self.seq,) = g.node("Gather", [ids_shape, self.const("const_dim1", [1])], name="ids.seq", axis=0)
        (self.total,) = g.node("Gather", [mask_shape, self.const("const_dim1b", [1])], name="mask.total", axis=0)
        self.positions = positions
        self.make_key_bias(mask, self.total, "total")
        # Rows of the RoPE table: enough for the largest position asked for, whatever the caller counts.
        (top,) = g.node("ReduceMax", [positions], name="positions.max", keepdims=0)
        (top1,) = g.node("Add", [top, self.const("const_one", 1)], name="positions.count")
        (top1d,) = g.node("Reshape", [top1, self.const("const_shape1", [1])], name="positions.count1d")
        (rows,) = g.node("Max", [self.total, top1d], name="rope.table_rows")
        self.make_rope_cache(rows, "rows")

    def make_lm_head(self, hidden: str, residual: str) -> None:
        """Final RMSNorm on every position, lm_head in the variant's precision, logits in fp32."""
        g, s = self.g, self.shape
        y, _ = self.make_norm("model.norm", hidden, residual)
        keep = "lm_head" in self.keep
        p = self.fallback if keep else self.p
        logits = p.linear(g, "lm_head", y, [self.reader.linear(self.head_name, (s.vocab, s.hidden))], self.options)
        if self.fp16:
            g.node("Cast", [logits], name="logits.fp32", outputs=["logits"], to=FLOAT)
        else:
            g.node("Identity", [logits], name="logits.out", outputs=["logits"])
        g.output("logits", np.float32, [BATCH, SEQ, s.vocab])


def build_causal_onnx(ckpt: Checkpoint, path: Path, mode: QuantMode, options: QuantizeOptions = QuantizeOptions(),
                      threshold: int = EXTERNAL_DATA_THRESHOLD, fold=None, keep: frozenset[str] = frozenset()) -> BuildResult:
    """Write `mode`'s causal-LM graph of `ckpt` to `path` (+ `<name>_data` above `threshold`), one
    streaming pass. `fold`/`keep`: a calibrated variant's scales and kept layers, as build.build_onnx."""
    from qwen_convert.checkpoint.heads import head_tensor
    from qwen_convert.checkpoint.validate import check_checkpoint

    from .precision import EMBEDDING_FALLBACK, FALLBACK, PRECISIONS

    started = time.perf_counter()
    shape = check_causal_shape(ckpt.config, ckpt.root)
    check_checkpoint(ckpt)  # config vs every tensor's shape, from the headers, before anything is written
    with _quiet_shape_inference(), GraphWriter(path, threshold=threshold, graph_name=GRAPH_NAME) as g:
        reader = WeightReader(ckpt) if not fold else _folded_reader(ckpt, fold)
        builder = Qwen3CausalLMBuilder(g, reader, shape, PRECISIONS[mode], options, np.zeros(0, np.float32))
        builder.head_name = head_tensor(ckpt)[0].name
        builder.keep, builder.fallback = frozenset(keep), PRECISIONS[FALLBACK.get(mode, mode)]
        builder.embedding_fallback = EMBEDDING_FALLBACK.get(mode, builder.p.embedding)
        builder.build()
        files = g.save()
    return BuildResult(mode, tuple(files), g.weight_bytes, time.perf_counter() - started)
