"""The prefix-shared scoring graph: the reranker of build.py with a key/value cache in and out.

Every pair of a rerank request starts with the same tokens (system prompt, instruction, `<Query>: `
and the query), so their keys and values are the same in every pair. This graph runs only the
tokens after such a shared prefix, attending to the prefix's cache:

    input_ids            [batch, sequence]                         int64: the new tokens
    attention_mask       [batch, past_sequence + sequence]         int64: prefix columns (all 1), then the new ones
    past_key_values.{i}.key/.value [batch, kv_heads, past_sequence, head_dim]   (the activation dtype)
  ->
    logits               [batch, 1]                                float32: the last real new token's score
    present.{i}.key/.value [batch, kv_heads, past_sequence + sequence, head_dim]

The same graph with past_sequence = 0 computes a prefix's cache (its `present.*`; the names and
layout are optimum's / onnxruntime-genai's decoder-with-past, BNSH). One graph, not a prefix graph
plus a suffix graph, because each graph holds all the weights: a second file would double the
export. The price is that a scoring run also writes its `present.*` (a copy of the batch's cache:
~15 MB per row for the 0.6B with an 80-token prefix, a few percent of the run).

RoPE positions and the key padding bias come from the whole mask, so a new row may be padded on
either side (left padding puts the pads between prefix and document: they are masked keys like any
pad), and position p of a row gets the same rotation as in the full prompt. GroupQueryAttention
takes the past as `past_key`/`past_value` (its causal mask offsets the new queries by the past
length); every row is declared full length (`seqlens_k` = total - 1) and padding is the additive
bias, as in build.py.

The single-input graphs (onnx/model*.onnx) are not touched: ORTModel and transformers.js load those.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from qwen_convert.checkpoint.files import Checkpoint
from qwen_convert.formats import EXTERNAL_DATA_THRESHOLD, ONNX_DIR, PREFIX_DIR, QuantMode

from .build import BuildResult, Qwen3RerankerBuilder, build_onnx
from .quantize import QuantizeOptions
from .weights import MS_DOMAIN

PAST_KEY, PAST_VALUE = "past_key_values.{}.key", "past_key_values.{}.value"
PRESENT_KEY, PRESENT_VALUE = "present.{}.key", "present.{}.value"


class Qwen3PrefixBuilder(Qwen3RerankerBuilder):
    """build.py's network with per-layer past key/values: only the inputs, RoPE table, attention and
    last-token pick differ; embedding, norms, MLP and head are the parent's."""

    def build(self) -> None:
        g, s = self.g, self.shape
        ids = g.input("input_ids", np.int64, ["batch", "sequence"])
        mask = g.input("attention_mask", np.int64, ["batch", "total_sequence"])
        self.past = []
        for i in range(s.layers):
            kv = [g.input(name.format(i), self.act, ["batch", s.kv_heads, "past_sequence", s.head_dim])
                  for name in (PAST_KEY, PAST_VALUE)]
            self.past.append(kv)
        self.make_inputs_with_past(ids, mask)
        hidden = self.make_embedding(ids)
        residual = None
        for i in range(s.layers):
            hidden, residual = self.make_layer(i, hidden, residual)
        last = self.make_last_token(hidden, residual)
        self.make_head(last)
        for i in range(s.layers):
            for name in (PRESENT_KEY, PRESENT_VALUE):
                g.output(name.format(i), self.act, ["batch", s.kv_heads, "total_sequence", s.head_dim])

    def make_inputs_with_past(self, ids: str, mask: str) -> None:
        """Positions of the new tokens, the key bias [batch, 1, sequence, total], GQA's lengths."""
        g = self.g
        one = self.const("const_one", 1)
        (cumsum,) = g.node("CumSum", [mask, self.const("const_axis1", 1)], name="positions.cumsum")
        (pos,) = g.node("Sub", [cumsum, one], name="positions.sub")
        (all_pos,) = g.node("Max", [pos, self.const("const_zero", 0)], name="positions.all")
        (ids_shape,) = g.node("Shape", [ids], name="ids.shape")
        (mask_shape,) = g.node("Shape", [mask], name="mask.shape")
        (self.batch,) = g.node("Gather", [ids_shape, self.const("const_dim0", [0])], name="ids.batch", axis=0)
        (self.seq,) = g.node("Gather", [ids_shape, self.const("const_dim1", [1])], name="ids.seq", axis=0)
        (self.total,) = g.node("Gather", [mask_shape, self.const("const_dim1b", [1])], name="mask.total", axis=0)
        (past,) = g.node("Sub", [self.total, self.seq], name="mask.past")
        big = self.const("const_end", [np.iinfo(np.int64).max])
        axis1 = self.const("const_slice_axis1", [1])
        # The new tokens' columns of the positions and of the mask (the last-token pick reads the latter).
        (self.positions,) = g.node("Slice", [all_pos, past, big, axis1], name="positions")
        (self.mask,) = g.node("Slice", [mask, past, big, axis1], name="mask.new")
        self.make_key_bias(mask, self.total, "total")
        self.make_rope_cache(self.total, "total")

    def make_attention(self, prefix: str, x: str) -> str:
        return self.make_attention_with_past(prefix, x)

    def make_attention_with_past(self, prefix: str, x: str) -> str:
        s, p = self.shape, prefix + "self_attn."
        i = int(prefix.split(".")[2])
        q = self.make_rotary(p + "q_rotary", self.make_head_norm(p + "q_norm", self.linear(p + "q_proj", x), s.heads), s.heads)
        k = self.make_rotary(p + "k_rotary", self.make_head_norm(p + "k_norm", self.linear(p + "k_proj", x), s.kv_heads), s.kv_heads)
        v = self.linear(p + "v_proj", x)
        past_key, past_value = self.past[i]
        inputs = [q, k, v, past_key, past_value, self.seqlens_k, self.total_len, "", "", "", self.key_bias]
        attn, _, _ = self.g.node("GroupQueryAttention", inputs, n_outputs=3, domain=MS_DOMAIN, name=p + "attn",
                                 outputs=[p + "attn/out", PRESENT_KEY.format(i), PRESENT_VALUE.format(i)],
                                 num_heads=s.heads, kv_num_heads=s.kv_heads, scale=float(s.head_dim ** -0.5))
        return self.linear(p + "o_proj", attn)


