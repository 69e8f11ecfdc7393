"""The Qwen3 reranker as one ONNX graph, written from the checkpoint tensor by tensor.

    input_ids, attention_mask [batch, sequence] int64
      -> embedding -> per layer: RMSNorm, attention (q/k/v, per-head q_norm/k_norm, RoPE at
         positions cumsum(mask) - 1, grouped-query attention, causal + key padding), o_proj,
         residual + RMSNorm, SwiGLU MLP
      -> the last real token's hidden state (argmax of mask * position: either padding side)
      -> final RMSNorm and the score head in fp32 -> logits [batch, 1] = logit(yes) - logit(no)

onnxruntime's fused CPU kernels do the heavy parts: SimplifiedLayerNormalization and
SkipSimplifiedLayerNormalization (residual add + norm in one pass, statistics in fp32 for fp16
inputs), RotaryEmbedding, and GroupQueryAttention (no K/V head repetition). GroupQueryAttention's
own padding support is right-padding only, so every row is declared full length and padding is an
additive key bias instead: a large finite negative, not -inf, so the all-pad query rows of a
left-padded batch softmax to finite garbage rather than NaN (NaN would reach real rows through
0 * NaN in the next layer's attention).

Each linear weight and the embedding go through the variant's `Precision` (precision.py), which
decides how the weight is stored and which op consumes it; everything else is the same in every
variant. q/k/v and gate/up stay separate products: fused (one product, then Split; the encoders
support it exactly) they measured slower on this CPU (BENCHMARKS.md, bench_onnx_speed: the Split
alone took 6% of int8's time). No torch, no tracing: peak memory is one row chunk of one weight
plus the encoder's working copy.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qwen_convert.checkpoint.files import Checkpoint
from qwen_convert.checkpoint.heads import SCORE, head_tensor, read_reranker_tokens, score_row
from qwen_convert.errors import ExportError, QconvError, SourceError, WeightsError, first_line
from qwen_convert.formats import EXTERNAL_DATA_THRESHOLD, ONNX_DIR, QuantMode
from qwen_convert.progress import Reporter

from .quantize import QuantizeOptions
from .shapes import GQA, PlainAttention, attention_kind
from .weights import MS_DOMAIN, GraphWriter, WeightReader

INT64, INT32, FLOAT, FLOAT16 = 7, 6, 1, 10  # onnx TensorProto data types
ROPE_TYPES = (None, "default")


@dataclass(frozen=True)
class Qwen3Shape:
    """The numbers of config.json the graph needs."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    eps: float
    rope_theta: float

    @classmethod
    def from_config(cls, config: dict, root: Path) -> Qwen3Shape:
        # transformers 5 saves RoPE settings as `rope_parameters` {rope_type, rope_theta} instead of
        # top-level `rope_theta` + `rope_scaling` (4.x, and the Qwen3 checkpoints on the hubs).
        rope = {**(config.get("rope_scaling") or {}), **(config.get("rope_parameters") or {})}
        try:
            heads = int(config["num_attention_heads"])
            hidden = int(config["hidden_size"])
            shape = cls(
                hidden=hidden, layers=int(config["num_hidden_layers"]), heads=heads,
                kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                intermediate=int(config["intermediate_size"]), vocab=int(config["vocab_size"]),
                eps=float(config.get("rms_norm_eps", 1e-6)), rope_theta=float(config.get("rope_theta", rope.get("rope_theta", 10000.0))),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SourceError(f"{root}/config.json lacks or garbles {exc}", "pass a complete Qwen3 config.json") from exc
        if rope.get("rope_type", rope.get("type")) not in ROPE_TYPES:
            raise SourceError(f"{root}: rope scaling {rope} is not supported by the graph builder",
                              "use --exporter optimum (pip install 'qconv[optimum]')")
        if config.get("attention_bias"):
            raise SourceError(f"{root}: attention_bias=true is not a Qwen3-Reranker layout",
                              "use --exporter optimum (pip install 'qconv[optimum]')")
        if shape.heads % shape.kv_heads or shape.head_dim % 2:
            raise SourceError(f"{root}: {shape.heads} heads over {shape.kv_heads} KV heads of dim {shape.head_dim}",
                              "the config is inconsistent")
        return shape


@dataclass(frozen=True)
class BuildResult:
    mode: QuantMode
    files: tuple[Path, ...]
    weight_bytes: int
    seconds: float


def score_vector(ckpt: Checkpoint, root: Path) -> np.ndarray:
    """float32 [hidden]: score.weight of a seq-cls source, W[yes] - W[no] of a causal one (the rows
    and the tied/untied choice are convert.py's, the one place that knows them)."""
    from qwen_convert.checkpoint.safetensors_io import read_tensor

    if SCORE in ckpt.tensors:
        info = ckpt.tensors[SCORE]
        if len(info.shape) != 2 or info.shape[0] != 1:
            raise WeightsError(f"{root}: {SCORE} has shape {list(info.shape)}, not [1, hidden]", "pass a one-logit seq-cls model")
        return read_tensor(info)[0]
    head, _tied = head_tensor(ckpt)
    tokens = read_reranker_tokens(root)
    if len(head.shape) != 2 or max(tokens.yes_id, tokens.no_id) >= head.shape[0]:
        raise WeightsError(f"{head.name} has shape {list(head.shape)}, too small for token ids yes={tokens.yes_id}, no={tokens.no_id}",
                           "the tokenizer does not belong to these weights")
    return np.frombuffer(score_row(head, tokens, "float32"), dtype="<f4").astype(np.float32)


def inv_freq(shape: Qwen3Shape) -> np.ndarray:
    """RoPE's inverse frequencies [head_dim / 2], computed like transformers' default RoPE (fp32)."""
    d = shape.head_dim
    exponent = np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / np.float32(d)
    return (np.float32(1.0) / np.power(np.float32(shape.rope_theta), exponent)).astype(np.float32)


class Qwen3RerankerBuilder:
    """One variant's graph: make_* methods append the network piece by piece, in forward order."""

    def __init__(self, g: GraphWriter, reader: WeightReader, shape: Qwen3Shape, precision, options: QuantizeOptions,
                 score: np.ndarray):
        self.g, self.reader, self.shape, self.p, self.options = g, reader, shape, precision, options
        self.score = score  # float32 [hidden]
        self.act = np.dtype(precision.activation)
        self.fp16 = self.act == np.float16
        self.plain = None  # PlainAttention, for head_dims GroupQueryAttention cannot take
        self.keep: frozenset[str] = frozenset()  # linear layers (names without .weight) written by `fallback`
        self.fallback = precision
        self.embedding_fallback = precision.embedding

    # --- helpers ----------------------------------------------------------------------------------

    def const(self, name: str, value, dtype=np.int64) -> str:
        return self.g.initializer(name, np.asarray(value, dtype=dtype))

    def weight(self, name: str) -> np.ndarray:
        return self.reader.read(name)

    def norm_weight(self, name: str, dtype=None) -> str:
        return self.g.initializer(name, self.weight(name).astype(dtype or self.act))

    def linear(self, name: str, x: str) -> str:
        p = self.fallback if name in self.keep else self.p  # mixed precision: a layer kept at higher precision
        return p.linear(self.g, name, x, [self.reader.linear(name + ".weight")], self.options)

    # --- the network ------------------------------------------------------------------------------

    def build(self) -> None:
        g = self.g
        ids = g.input("input_ids", np.int64, ["batch", "sequence"])
        mask = g.input("attention_mask", np.int64, ["batch", "sequence"])
        self.make_inputs(mask)
        self.make_head(self.make_last_token(*self.make_decoder(ids)))

    def make_decoder(self, ids: str) -> tuple[str, str | None]:
        """Embedding and every decoder layer: (hidden, residual) of the last layer, before the final norm."""
        hidden = self.make_embedding(ids)
        residual = None
        for i in range(self.shape.layers):
            hidden, residual = self.make_layer(i, hidden, residual)
        return hidden, residual

    def make_inputs(self, mask: str) -> None:
        """What every layer shares: RoPE positions, the key padding bias, GQA's length inputs."""
        g = self.g
        one = self.const("const_one", 1)
        (cumsum,) = g.node("CumSum", [mask, self.const("const_axis1", 1)], name="positions.cumsum")
        (pos,) = g.node("Sub", [cumsum, one], name="positions.sub")
        # Pad tokens before the first real one get -1; clamp into the cos/sin table.
        (self.positions,) = g.node("Max", [pos, self.const("const_zero", 0)], name="positions")
        (shape,) = g.node("Shape", [mask], name="mask.shape")
        (self.batch,) = g.node("Gather", [shape, self.const("const_dim0", [0])], name="mask.batch", axis=0)
        (self.seq,) = g.node("Gather", [shape, self.const("const_dim1", [1])], name="mask.seq", axis=0)
        self.make_key_bias(mask, self.seq, "seq")
        self.mask = mask
        self.make_rope_cache(self.seq, "seq")

    def make_key_bias(self, mask: str, keys: str, label: str) -> None:
        """Key padding bias [batch, 1, seq, keys] (0 where the key is real, a large finite negative at
        pads) and GroupQueryAttention's lengths: every row `keys` long (padding is in the bias), int32.
        `keys`: the key count (seq here; past + seq in prefix.py's with-past graph)."""
        g = self.g
        (keep,) = g.node("Cast", [mask], name="mask.bool", to=9)
        low = np.finfo(self.act).min
        (bias,) = g.node("Where", [keep, self.const("mask.zero", 0, self.act), self.const("mask.low", low, self.act)], name="mask.bias")
        (bias4,) = g.node("Unsqueeze", [bias, self.const("const_axes12", [1, 2])], name="mask.bias4")
        self.one_1d = self.const("const_one_1d", [1])
        (full,) = g.node("Concat", [self.batch, self.one_1d, self.seq, keys], name="mask.bias_shape", axis=0)
        (self.key_bias,) = g.node("Expand", [bias4, full], name="attention_bias")
        (keys32,) = g.node("Cast", [keys], name=f"mask.{label}32", to=INT32)
        (self.total_len,) = g.node("Squeeze", [keys32], name="total_sequence_length")
        (lens,) = g.node("Sub", [keys32, self.const("const_one_i32", [1], np.int32)], name=f"mask.{label}_minus_one")
        (self.seqlens_k,) = g.node("Expand", [lens, self.batch], name="seqlens_k")

    def make_rope_cache(self, length: str, label: str) -> None:
        """cos/sin [length, head_dim / 2] for positions 0..length-1 (length: the sequence here, past +
        sequence in prefix.py's with-past graph), computed in fp32 per run:
        a table of max_position_embeddings rows would be ~20 MB of floats in every variant, and
        positions (cumsum of the mask) never reach the sequence length."""
        g = self.g
        (n,) = g.node("Cast", [length], name=f"rope.{label}", to=FLOAT)
        (steps,) = g.node("Range", [self.const("rope.start", 0.0, np.float32), g.node("Squeeze", [n], name=f"rope.{label}_scalar")[0],
                                    self.const("rope.delta", 1.0, np.float32)], name="rope.positions")
        (col,) = g.node("Unsqueeze", [steps, self.const("const_axes1", [1])], name="rope.column")
        (freqs,) = g.node("Mul", [col, g.initializer("rope.inv_freq", inv_freq(self.shape)[None, :])], name="rope.freqs")
        (cos,) = g.node("Cos", [freqs], name="rope.cos")
        (sin,) = g.node("Sin", [freqs], name="rope.sin")
        if self.fp16:
            (cos,) = g.node("Cast", [cos], name="rope.cos16", to=FLOAT16)
            (sin,) = g.node("Cast", [sin], name="rope.sin16", to=FLOAT16)
        self.cos, self.sin = cos, sin

    def make_embedding(self, ids: str) -> str:
        name = "model.embed_tokens"
        chunks = self.reader.chunks(name + ".weight", (self.shape.vocab, self.shape.hidden))
        encode = self.embedding_fallback if name in self.keep else self.p.embedding
        return encode(self.g, name, ids, chunks, (self.shape.vocab, self.shape.hidden), self.options)

    def make_norm(self, name: str, x: str, residual: str | None) -> tuple[str, str]:
        """RMSNorm of x (+ residual, added first): (normed, the new residual stream)."""
        gamma = self.norm_weight(name + ".weight")
        if residual is None:
            (y,) = self.g.node("SimplifiedLayerNormalization", [x, gamma], name=name, axis=-1, epsilon=self.shape.eps, stash_type=1)
            return y, x
        y, _, _, total = self.g.node("SkipSimplifiedLayerNormalization", [x, residual, gamma], n_outputs=4, domain=MS_DOMAIN,
                                     name=name, outputs=[f"{name}/out", "", "", f"{name}/residual"], epsilon=self.shape.eps)
        return y, total

    def make_head_norm(self, name: str, x: str, heads: int) -> str:
        """Qwen3's per-head RMSNorm over head_dim (q_norm / k_norm)."""
        g, d = self.g, self.shape.head_dim
        (split,) = g.node("Reshape", [x, self.const(f"{name}.shape4", [0, 0, heads, d])], name=f"{name}.split")
        (y,) = g.node("SimplifiedLayerNormalization", [split, self.norm_weight(name + ".weight")], name=name,
                      axis=-1, epsilon=self.shape.eps, stash_type=1)
        (merged,) = g.node("Reshape", [y, self.const(f"{name}.shape3", [0, 0, heads * d])], name=f"{name}.merge")
        return merged

    def make_rotary(self, name: str, x: str, heads: int, positions: str | None = None) -> str:
        return self.g.node("RotaryEmbedding", [x, positions or self.positions, self.cos, self.sin], domain=MS_DOMAIN, name=name,
                           interleaved=0, num_heads=heads, rotary_embedding_dim=self.shape.head_dim)[0]

    def make_attention(self, prefix: str, x: str) -> str:
        s, p = self.shape, prefix + "self_attn."
        q = self.make_rotary(p + "q_rotary", self.make_head_norm(p + "q_norm", self.linear(p + "q_proj", x), s.heads), s.heads)
        k = self.make_rotary(p + "k_rotary", self.make_head_norm(p + "k_norm", self.linear(p + "k_proj", x), s.kv_heads), s.kv_heads)
        v = self.linear(p + "v_proj", x)
        if attention_kind(s.head_dim) != GQA:  # a head_dim GroupQueryAttention's kernel refuses (shapes.py)
            if self.plain is None:
                self.plain = PlainAttention(self, s.heads, s.kv_heads, s.head_dim)
            return self.linear(p + "o_proj", self.plain(p, q, k, v))
        inputs = [q, k, v, "", "", self.seqlens_k, self.total_len, "", "", "", self.key_bias]
        (attn,) = self.g.node("GroupQueryAttention", inputs, domain=MS_DOMAIN, name=p + "attn",
                              num_heads=s.heads, kv_num_heads=s.kv_heads, scale=float(s.head_dim ** -0.5))
        return self.linear(p + "o_proj", attn)

    def make_mlp(self, prefix: str, x: str) -> str:
        g, p = self.g, prefix + "mlp."
        gate = self.linear(p + "gate_proj", x)
        (sig,) = g.node("Sigmoid", [gate], name=p + "act.sigmoid")
        (silu,) = g.node("Mul", [gate, sig], name=p + "act")
        (h,) = g.node("Mul", [silu, self.linear(p + "up_proj", x)], name=p + "gated")
        return self.linear(p + "down_proj", h)

    def make_layer(self, i: int, hidden: str, residual: str | None) -> tuple[str, str]:
        """(output of the MLP, residual stream before it is added): the add is fused into the next norm."""
        prefix = f"model.layers.{i}."
        x, residual = self.make_norm(prefix + "input_layernorm", hidden, residual)
        attn = self.make_attention(prefix, x)
        x, residual = self.make_norm(prefix + "post_attention_layernorm", attn, residual)
        return self.make_mlp(prefix, x), residual

    def make_last_index(self) -> tuple[str, str]:
        """The last real token's column per row: ([batch, 1], and expanded to [batch, 1, hidden] for
        GatherElements on [batch, sequence, hidden])."""
        g = self.g
        # last = argmax(mask * position): the highest position whose mask is 1, either padding side.
        (index,) = g.node("Range", [self.const("const_zero_s", 0), g.node("Squeeze", [self.seq], name="seq.scalar")[0],
                                    self.const("const_one_s", 1)], name="positions.range")
        (weighted,) = g.node("Mul", [self.mask, index], name="last.weighted")
        (last,) = g.node("ArgMax", [weighted], name="last.index", axis=1, keepdims=1)  # [batch, 1]
        (idx3,) = g.node("Unsqueeze", [last, self.const("const_axes2", [2])], name="last.index3")
        (idx,) = g.node("Expand", [idx3, g.node("Concat", [self.batch, self.one_1d,
                                                          self.const("const_hidden", [self.shape.hidden])], name="last.shape", axis=0)[0]],
                        name="last.expand")
        return last, idx

    def make_last_token(self, hidden: str, residual: str) -> str:
        """[batch, hidden] in fp32: the last real token's row of hidden + residual."""
        g = self.g
        _, idx = self.make_last_index()
        # Gather the row before the residual add: two [batch, 1, hidden] rows instead of a full add.
        (a,) = g.node("GatherElements", [hidden, idx], name="last.hidden", axis=1)
        (b,) = g.node("GatherElements", [residual, idx], name="last.residual", axis=1)
        return self.make_last_row(a, b)

    def make_last_row(self, hidden: str, residual: str) -> str:
        """[batch, 1, hidden] rows of hidden and residual -> their sum, [batch, hidden] in fp32."""
        g = self.g
        (row,) = g.node("Add", [hidden, residual], name="last.sum")
        (row2,) = g.node("Squeeze", [row, self.const("const_axis1_1d", [1])], name="last.row")
        if self.fp16:
            (row2,) = g.node("Cast", [row2], name="last.fp32", to=FLOAT)
        return row2

    def make_head(self, x: str) -> None:
        """Final norm and the score head, in fp32 in every variant (its error lands on the logit unscaled)."""
        g = self.g
        gamma = g.initializer("model.norm.weight", self.weight("model.norm.weight").astype(np.float32))
        (y,) = g.node("SimplifiedLayerNormalization", [x, gamma], name="model.norm", axis=-1, epsilon=self.shape.eps, stash_type=1)
        head = g.initializer("score.weight", self.score[:, None].astype(np.float32))
        g.node("MatMul", [y, head], name="score", outputs=["logits"])
        g.output("logits", np.float32, ["batch", 1])


def build_onnx(ckpt: Checkpoint, path: Path, mode: QuantMode, options: QuantizeOptions = QuantizeOptions(),
               threshold: int = EXTERNAL_DATA_THRESHOLD, fold=None, keep: frozenset[str] = frozenset(),
               builder_class: type | None = None, graph_name: str | None = None) -> BuildResult:
    """Write `mode`'s graph of the reranker in `ckpt` to `path` (+ `<name>_data` above `threshold`).

    `fold` (smoothing.FoldPlan): calibrated per-channel scales applied to the weights as they are
    read, so the graph is the same network with different, easier-to-quantize weights. `keep`: linear
    layers (e.g. model.layers.0.self_attn.q_proj) written in FALLBACK[mode]'s precision instead.
    `builder_class`: a Qwen3RerankerBuilder subclass (prefix.py's with-past graph), same weights."""
    from qwen_convert.checkpoint.validate import check_checkpoint

    from .precision import EMBEDDING_FALLBACK, FALLBACK, PRECISIONS

    started = time.perf_counter()
    shape = Qwen3Shape.from_config(ckpt.config, ckpt.root)
    check_checkpoint(ckpt)  # config vs every tensor's shape, from the headers, before anything is written
    with GraphWriter(path, threshold=threshold, **({"graph_name": graph_name} if graph_name else {})) as g:
        reader = WeightReader(ckpt) if not fold else _folded_reader(ckpt, fold)
        builder = (builder_class or Qwen3RerankerBuilder)(g, reader, shape, PRECISIONS[mode], options, score_vector(ckpt, ckpt.root))
        builder.keep, builder.fallback = frozenset(keep), PRECISIONS[FALLBACK.get(mode, mode)]
        builder.embedding_fallback = EMBEDDING_FALLBACK.get(mode, builder.p.embedding)
        builder.build()
        files = g.save()
    return BuildResult(mode, tuple(files), g.weight_bytes, time.perf_counter() - started)


def _folded_reader(ckpt: Checkpoint, fold) -> WeightReader:
    from .smoothing import FoldedReader

    return FoldedReader(ckpt, fold)


def build_logged(reporter: Reporter, mode: QuantMode, build: Callable[[], BuildResult]) -> BuildResult:
    """Run one variant's graph build under a progress task; a failure that is not already qconv's (onnx's
    writer, onnxruntime's 4-bit kernel, numpy) becomes one line naming the variant."""
    task = reporter.task(f"build {mode.value}", total=None)
    try:
        result = build()
    except (QconvError, OSError, MemoryError):
        raise  # OSError: atomic_output_dir tells a full disk from other write failures
    except Exception as exc:
        raise ExportError(f"{ONNX_DIR}/{mode.value}: building {mode.file_name} failed: {first_line(exc)}",
                          "QCONV_DEBUG=1 shows the traceback") from exc
    task.advance()
    reporter.log(f"wrote {ONNX_DIR}/{mode.file_name} ({result.seconds:.1f} s)")
    return result
