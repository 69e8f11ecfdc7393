"""The prefix-shared scoring graph: the reranker of build.py with a key/value cache in and out.

Every pair of a rerank request starts with the same tokens (system prompt, instruction, `<Query>: `
and the query), so their keys and values are the same in every pair. This graph runs only the
tokens after such a shared prefix, attending to the prefix's cache:

    input_ids            [batch, sequence]                         int64: the new tokens
    attention_mask       [batch, past_sequence + sequence]         int64: prefix columns (all 1), then the new ones
    past_key_values.{i}.key/.value [past_batch, kv_heads, past_sequence, head_dim]   (the activation dtype)
  ->
    logits               [batch, 1]                                float32: the last real new token's score
    new_key_values.{i}.key/.value [batch, kv_heads, sequence, head_dim]   the new tokens' keys and values

The same graph with past_sequence = 0 computes a prefix's cache (past + new along the sequence axis
is the longer prefix's cache; the layout is optimum's / onnxruntime-genai's BNSH). One graph, not a
prefix graph plus a suffix graph, because each graph holds all the weights: a second file would
double the export.

past_batch is 1 when many documents share one prefix: the attention (Qwen3SharedPrefixBuilder,
standard ops) expands it to the batch, which onnxruntime's GroupQueryAttention cannot (1.32: a past
only for batch 1 when more than one new token comes). So a query's documents run as padded batches
on one cache (BENCHMARKS.md, bench_prefix, has batches vs one document at a time).

The last decoder layer runs only each row's last real token past its keys and values (the logit reads
that token; a prefix's cache needs every token's keys and values, nothing else of that layer).

RoPE positions and the key padding bias come from the whole mask, so a new row may be padded on
either side (left padding puts the pads between prefix and document: they are masked keys like any
pad), and position p of a row gets the same rotation as in the full prompt. The causal mask offsets
the new queries by the past length.

Qwen3PrefixBuilder, the GroupQueryAttention form with full `present.*` outputs (a decoder's
with-past layout, batch = past batch), stays for subclasses that want that layout.

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
NEW_KEY, NEW_VALUE = "new_key_values.{}.key", "new_key_values.{}.value"


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
        self.make_head(self.make_last_token(*self.make_decoder(ids)))
        for i in range(s.layers):
            for name in (PRESENT_KEY, PRESENT_VALUE):
                g.output(name.format(i), self.act, ["batch", s.kv_heads, "total_sequence", s.head_dim])

    def make_inputs_with_past(self, ids: str, mask: str) -> None:
        """Positions of the new tokens, the key bias [batch, 1, sequence, total], GQA's lengths."""
        self.make_new_columns(ids, mask)
        self.make_key_bias(mask, self.total, "total")
        self.make_rope_cache(self.total, "total")

    def make_new_columns(self, ids: str, mask: str) -> None:
        """batch, seq, total and past (1-D), and the new tokens' columns of the positions and of the
        mask (the last-token pick reads the latter)."""
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
        (self.past_len,) = g.node("Sub", [self.total, self.seq], name="mask.past")
        self.end = self.const("const_end", [np.iinfo(np.int64).max])
        axis1 = self.const("const_slice_axis1", [1])
        (self.positions,) = g.node("Slice", [all_pos, self.past_len, self.end, axis1], name="positions")
        (self.mask,) = g.node("Slice", [mask, self.past_len, self.end, axis1], name="mask.new")

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


