"""Qwen3 shapes the fused onnxruntime kernels cannot take, and what the builder writes instead.

Every valid Qwen3 config exports; only the op that computes a piece changes:
- GroupQueryAttention's CPU kernel requires head_dim % 8 == 0 (it fails at run time otherwise:
  "head_size must be a multiple of 8"). Other head_dims get attention from plain ops (`make_plain_attention`):
  MatMul, Softmax over the causal + key-padding mask, K/V heads repeated, all in fp32.
- GatherBlockQuantized (the 4-bit embedding) takes power-of-two blocks of at least 16 that divide the
  hidden size. When the requested block does not divide it, the largest power of two in [16, block)
  that does is used; when none does, the embedding is int8 rows with a per-row scale (int8's own).

`shape_settings` is what quantize_config.json records under "shape" and what export logs, one line each.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GQA = "GroupQueryAttention"
PLAIN = "MatMul+Softmax"
GQA_HEAD_DIM_MULTIPLE = 8  # onnxruntime's GroupQueryAttention CPU kernel
MIN_EMBEDDING_BLOCK = 16  # GatherBlockQuantized's smallest block
FLOAT, FLOAT16, BOOL = 1, 10, 9  # onnx TensorProto data types


def attention_kind(head_dim: int) -> str:
    """GQA where its kernel takes the head_dim, plain ops otherwise."""
    return GQA if head_dim % GQA_HEAD_DIM_MULTIPLE == 0 else PLAIN


def q4_embedding_block(hidden: int, block_size: int) -> int | None:
    """The block GatherBlockQuantized uses for a [vocab, hidden] table: the requested one when it
    divides hidden, else the largest power of two >= 16 below it that does; None: no block fits."""
    block = block_size
    while block >= MIN_EMBEDDING_BLOCK:
        if hidden % block == 0:
            return block
        block //= 2
    return None


@dataclass(frozen=True)
class ShapeChoices:
    head_dim: int
    hidden: int
    attention: str  # GQA or PLAIN
    embedding_block: int | None  # q4 embedding block; None: int8 embedding instead
    requested_block: int
    quantize_embedding: bool

    def notes(self, q4: bool = True) -> list[str]:
        """One line per fallback, for the export log (empty for the shapes the fused kernels take);
        q4: a 4-bit variant is written (the embedding's note concerns only those)."""
        notes = []
        if self.attention == PLAIN:
            notes.append(f"head_dim {self.head_dim} is not a multiple of {GQA_HEAD_DIM_MULTIPLE}: attention from "
                         f"MatMul/Softmax ops (fp32) instead of {GQA}")
        if q4 and self.quantize_embedding and self.embedding_block != self.requested_block:
            if self.embedding_block is None:
                notes.append(f"q4 embedding: no power-of-two block >= {MIN_EMBEDDING_BLOCK} divides hidden size "
                             f"{self.hidden}: the q4/q4f16 embedding is int8 rows with a per-row scale")
            else:
                notes.append(f"q4 embedding: block size {self.requested_block} does not divide hidden size {self.hidden}: "
                             f"blocks of {self.embedding_block}")
        return notes

    def to_dict(self) -> dict:
        if not self.quantize_embedding:
            embedding = "kept in the activation dtype (--keep-embedding)"
        elif self.embedding_block is None:
            embedding = "int8 rows with one float32 scale per row (no 4-bit block divides the hidden size)"
        else:
            embedding = f"GatherBlockQuantized, blocks of {self.embedding_block} along hidden"
        return {"head_dim": self.head_dim, "hidden_size": self.hidden,
                "attention": (f"com.microsoft {GQA}" if self.attention == GQA else
                              f"{PLAIN}: plain ops in fp32 (head_dim {self.head_dim} % {GQA_HEAD_DIM_MULTIPLE} != 0)"),
                "q4_embedding": embedding, "notes": self.notes()}


def record_shape(settings: dict, choices: ShapeChoices) -> dict:
    """quantize_config.json with the shape's choices: under "shape", and in the q4 encoders' embedding
    line where a fallback changed it (precision_settings describes the requested block)."""
    settings["shape"] = choices.to_dict()
    if choices.quantize_embedding and choices.embedding_block != choices.requested_block:
        for mode in ("q4", "q4f16"):
            if isinstance(settings.get("encoders", {}).get(mode), dict):
                settings["encoders"][mode]["embedding"] = settings["shape"]["q4_embedding"]
    return settings


def shape_choices(config: dict, block_size: int, quantize_embedding: bool) -> ShapeChoices:
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // int(config["num_attention_heads"]))
    return ShapeChoices(head_dim, hidden, attention_kind(head_dim), q4_embedding_block(hidden, block_size), block_size,
                        quantize_embedding)


class PlainAttention:
    """Attention of one graph from standard ops; the mask is built once and shared by every layer.

    q [batch, seq, heads * d], k and v [batch, seq, kv_heads * d] (q and k already normed and rotated)
    -> [batch, seq, heads * d] in the activation dtype. Scores, softmax and P.V run in fp32 (fp16
    variants cast in and out), with a large finite negative bias where a key is padding or in the
    future: an all-masked pad query row of a left-padded batch softmaxes to finite numbers, never NaN.
    """

    def __init__(self, b, heads: int, kv_heads: int, head_dim: int):
        self.b, self.heads, self.kv_heads, self.d = b, heads, kv_heads, head_dim
        self.bias: str | None = None

    def make_mask(self) -> str:
        b, g = self.b, self.b.g
        (rows,) = g.node("Range", [b.const("plain.start", 0), g.node("Squeeze", [b.seq], name="plain.seq")[0],
                                   b.const("plain.step", 1)], name="plain.rows")
        (row,) = g.node("Unsqueeze", [rows, b.const("plain.axis1", [1])], name="plain.row")  # [s, 1]
        (col,) = g.node("Unsqueeze", [rows, b.const("plain.axis0", [0])], name="plain.col")  # [1, s]
        (future,) = g.node("Greater", [col, row], name="plain.future")
        (causal,) = g.node("Not", [future], name="plain.causal")
        (keep,) = g.node("Cast", [b.mask], name="plain.keep", to=BOOL)
        (keep4,) = g.node("Unsqueeze", [keep, b.const("plain.axes12", [1, 2])], name="plain.keep4")  # [b, 1, 1, s]
        (allowed,) = g.node("And", [keep4, causal], name="plain.allowed")  # [b, 1, s, s]
        low = np.finfo(np.float32).min
        (bias,) = g.node("Where", [allowed, b.const("plain.zero", 0.0, np.float32), b.const("plain.low", low, np.float32)],
                         name="plain.bias")
        return bias

    def heads_first(self, name: str, x: str, heads: int, perm: list[int]) -> str:
        b, g = self.b, self.b.g
        (split,) = g.node("Reshape", [x, b.const(f"{name}.shape", [0, 0, heads, self.d])], name=f"{name}.split")
        (t,) = g.node("Transpose", [split], name=f"{name}.heads", perm=perm)
        if b.fp16:
            (t,) = g.node("Cast", [t], name=f"{name}.fp32", to=FLOAT)
        return t

    def repeat_kv(self, name: str, x: str, shape: list[int]) -> str:
        """[b, kv, m, n] -> [b, heads, m, n]: each KV head serves heads / kv_heads query heads in turn."""
        rep = self.heads // self.kv_heads
        if rep == 1:
            return x
        b, g = self.b, self.b.g
        (x5,) = g.node("Unsqueeze", [x, b.const(f"{name}.axis2", [2])], name=f"{name}.unsqueeze")
        (big,) = g.node("Expand", [x5, b.const(f"{name}.rep", [1, 1, rep, 1, 1])], name=f"{name}.expand")
        return g.node("Reshape", [big, b.const(f"{name}.merged", shape)], name=f"{name}.repeat")[0]

    def __call__(self, prefix: str, q: str, k: str, v: str) -> str:
        b, g = self.b, self.b.g
        if self.bias is None:
            self.bias = self.make_mask()
        q4 = self.heads_first(prefix + "plain_q", q, self.heads, [0, 2, 1, 3])  # [b, H, s, d]
        kt = self.repeat_kv(prefix + "plain_k", self.heads_first(prefix + "plain_k", k, self.kv_heads, [0, 2, 3, 1]),
                            [0, self.heads, self.d, -1])  # [b, H, d, s]
        v4 = self.repeat_kv(prefix + "plain_v", self.heads_first(prefix + "plain_v", v, self.kv_heads, [0, 2, 1, 3]),
                            [0, self.heads, -1, self.d])  # [b, H, s, d]
        (scores,) = g.node("MatMul", [q4, kt], name=prefix + "plain_scores")
        (scaled,) = g.node("Mul", [scores, b.const(prefix + "plain_scale", self.d ** -0.5, np.float32)], name=prefix + "plain_scaled")
        (masked,) = g.node("Add", [scaled, self.bias], name=prefix + "plain_masked")
        (probs,) = g.node("Softmax", [masked], name=prefix + "plain_softmax", axis=-1)
        (ctx,) = g.node("MatMul", [probs, v4], name=prefix + "plain_context")  # [b, H, s, d]
        (t,) = g.node("Transpose", [ctx], name=prefix + "plain_tokens", perm=[0, 2, 1, 3])
        (out,) = g.node("Reshape", [t, b.const(prefix + "plain_merge", [0, 0, self.heads * self.d])], name=prefix + "plain_out")
        if b.fp16:
            (out,) = g.node("Cast", [out], name=prefix + "plain_out16", to=FLOAT16)
        return out
