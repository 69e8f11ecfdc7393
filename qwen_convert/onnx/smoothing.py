"""Per-channel scales that move activation outliers into the weights, and their exact fold.

A linear layer computes X @ W.T; for any positive s per input channel, (X / s) @ (W * s).T is the
same product. Choosing s well makes the pair easier to quantize:

  * int8 (SmoothQuant, Xiao et al. 2023): DynamicQuantizeMatMul quantizes its whole input with one
    uint8 range, so a channel 50x larger than the rest leaves the others a few levels. Migrating
    part of each channel's range into the weights, s_j = max|X_j|^a / max|W_j|^(1-a), evens the
    input at the price of the weights' (per-tensor int8, plenty of headroom).
  * 4-bit (AWQ, Lin et al. 2024): round-to-nearest in blocks of 32 along the input loses the small
    weight columns that meet large activations; scaling those columns up, s_j = mean|X_j|^a
    (normalized), gives them more of the block's levels.

`a` is searched per layer group (the linears that share one input) against the calibration
activations: the one that minimises the group's output error with the variant's quantization
simulated (an identity candidate is always in the grid, so a group is never made worse than naive
on its own data). AutoAWQ and llm-compressor search the same way (AutoAWQ's `_search_best_scale`:
n_grid 20 over x_mean ** ratio); SmoothQuant's paper fixes a = 0.5 for most models, which the
search finds too where it is best.

The fold has no op of its own, so the graph, its ops and its speed are unchanged:
  * q/k/v share input_layernorm's output: one s for the three, input_layernorm.weight / s;
  * gate/up share post_attention_layernorm's output: post_attention_layernorm.weight / s;
  * down_proj's input is silu(gate) * up: up_proj's rows / s.
It is applied as the builder reads each weight (FoldedReader), chunk by chunk: memory stays flat.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from qwen_convert.checkpoint.files import Checkpoint
from qwen_convert.checkpoint.safetensors_io import iter_row_chunks

from .weights import LINEAR_CHUNK, WeightReader


@dataclass(frozen=True)
class Group:
    """Linear layers of one decoder layer that share an input, and where their scale folds."""

    name: str
    hook: str  # the module whose input is the group's input (relative to the layer)
    linears: tuple[str, ...]
    producer: str  # tensor the inverse scale folds into
    producer_axis: str  # "vector" (an RMSNorm weight) or "rows" (up_proj's output rows)
    judged_on: str = "outputs"  # what its error is measured on: "outputs", "mlp" or "attention" (see linear_forward)


# In search order: mlp_out before mlp_in, because mlp_out's fold divides up_proj's rows, and mlp_in's
# search must quantize the up_proj the graph will hold (int8's per-tensor scale follows its largest
# row: measured on the outlier tiny, searching mlp_in on the unfolded up_proj left int8 at 0.72 max |Δlogit|).
GROUPS = (
    Group("attn_in", "self_attn.q_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
          "input_layernorm.weight", "vector", judged_on="attention"),
    Group("mlp_out", "mlp.down_proj", ("mlp.down_proj",), "mlp.up_proj.weight", "rows"),
    Group("mlp_in", "mlp.gate_proj", ("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm.weight", "vector",
          judged_on="mlp"),
)
# o_proj is left out: its input channels come from v_proj's rows, which GQA shares between query
# heads, so one scale per o_proj column cannot always fold (AutoAWQ skips it for GQA models too).

SCALE_RANGE = (1e-4, 1e4)  # clamp: a dead channel (max |x| = 0) must not give s = 0 or inf


# --- quantizers as the graph runs them, in torch (simulation only) ---------------------------------

def _int8_weight(w, per_channel: bool):
    """quantize_dynamic's QInt8 rule (precision.int8_scale / int8_encode), dequantized."""
    import torch

    if per_channel:  # 7-bit with one scale per output row (reduce_range, precision.py says why)
        scale = (w.abs().amax(dim=1, keepdim=True) * 2 / 128).clamp(min=torch.finfo(torch.float32).tiny)
        return torch.round(w / scale).clamp(-64, 64) * scale
    scale = (w.abs().max() * 2 / 254).clamp(min=torch.finfo(torch.float32).tiny)
    return torch.round(w / scale).clamp(-128, 127) * scale


