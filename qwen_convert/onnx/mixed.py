"""Mixed precision: which parts of a 4-bit variant stay at 8 bits, decided on the calibration set.

Two simulated forwards of the calibration set through the streamed engine (one decoder layer in
memory at a time), each against the calibration pass's own fp32 logits:
  * the 4-bit embedding alone (everything else fp32);
  * the whole 4-bit variant as the graph will compute it: every linear layer's weight through
    MatMulNBits' rounding after the calibrated fold (Q(W s)), its input through the fold and the
    op's int8 blocks (accuracy_level 4), the embedding's rows 4-bit.

The embedding is a lookup: 8-bit rows cost disk, not speed (Gather + Mul instead of
GatherBlockQuantized). So it stays 8-bit when its 4-bit rows alone move P(yes) by more than an
absolute budget, or when they are a large share of what the whole variant moves it by: a few
dozen calibration prompts see a few hundred of the vocabulary's rows, and an unlucky row that the
set never meets moves a real query further (measured on the trained tiny, built-in probes: the
4-bit embedding alone moved the probes' P by 0.012, well inside an absolute budget, and the eval
set's by 0.16; its share of the whole variant's drift on the probes was over half).

Linear layers stay 4-bit (the builder could write any of them at precision.FALLBACK: build_onnx's
`keep`). Tried and not kept: a group whose error after calibration is over 10x the same group's in
the other layers written at fp32. On the trained tiny with one broken down_proj (half its inputs
copies of the other half, +B/-B weights in every 4-bit block that cancel exactly: the search's error
0.37 naive, 0.045 after AWQ, 0.0003 in the other layers), keeping it at fp32 left the eval set's max
|ΔP| where it was (0.052 vs 0.051): the variant's drift came from the other layers. In the random
real-shaped checkpoints measured (0.6B and 8B widths) no group's error after calibration passed 0.048.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .smoothing import FoldPlan, Simulation, chunk_rows, q4_rows_roundtrip, rounded

# Keep 8-bit embedding rows when the 4-bit rows alone move the calibration set's P(yes) by more than
# this (a 0.6B-width random checkpoint: 0.26) ...
EMBEDDING_MAX_DP = 0.05
# ... or by at least this share of the whole 4-bit variant's max |ΔP| on the same set.
EMBEDDING_MAX_SHARE = 0.4
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class EmbeddingChoice:
    """What the two simulated forwards measured, and whether the embedding stays 8-bit."""

    embedding_dp: float  # max |ΔP| of the 4-bit embedding alone on the calibration set
    variant_dp: float  # max |ΔP| of the whole 4-bit variant (calibrated fold) on the same set
    keep_8bit: bool

    @property
    def share(self) -> float:
        return self.embedding_dp / self.variant_dp if self.variant_dp > 0 else 0.0

    def to_dict(self) -> dict:
        return {"embedding_4bit_max_dp_on_calibration": _sig(self.embedding_dp),
                "variant_4bit_max_dp_on_calibration": _sig(self.variant_dp),
                "embedding_share": _sig(self.share), "budget": EMBEDDING_MAX_DP, "max_share": EMBEDDING_MAX_SHARE}


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def choose_embedding(embedding_dp: float, variant_dp: float) -> EmbeddingChoice:
    share = embedding_dp / variant_dp if variant_dp > 0 else 0.0
    return EmbeddingChoice(embedding_dp, variant_dp, embedding_dp > EMBEDDING_MAX_DP or share >= EMBEDDING_MAX_SHARE)


def embedding_4bit(block_size: int, symmetric: bool) -> Callable:
    """stream_forward's `embedding` hook: rows through GatherBlockQuantized's 4-bit encoding and back."""
    return lambda rows: q4_rows_roundtrip(rows, block_size, symmetric)


def quantized_layers(plan: FoldPlan, sim: Simulation, keep: frozenset = frozenset(), compact: bool = False) -> Callable:
    """stream_forward's `observer`: each decoder layer's linears replaced, before any batch runs, by
    what the variant's graph computes with `plan` folded in, in the checkpoint's coordinates:
    Y = Q(X / s) @ (Q(W r s) / r).T, s the fold's input scale, r its row factor (up_proj's rows
    carry mlp_out's 1/s). Linears in `keep` (names without .weight) stay as read. The weights are
    rounded a slice of rows at a time (smoothing.rounded), in place; with `compact` (for
    stream_forward(stored=True), whose layer.Widening calls `widen_rows`) where the rule has codes
    (q4), kept as those codes and widened to the same fp32 values as each linear runs: an 8B-wide
    layer's rounded weights are then 120 MiB of codes and scales, not 736, and those of a layer left
    in the checkpoint wait in a temporary file (_round_to_codes)."""
    import torch

    from qwen_convert.scoring.streamed.layer import linear_weight

    def observe(index: int, layer):
        for name in LINEARS:
            full = f"model.layers.{index}.{name}"
            if full in keep:
                continue
            linear = layer.get_submodule(name)
            s = plan.columns.get(f"{full}.weight")
            r = plan.rows.get(f"{full}.weight")
            s = torch.ones(linear.weight.shape[1]) if s is None else torch.from_numpy(s)
            if not (compact and _round_to_codes(linear, sim, s, None if r is None else torch.from_numpy(r))):
                r = torch.ones(linear.weight.shape[0]) if r is None else torch.from_numpy(r)
                w = linear_weight(linear)  # the weight itself where already fp32
                linear.weight = torch.nn.Parameter(rounded(sim, w, s, r, out=w), requires_grad=False)
            linear.register_forward_pre_hook(lambda _m, args, s=s: (sim.scaled_activation(
                args[0].reshape(-1, args[0].shape[-1]), s).reshape(args[0].shape),))
        return None
    return observe


def _round_to_codes(linear, sim: Simulation, s, r) -> bool:
    """Give `linear` the codes of Q(W r s) and a `widen_rows(start, stop, out)` that writes those
    rows of Q(W r s) / r from them, its weight left on the meta device (no storage); False where the
    rule keeps no codes, or the codes do not pair up (an odd width). The weight's rows are read a
    slice at a time. Codes (4-bit, [-8, 7]) are kept two a byte with their block scales: in memory
    for a held layer, in a temporary file for one left in the checkpoint (weights.HOLD_BYTES: an
    8B-wide layer's codes and scales are 120 MiB, read back by the chunk as the linear runs)."""
    import torch

    from qwen_convert.scoring.streamed.layer import linear_weight

    if sim.codes is None or linear.weight.shape[1] % 2 or sim.codes(linear_weight(linear, slice(0, 1))) is None:
        return False
    n, k = linear.weight.shape
    store = (_FileCodes if linear.weight.is_meta else _HeldCodes)(n, k)
    step = chunk_rows(k)
    for a in range(0, n, step):
        rows = 1.0 if r is None else r[a:a + step, None]  # rounded()'s product, in its order
        q, scale = sim.codes(linear_weight(linear, slice(a, a + step)) * rows * s[None, :])
        store.write(a, _pack4(q), scale)
    store.done()

    def widen_rows(a, b, out):
        codes, scale = store.rows(a, b)
        _unpack4_into(codes, out)
        out.view(b - a, scale.shape[1], -1).mul_(scale)
        return out if r is None else out.div_(r[a:b, None])  # x / 1.0 is x: rounded()'s ones need no pass

    linear.widen_rows = widen_rows
    linear.weight = torch.nn.Parameter(torch.empty((n, k), device="meta"), requires_grad=False)
    return True


class _HeldCodes:
    """A weight's packed codes [n, k / 2] and block scales [n, blocks, 1], in memory."""

    def __init__(self, n: int, k: int):
        import torch

        self.codes, self.scales = torch.empty((n, k // 2), dtype=torch.uint8), []

    def write(self, start: int, codes, scale) -> None:
        self.codes[start:start + codes.shape[0]] = codes
        self.scales.append(scale)

    def done(self) -> None:
        import torch

        self.scale = torch.cat(self.scales)
        self.scales = []

    def rows(self, start: int, stop: int):
        return self.codes[start:stop], self.scale[start:stop]


class _FileCodes:
    """The same in an unlinked temporary file (the page cache holds it, not the process): the codes'
    rows, then the scales' rows, written in row order and read back as raw bytes (the same numbers)."""

    def __init__(self, n: int, k: int):
        import tempfile

        self.width, self.blocks = k // 2, None
        self.file = tempfile.TemporaryFile(prefix="qconv-codes-")
        self.scales = tempfile.TemporaryFile(prefix="qconv-scales-")

    def write(self, start: int, codes, scale) -> None:
        self.blocks = scale.shape[1]
        self.file.seek(start * self.width)
        self.file.write(codes.contiguous().numpy().tobytes())
        self.scales.seek(start * self.blocks * 4)
        self.scales.write(scale.contiguous().float().numpy().tobytes())

    def done(self) -> None:
        pass

    def rows(self, start: int, stop: int):
        import torch

        codes = np.empty((stop - start, self.width), dtype=np.uint8)
        scale = np.empty((stop - start, self.blocks, 1), dtype=np.float32)
        for f, out, offset in ((self.file, codes, start * self.width), (self.scales, scale, start * self.blocks * 4)):
            f.seek(offset)
            f.readinto(memoryview(out.reshape(-1)).cast("B"))
        return torch.from_numpy(codes), torch.from_numpy(scale)


def _pack4(q):
    """int8 codes in [-8, 7], [n, k] (k even) -> uint8 [n, k / 2]: code + 8 in each nibble, even columns low."""
    import torch

    u = (q + 8).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def _unpack4_into(packed, out):
    """_pack4's inverse into fp32 `out` [n, k]: the very codes, as floats (exact)."""
    pairs = out.view(out.shape[0], -1, 2)
    pairs[..., 0].copy_(packed & 15)
    pairs[..., 1].copy_(packed >> 4)
    return out.sub_(8)


def max_dp(logits: np.ndarray, reference: np.ndarray) -> float:
    from qwen_convert.scoring.metrics import sigmoid

    return float(np.abs(sigmoid(logits) - sigmoid(reference)).max()) if len(logits) else 0.0