@contextmanager
def _quiet_shape_inference():
    """onnxruntime's symbolic shape inference warns that it "cannot determine if -sequence +
    total_sequence < 0" at the Slice of the new tokens' columns (total - sequence is the past
    length, never negative): a warning on stderr about nothing, once per layer."""
    logger = logging.getLogger("onnxruntime.tools.symbolic_shape_infer")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def build_prefix_onnx(ckpt: Checkpoint, path: Path, mode: QuantMode, options: QuantizeOptions = QuantizeOptions(),
                      threshold: int = EXTERNAL_DATA_THRESHOLD, fold=None, keep: frozenset[str] = frozenset()) -> BuildResult:
    """Write `mode`'s with-past graph of the reranker in `ckpt` to `path` (+ `<name>_data` above
    `threshold`): build_onnx with this module's builder, so a calibrated variant's folded scales and
    kept layers are the same in both graphs."""
    with _quiet_shape_inference():
        return build_onnx(ckpt, path, mode, options, threshold, fold=fold, keep=keep, builder_class=Qwen3PrefixBuilder,
                          graph_name="qwen3_reranker_with_past")


def prefix_supported(config: dict) -> bool:
    """The with-past graph takes its cache through GroupQueryAttention only: a head_dim whose
    attention falls back to plain ops (shapes.py) gets no onnx/prefix/ (qconv score then runs full prompts)."""
    from .shapes import GQA, attention_kind

    heads = int(config.get("num_attention_heads") or 1)
    return attention_kind(int(config.get("head_dim") or int(config.get("hidden_size", 0)) // heads)) == GQA


def prefix_settings(variants) -> dict:
    """quantize_config.json's `prefix`: where each variant's with-past graph is and what it takes."""
    return {
        "files": {v.mode: f"{ONNX_DIR}/{PREFIX_DIR}/{Path(v.path).name}" for v in variants},
        "inputs": "input_ids [batch, sequence]; attention_mask [batch, past_sequence + sequence] (past columns 1); "
                  "past_key_values.{i}.key/.value [batch, kv_heads, past_sequence, head_dim], activation dtype",
        "outputs": "logits [batch, 1] (last real new token); present.{i}.key/.value [batch, kv_heads, past_sequence + sequence, head_dim]",
        "use": "run the shared prefix with past_sequence = 0 for its present.*, then each pair's own tokens (batch 1 "
               "when sequence > 1: onnxruntime's GroupQueryAttention) with those as past; `qconv score` does this itself",
    }