def _uint8_activation(x):
    """DynamicQuantizeMatMul's run-time input quantization: uint8, one asymmetric range per tensor
    that includes 0."""
    import torch

    lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
    scale = ((hi - lo) / 255).clamp(min=torch.finfo(torch.float32).tiny)
    zero = torch.round(-lo / scale).clamp(0, 255)
    return (torch.round(x / scale + zero).clamp(0, 255) - zero) * scale


def _q4_weight(w, block_size: int):
    """MatMulNBits' symmetric RTN blocks along the input (precision.quantize_q4_matmul's rule:
    scale = the block's signed extreme / -8, q in [-8, 7]), dequantized."""
    import torch

    n, k = w.shape
    q, scale = _q4_blocks(torch.nn.functional.pad(w, (0, -k % block_size)).reshape(n, -1, block_size))
    return (q * scale).reshape(n, -1)[:, :k]


def _q4_codes(w, block_size: int):
    """_q4_weight's rounding kept as its codes: (q int8 [n, k], scale [n, k / block_size, 1]), with
    q.float() * scale (per block) its values; None where k is not a whole number of blocks. Only the
    sign of a zero code is lost (int8 has no -0): a signed zero changes no sum with a nonzero term."""
    import torch

    n, k = w.shape
    if k % block_size:
        return None
    q, scale = _q4_blocks(w.reshape(n, -1, block_size))
    return q.to(torch.int8).reshape(n, k), scale


def _q4_blocks(b):
    """b [n, blocks, block_size] -> (q in [-8, 7] as floats, scale [n, blocks, 1]): the 4-bit rule."""
    import torch

    hi, lo = b.amax(dim=2, keepdim=True), b.amin(dim=2, keepdim=True)
    scale = torch.where(hi.abs() > lo.abs(), hi, lo) / -8.0
    q = torch.where(scale == 0, torch.zeros_like(b), torch.round(b / torch.where(scale == 0, torch.ones_like(scale), scale)))
    return q.clamp(-8, 7), scale


def _int8_blocks(x, block_size: int, s=None):
    """MatMulNBits' accuracy_level 4: the input (divided by `s`, a smoothing scale, where given)
    quantized to int8 per row and block of the K axis, CHUNK_BYTES of rows at a time (each of the
    rule's temporaries is a copy of what it sees: the search's 512-token sample of an 8B-wide
    down_proj input is 24 MiB; so is x / s, never whole here)."""
    import torch

    step = chunk_rows(x.shape[1])
    if x.shape[0] <= step:
        return _int8_block_rows(x if s is None else x / s, block_size)
    out = torch.empty_like(x)
    for a in range(0, x.shape[0], step):
        out[a:a + step] = _int8_block_rows(x[a:a + step] if s is None else x[a:a + step] / s, block_size)
    return out