class Qwen3SharedPrefixBuilder(Qwen3PrefixBuilder):
    """The with-past graph qconv scores with: one prefix's cache (past batch 1) serves a whole batch
    of documents. GroupQueryAttention (onnxruntime 1.32) takes a past only for batch 1 when more than
    one new token comes, so this graph's attention is standard ops: the past (batch 1, or one per
    row) expanded to the batch ahead of the new keys, grouped-query products without repeating K/V.
    Its cache outputs are the new tokens' keys and values only (new_key_values.*): past + new is the
    longer prefix's cache, which the caller concatenates for a batch of 1, so a scoring run writes no
    copy of the past as an output."""

    def build(self) -> None:
        g, s = self.g, self.shape
        g.symbolic_value_info = False  # see weights.GraphWriter
        ids = g.input("input_ids", np.int64, ["batch", "sequence"])
        mask = g.input("attention_mask", np.int64, ["batch", "total_sequence"])
        self.past = [[g.input(name.format(i), self.act, ["past_batch", s.kv_heads, "past_sequence", s.head_dim])
                      for name in (PAST_KEY, PAST_VALUE)] for i in range(s.layers)]
        self.make_new_columns(ids, mask)
        self.make_rope_cache(self.total, "total")
        self.make_split_bias(mask)
        self.make_head(self.make_last_token(*self.make_decoder(ids)))
        for i in range(s.layers):
            for name in (NEW_KEY, NEW_VALUE):
                g.output(name.format(i), self.act, ["batch", s.kv_heads, "sequence", s.head_dim])

    def make_split_bias(self, mask: str) -> None:
        """fp32 [batch, 1, groups * sequence, total]: 0 where a new token may attend a key (the key is
        real and not after it: column t <= past + row i), a large finite negative elsewhere. Every new
        row sees the whole past, so no row is all masked (no NaN) on either padding side. Also
        last_bias [batch, 1, groups, total], the last layer's one query row per sequence (make_last_layer)."""
        g, s = self.g, self.shape
        self.one_1d = self.const("const_one_1d", [1])  # the last-token pick's (make_key_bias makes it in the parent)
        zero, one = self.const("split.zero", 0), self.const("split.one", 1)
        (rows,) = g.node("Range", [zero, g.node("Squeeze", [self.seq], name="split.seq")[0], one], name="split.rows")
        (last,) = g.node("Add", [rows, g.node("Squeeze", [self.past_len], name="split.past")[0]], name="split.last_key")
        (cols,) = g.node("Range", [zero, g.node("Squeeze", [self.total], name="split.total")[0], one], name="split.cols")
        (row,) = g.node("Unsqueeze", [last, self.const("split.axis1", [1])], name="split.row")  # [s, 1]
        (causal,) = g.node("LessOrEqual", [cols, row], name="split.causal")  # [s, total]
        (keep,) = g.node("Cast", [mask], name="split.keep", to=9)
        (keep5,) = g.node("Unsqueeze", [keep, self.const("split.axes123", [1, 2, 3])], name="split.keep5")  # [b, 1, 1, 1, t]
        (allowed,) = g.node("And", [keep5, causal], name="split.allowed")  # [b, 1, 1, s, t]
        low = np.finfo(np.float32).min
        zero_f, low_f = self.const("split.bias_zero", 0.0, np.float32), self.const("split.low", low, np.float32)
        (bias,) = g.node("Where", [allowed, zero_f, low_f], name="split.bias5")
        groups = s.heads // s.kv_heads
        expand_groups = self.const("split.groups", [1, 1, groups, 1, 1])
        (full,) = g.node("Expand", [bias, expand_groups], name="split.bias_groups")
        # The last real token of a row sees every real key (any key after it is a pad): its bias is the mask's.
        (last_row,) = g.node("Where", [keep5, zero_f, low_f], name="split.last_bias5")  # [b, 1, 1, 1, t]
        (last_groups,) = g.node("Expand", [last_row, expand_groups], name="split.last_bias_groups")
        (self.last_bias,) = g.node("Squeeze", [last_groups, self.const("split.axis3", [3])], name="split.last_bias")  # [b, 1, groups, t]
        (shape,) = g.node("Concat", [self.batch, self.one_1d, self.const("split.rows_dim", [-1]), self.total], name="split.shape", axis=0)
        (self.split_bias,) = g.node("Reshape", [full, shape], name="split.bias")
        (self.past_shape,) = g.node("Concat", [self.batch, self.const("split.past_rest", [1, 1, 1])], name="split.past_shape", axis=0)

    def make_attention(self, prefix: str, x: str) -> str:
        s, p = self.shape, prefix + "self_attn."
        q = self.make_rotary(p + "q_rotary", self.make_head_norm(p + "q_norm", self.linear(p + "q_proj", x), s.heads), s.heads)
        k, v = self.make_keys_values(p, x)
        return self.linear(p + "o_proj", self.make_split_attention(p, int(prefix.split(".")[2]), q, k, v))

    def make_keys_values(self, p: str, x: str) -> tuple[str, str]:
        s = self.shape
        k = self.make_rotary(p + "k_rotary", self.make_head_norm(p + "k_norm", self.linear(p + "k_proj", x), s.kv_heads), s.kv_heads)
        return k, self.linear(p + "v_proj", x)

    def make_decoder(self, ids: str) -> tuple[str, str]:
        """The parent's layers, but the last one runs only each row's last real token past its keys and
        values: the logit reads that token alone, and the cache (new_key_values) needs every token's
        keys and values, not their queries, attention or MLP (1/layers of the work saved, ~90% of one layer)."""
        hidden, residual = self.make_embedding(ids), None
        for i in range(self.shape.layers - 1):
            hidden, residual = self.make_layer(i, hidden, residual)
        return self.make_last_layer(self.shape.layers - 1, hidden, residual)

    def make_last_layer(self, i: int, hidden: str, residual: str | None) -> tuple[str, str]:
        """([batch, 1, hidden] MLP output, residual) of the last real token of each row."""
        g, s = self.g, self.shape
        prefix = f"model.layers.{i}."
        p = prefix + "self_attn."
        x, residual = self.make_norm(prefix + "input_layernorm", hidden, residual)
        k, v = self.make_keys_values(p, x)
        last, idx = self.make_last_index()
        (x_last,) = g.node("GatherElements", [x, idx], name="last.normed", axis=1)  # [b, 1, hidden]
        (r_last,) = g.node("GatherElements", [residual, idx], name="last.residual", axis=1)
        (pos_last,) = g.node("GatherElements", [self.positions, last], name="last.position", axis=1)  # [b, 1]
        q = self.make_rotary(p + "q_rotary", self.make_head_norm(p + "q_norm", self.linear(p + "q_proj", x_last), s.heads),
                             s.heads, positions=pos_last)
        attn = self.linear(p + "o_proj", self.make_split_attention(p, i, q, k, v, bias=self.last_bias))
        x, residual = self.make_norm(prefix + "post_attention_layernorm", attn, r_last)
        return self.make_mlp(prefix, x), residual

    def make_last_token(self, hidden: str, residual: str) -> str:
        return self.make_last_row(hidden, residual)  # make_last_layer picked the rows

    def _fp32(self, name: str, x: str) -> str:
        return self.g.node("Cast", [x], name=name, to=1)[0] if self.fp16 else x

    def make_split_attention(self, p: str, i: int, q: str, k: str, v: str, bias: str | None = None) -> str:
        """q [b, s, heads * d], k and v [b, s, kv * d] -> [b, s, heads * d]; writes new_key_values.i.*.
        `bias`: another query rows' key bias (the last layer's one row per sequence), else split_bias.
        Query heads are grouped under their KV head ([b, kv, groups * s, d]), so each product is one
        MatMul per (row, KV head) with no K/V repetition; scores, softmax and P.V run in fp32. The
        past is expanded to the batch and put before the new keys (a few MB a layer): measured 8%
        faster than scoring the past and the new keys apart and concatenating the scores. Also
        measured and not kept (bench_peers' realistic requests, 0.6B int8, interleaved): one
        com.microsoft MultiHeadAttention node (fused per-head scores, bias, softmax, P.V; same bits)
        3% slower; the new rows in two block-causal chunks (the first half skips the keys after it)
        within noise (+1%)."""
        g, s = self.g, self.shape
        kv, groups, d = s.kv_heads, s.heads // s.kv_heads, s.head_dim
        past_key, past_value = self.past[i]
        (q5,) = g.node("Reshape", [q, self.const(p + "split_q.shape", [0, 0, kv, groups, d])], name=p + "split_q.heads")
        (qt,) = g.node("Transpose", [q5], name=p + "split_q.grouped", perm=[0, 2, 3, 1, 4])  # [b, kv, groups, s, d]
        (q4,) = g.node("Reshape", [qt, self.const(p + "split_q.rows", [0, kv, -1, d])], name=p + "split_q.rows")
        (qs,) = g.node("Mul", [self._fp32(p + "split_q.fp32", q4), self.const(p + "split.scale", d ** -0.5, np.float32)],
                       name=p + "split_q.scaled")
        (k4,) = g.node("Reshape", [k, self.const(p + "split_k.shape", [0, 0, kv, d])], name=p + "split_k.heads")
        (kn,) = g.node("Transpose", [k4], name=p + "split_k.new", perm=[0, 2, 1, 3], outputs=[NEW_KEY.format(i)])
        (v4,) = g.node("Reshape", [v, self.const(p + "split_v.shape", [0, 0, kv, d])], name=p + "split_v.heads")
        (vn,) = g.node("Transpose", [v4], name=p + "split_v.new", perm=[0, 2, 1, 3], outputs=[NEW_VALUE.format(i)])
        (pk,) = g.node("Expand", [past_key, self.past_shape], name=p + "split_past_k.rows")
        (pv,) = g.node("Expand", [past_value, self.past_shape], name=p + "split_past_v.rows")
        (keys,) = g.node("Concat", [pk, kn], name=p + "split.keys", axis=2)  # [b, kv, total, d]
        (values,) = g.node("Concat", [pv, vn], name=p + "split.values", axis=2)
        (kt,) = g.node("Transpose", [self._fp32(p + "split.keys_fp32", keys)], name=p + "split.keys_t", perm=[0, 1, 3, 2])
        (scores,) = g.node("MatMul", [qs, kt], name=p + "split.scores")  # [b, kv, groups * s, total]
        (masked,) = g.node("Add", [scores, bias or self.split_bias], name=p + "split.masked")
        (probs,) = g.node("Softmax", [masked], name=p + "split.softmax", axis=-1)
        (ctx,) = g.node("MatMul", [probs, self._fp32(p + "split.values_fp32", values)], name=p + "split.context")
        (c5,) = g.node("Reshape", [ctx, self.const(p + "split_o.shape", [0, kv, groups, -1, d])], name=p + "split_o.grouped")
        (ct,) = g.node("Transpose", [c5], name=p + "split_o.tokens", perm=[0, 3, 1, 2, 4])  # [b, s, kv, groups, d]
        (out,) = g.node("Reshape", [ct, self.const(p + "split_o.merge", [0, 0, s.heads * d])], name=p + "split_o.merge")
        return g.node("Cast", [out], name=p + "split_o.fp16", to=10)[0] if self.fp16 else out


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
        return build_onnx(ckpt, path, mode, options, threshold, fold=fold, keep=keep, builder_class=Qwen3SharedPrefixBuilder,
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
                  "past_key_values.{i}.key/.value [past_batch (1, or batch), kv_heads, past_sequence, head_dim], activation dtype",
        "outputs": "logits [batch, 1] (last real new token); new_key_values.{i}.key/.value [batch, kv_heads, sequence, head_dim] "
                   "(the new tokens' only: past + new along axis 2 is the cache of the longer prefix)",
        "use": "run the shared prefix with past_sequence = 0 for its cache, then a batch of pairs' own tokens (either padding "
               "side) on that one cache (past batch 1); `qconv score` does this itself",
    }