def _int8_block_rows(x, block_size: int):
    import torch

    n, k = x.shape
    pad = -k % block_size
    b = torch.nn.functional.pad(x, (0, pad)).reshape(n, -1, block_size)
    scale = (b.abs().amax(dim=2, keepdim=True) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    return (torch.round(b / scale).clamp(-127, 127) * scale).reshape(n, -1)[:, :k]


def q4_rows_roundtrip(rows: np.ndarray, block_size: int, symmetric: bool) -> np.ndarray:
    """Embedding rows through GatherBlockQuantized's 4-bit encoding and back (precision.quantize_q4_rows'
    rule), for measuring what the 4-bit table alone does."""
    x = np.asarray(rows, dtype=np.float32)
    n, h = x.shape
    b = x.reshape(n, h // block_size, block_size)
    with np.errstate(divide="ignore", invalid="ignore"):
        if symmetric:
            hi, lo = b.max(axis=2, keepdims=True), b.min(axis=2, keepdims=True)
            scale = np.where(np.abs(hi) > np.abs(lo), hi, lo) / np.float32(-8.0)
            q = np.where(scale == 0, 0, b / scale).round().clip(-8, 7)
            return (q * scale).reshape(n, h).astype(np.float32)
        lo, hi = np.minimum(b.min(axis=2, keepdims=True), 0), np.maximum(b.max(axis=2, keepdims=True), 0)
        scale = (hi - lo) / np.float32(15.0)
        zp = np.where(scale == 0, 8, -lo / scale).round().clip(0, 15)
        q = np.where(scale == 0, 8, b / scale + zp).round().clip(0, 15)
        return ((q - zp) * scale).reshape(n, h).astype(np.float32)


@dataclass(frozen=True)
class Simulation:
    """How one method's variant quantizes a product: the weight rule, the input rule."""

    weight: object  # (w [out, in]) -> dequantized w
    activation: object  # (x [tokens, in]) -> dequantized x
    # Whether each output row is quantized on its own (4-bit blocks, per-channel int8), so a weight may
    # go through `weight` a slice of rows at a time; per-tensor int8 needs the whole tensor's range.
    row_wise: bool = True
    # (w [out, in]) -> (int8 codes [out, in], per-block scale [out, blocks, 1]) or None: `weight`'s
    # rounding kept as 4-bit codes in [-8, 7] (q4); codes.float() * scale, block by block, is `weight(w)`.
    codes: object = None
    # (x [tokens, in], s [in]) -> activation(x / s), where the rule is row-wise without x / s whole.
    scaled: object = None

    def scaled_activation(self, x, s):
        return self.scaled(x, s) if self.scaled is not None else self.activation(x / s)


def simulation(method: str, block_size: int = 32, per_channel: bool = False, accuracy_level: int = 4) -> Simulation:
    if method == "smoothquant":
        return Simulation(lambda w: _int8_weight(w, per_channel), _uint8_activation, row_wise=per_channel)
    if method == "awq":
        act = (lambda x: _int8_blocks(x, block_size)) if accuracy_level == 4 else (lambda x: x)
        scaled = (lambda x, s: _int8_blocks(x, block_size, s)) if accuracy_level == 4 else None
        return Simulation(lambda w: _q4_weight(w, block_size), act, codes=lambda w: _q4_codes(w, block_size), scaled=scaled)
    raise ValueError(f"no simulation for {method!r}")


# fp32 bytes of a weight's rows (or an input's tokens) a simulated quantizer rounds at a time where the
# rule allows (Simulation.row_wise): the rounding's temporaries (padding, quotient, rounding, clamp ...)
# are each a copy of what they see. Whole-tensor rounding of an 8B-wide weight held ~0.4-1.2 GB beside
# the layer; 1,024 rows of down_proj (12,288 wide), ~0.3 GB.
CHUNK_BYTES = 4 << 20


def chunk_rows(width: int, nbytes: int | None = None) -> int:
    """How many fp32 rows of `width` columns fit in `nbytes` (CHUNK_BYTES as it is now; at least one)."""
    return max(1, (nbytes or CHUNK_BYTES) // (4 * width))


def rounded(sim: Simulation, w, s, r=None, out=None):
    """sim.weight(w r s) / r (w [out, in], s [in], r [out] or None), CHUNK_BYTES of rows at a time
    where the rule is row-wise; into `out` (may be w itself), else a new tensor."""
    import torch

    out = torch.empty(w.shape) if out is None else out  # fp32 whatever w's dtype (a bf16 weight as stored)
    step = chunk_rows(w.shape[1]) if sim.row_wise else w.shape[0]
    for a in range(0, w.shape[0], step):
        rows = 1.0 if r is None else r[a:a + step, None]
        out[a:a + step] = sim.weight(w[a:a + step] * rows * s[None, :]) / rows
    return out


@dataclass(frozen=True)
class RoundedRows:
    """rounded(sim, w, s), made a chunk of rows at a time as a linear asks for them (layer.Widening's
    `widen_rows`), for a row-wise rule: an attention search's candidate without its whole fp32 copy
    (8B-wide q/k/v: 96 MiB). Rows are rounded alone under such a rule, so the values are rounded()'s."""

    sim: Simulation
    w: object
    s: object

    def __call__(self, a: int, b: int, out):
        return rounded(self.sim, self.w[a:b], self.s, out=out)

    def whole(self):
        return rounded(self.sim, self.w, self.s)


# --- the search -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class SearchSettings:
    """The grid each method searches (recorded in quantize_config.json)."""

    # alphas 0, 1/grid, ..., 1 (AutoAWQ's n_grid). Measured on the outlier tiny, q4 calibrated on its
    # calibration.jsonl: grid 20 and 512 tokens gave max |ΔP| 0.088; grid 10 or 256 tokens, 0.136.
    grid: int = 20
    max_tokens: int = 512  # calibration tokens per group the search scores (a fixed-stride sample)
    # Output rows per linear the search scores (evenly spaced; gate/up: intermediate channels, and
    # down_proj's matching columns). A scale is per input channel and blocks run along the input, so
    # a row sample sees every block's rounding; it bounds the cost of wide layers (8B: 12,288 rows).
    max_rows: int = 1024

    def alphas(self) -> list[float]:
        return [i / self.grid for i in range(self.grid + 1)]


@dataclass(frozen=True)
class GroupScale:
    """The searched scale of one group: s [in], the family and alpha that gave it, and the output
    errors (relative mean squared, see search_group) without and with it."""

    scale: np.ndarray
    family: str | None  # None: the identity (no candidate beat unscaled by MIN_GAIN)
    alpha: float | None
    error_naive: float
    error: float


def _smoothquant(alpha, x_absmax, x_meanabs, w_absmax):
    return x_absmax.clamp(min=1e-5) ** alpha / w_absmax.clamp(min=1e-5) ** (1 - alpha)


def _awq(alpha, x_absmax, x_meanabs, w_absmax):
    """AWQ's mean|X|^a, normalized by sqrt(max(s) * min(s)) (AutoAWQ's: keeps the weights' overall scale)."""
    import torch

    s = x_meanabs.clamp(min=1e-5) ** alpha
    return s / torch.sqrt(s.max() * s.min())


def _outlier_channels(alpha, x_absmax, x_meanabs, w_absmax):
    """Only the channels whose max |X| is above the median, by (max|X_j| / median)^a: leaves the
    ordinary channels' weights as they are, which AWQ's family cannot (it rescales every channel)."""
    import torch

    return torch.clamp(x_absmax / x_absmax.median().clamp(min=1e-12), min=1.0) ** alpha


# method -> candidate families, each s(alpha, max|X|, mean|X|, max|W|) per input channel.
FAMILIES = {
    "smoothquant": {"smoothquant": _smoothquant},
    "awq": {"awq": _awq, "outlier_channels": _outlier_channels},
}
# A scale is folded only if it divides the group's simulated error by this much. 4-bit's per-layer
# error predicted the end-to-end error poorly on the trained tiny: scales that shaved 5-20% off the
# clean model's layer errors made its max |Δlogit| worse (0.60 -> 0.72-0.78), while the outlier
# model's gains are 5-50x. int8's small gains did carry through (clean 0.161 -> 0.107).
MIN_GAIN = {"smoothquant": 1.0, "awq": 2.0}


def candidate(method: str, family: str, alpha: float, x_absmax, x_meanabs, w_absmax):
    """s for one family and alpha, clamped and rounded."""
    return round_scale(FAMILIES[method][family](alpha, x_absmax, x_meanabs, w_absmax).clamp(*SCALE_RANGE))


def round_scale(s):
    """Scales rounded to float16's precision: the choice no longer depends on the last bits of a
    threaded reduction, so a re-export writes the same bytes."""
    import torch

    return s.to(torch.float16).to(torch.float32) if s.abs().max() < 65504 else s


def search_group(method: str, forward, weights: Sequence, stats: dict, sim: Simulation, settings: SearchSettings) -> GroupScale:
    """The family and alpha (and its s) that minimise the group's output error on the calibration
    sample with Q(X/s) and Q(W s) in place of X and W; weights: the group's [out, in] fp32 tensors.

    `forward(transform, weights)` gives the outputs the error is measured on, for the sample's
    inputs passed through `transform` (linear_forward, attention_forward). The error is summed over
    those outputs, each relative to its own mean square."""
    import torch

    w_absmax = stats.get("w_absmax")  # of the whole weights, where `weights` are a sample of their rows
    if w_absmax is None:
        w_absmax = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0)
    refs = forward(lambda x: x, weights)
    powers = [float((r * r).mean()) or 1.0 for r in refs]

    lazy = getattr(forward, "rows_on_demand", False) and sim.row_wise  # candidates made by the row chunk

    def error(s) -> float:
        got = forward(lambda x: sim.scaled_activation(x, s), [RoundedRows(sim, w, s) if lazy else rounded(sim, w, s) for w in weights])
        return sum(float(((g - r) ** 2).mean()) / p for g, r, p in zip(got, refs, powers))

    ones = torch.ones_like(w_absmax)
    naive = error(ones)
    best = (naive / MIN_GAIN[method], None, None, ones)

    def consider(family, alpha):
        nonlocal best
        s = candidate(method, family, alpha, stats["absmax"], stats["meanabs"], w_absmax)
        e = error(s)
        if e < best[0]:
            best = (e, family, alpha, s)

    # Coarse to fine: every other alpha of the grid, then the two beside the best (the error is
    # smooth in alpha: measured on the trained tiny, the same choices as the whole grid at ~60% of it).
    coarse = settings.alphas()[::2]
    for family in FAMILIES[method]:
        for alpha in coarse:
            consider(family, alpha)
    if best[1] is not None:
        step = 1 / settings.grid
        for alpha in (best[2] - step, best[2] + step):
            if 0 <= alpha <= 1:
                consider(best[1], round(alpha, 6))
    e, family, alpha, s = best
    return GroupScale(s.numpy().astype(np.float32), family, alpha, naive, e if family else naive)


# What a group's error is measured on. Judged on their own outputs, the searches went wrong twice on
# the outlier tiny: up_proj's x50 rows (which down_proj divides away) dominated gate/up's error, and
# q/k/v's per-linear error said a scale was as good as the exact inverse of the construction while
# q4's max |Δlogit| stayed at 1.02 instead of 0.60 (errors in q and k pass the per-head norms and
# the softmax). So, as AutoAWQ judges a group on the module after it: gate/up on the MLP's output,
# q/k/v on the attention's output for a few whole calibration prompts.

def linear_forward(x, tail=None):
    """Outputs x @ W.T of each weight (then `tail` of them) for the token sample x [tokens, in]. A
    RoundedRows weight gives its output columns a row chunk at a time (_product): the MLP search's
    candidates are never whole fp32 copies (8B-wide down_proj's 1,024-row sample: 48 MiB)."""
    def forward(transform, weights):
        xt = transform(x)
        ys = [_product(xt, w) for w in weights]
        return tail(ys) if tail is not None else ys
    forward.rows_on_demand = True
    return forward


def _product(x, w):
    """x @ w.T; for a RoundedRows w, CHUNK_BYTES of its rounded rows at a time into one buffer."""
    import torch

    if not isinstance(w, RoundedRows):
        return x @ w.T
    n, k = w.w.shape
    out, step = torch.empty(x.shape[0], n), chunk_rows(k)
    buf = torch.empty(min(step, n), k)
    for a in range(0, n, step):
        b = min(a + step, n)
        out[:, a:b] = x @ w(a, b, buf[:b - a]).T
    return out


def mlp_tail(down):
    """gate, up outputs -> the MLP's output through silu and `down` (fp32 [hidden, intermediate])."""
    import torch

    return lambda ys: [(torch.nn.functional.silu(ys[0]) * ys[1]) @ down.T]


def attention_forward(attn, captures: Sequence, names: Sequence[str]):
    """The attention module's outputs on whole captured prompts ((hidden [1, seq, in], its call's
    kwargs) each), with the group's weights (`names` relative to the module) replaced. A RoundedRows
    weight is handed to its linear as `widen_rows` where layer.Widening runs it (the calibration
    pass), so only a chunk of its rows is ever fp32; elsewhere it is made whole."""
    from torch.func import functional_call

    def forward(transform, weights):
        linears = [attn.get_submodule(n) for n in names]
        fills = {m: w for m, w in zip(linears, weights) if isinstance(w, RoundedRows) and getattr(m, "widening", None)}
        params = {f"{n}.weight": w.whole() if isinstance(w, RoundedRows) else w
                  for n, m, w in zip(names, linears, weights) if m not in fills}
        outs = []
        try:
            for m, fill in fills.items():
                m.widen_rows = fill
            for hidden, kwargs in captures:
                x = transform(hidden.reshape(-1, hidden.shape[-1])).reshape(hidden.shape)
                outs.append(functional_call(attn, params, (), {**kwargs, "hidden_states": x})[0])
        finally:
            for m in fills:
                del m.widen_rows
        return outs
    forward.rows_on_demand = True
    return forward


# --- the fold -------------------------------------------------------------------------------------

@dataclass
class FoldPlan:
    """Per tensor, the factors its rows and columns are multiplied by as it is read (1-D tensors:
    `rows` is elementwise). Built from the searched group scales; empty = the checkpoint as is."""

    rows: dict[str, np.ndarray] = field(default_factory=dict)
    columns: dict[str, np.ndarray] = field(default_factory=dict)

    def _mul(self, table: dict, name: str, factor: np.ndarray) -> None:
        table[name] = table[name] * factor if name in table else factor.astype(np.float32)

    def add(self, layer: int, group: Group, scale: np.ndarray) -> None:
        prefix = f"model.layers.{layer}."
        for linear in group.linears:
            self._mul(self.columns, f"{prefix}{linear}.weight", scale)
        self._mul(self.rows, prefix + group.producer, (1.0 / scale.astype(np.float64)).astype(np.float32))

    def __bool__(self) -> bool:
        return bool(self.rows or self.columns)

    def apply(self, name: str, rows: np.ndarray, start: int = 0) -> np.ndarray:
        """Tensor `name`'s rows start..start+len(rows) (or its whole 1-D value) with the fold applied."""
        r, c = self.rows.get(name), self.columns.get(name)
        if r is None and c is None:
            return rows
        out = np.asarray(rows, dtype=np.float32)
        if out.ndim == 1:
            return out * r if r is not None else out
        if r is not None:
            out = out * r[start:start + len(out), None]
        if c is not None:
            out = out * c[None, :]
        return out.astype(np.float32)


class FoldedReader(WeightReader):
    """A WeightReader whose tensors come out with a FoldPlan applied: the transform on read that
    puts calibrated scales into the graph without a second copy of any weight."""

    def __init__(self, ckpt: Checkpoint, plan: FoldPlan):
        super().__init__(ckpt)
        self.plan = plan

    def read(self, name, shape=None):
        return self.plan.apply(name, super().read(name, shape))

    def rows(self, name, start, stop):
        return self.plan.apply(name, super().rows(name, start, stop), start)

    def chunks(self, name, shape=None, max_bytes: int = LINEAR_CHUNK):
        info = self.info(name, shape)
        return lambda: (self.plan.apply(name, rows, start) for start, rows in iter_row_chunks(info, max_bytes))
