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

from ..checkpoint import Checkpoint
from ..safetensors_io import iter_row_chunks
from .weights import LINEAR_CHUNK, WeightReader


@dataclass(frozen=True)
class Group:
    """Linear layers of one decoder layer that share an input, and where their scale folds."""

    name: str
    hook: str  # the module whose input is the group's input (relative to the layer)
    linears: tuple[str, ...]
    producer: str  # tensor the inverse scale folds into
    producer_axis: str  # "vector" (an RMSNorm weight) or "rows" (up_proj's output rows)


GROUPS = (
    Group("attn_in", "self_attn.q_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
          "input_layernorm.weight", "vector"),
    Group("mlp_in", "mlp.gate_proj", ("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm.weight", "vector"),
    Group("mlp_out", "mlp.down_proj", ("mlp.down_proj",), "mlp.up_proj.weight", "rows"),
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
    pad = -k % block_size
    b = torch.nn.functional.pad(w, (0, pad)).reshape(n, -1, block_size)
    hi, lo = b.amax(dim=2, keepdim=True), b.amin(dim=2, keepdim=True)
    scale = torch.where(hi.abs() > lo.abs(), hi, lo) / -8.0
    q = torch.where(scale == 0, torch.zeros_like(b), torch.round(b / torch.where(scale == 0, torch.ones_like(scale), scale)))
    return (q.clamp(-8, 7) * scale).reshape(n, -1)[:, :k]


def _int8_blocks(x, block_size: int):
    """MatMulNBits' accuracy_level 4: the input quantized to int8 per row and block of the K axis."""
    import torch

    n, k = x.shape
    pad = -k % block_size
    b = torch.nn.functional.pad(x, (0, pad)).reshape(n, -1, block_size)
    scale = (b.abs().amax(dim=2, keepdim=True) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    return (torch.round(b / scale).clamp(-127, 127) * scale).reshape(n, -1)[:, :k]


@dataclass(frozen=True)
class Simulation:
    """How one method's variant quantizes a product: the weight rule, the input rule."""

    weight: object  # (w [out, in]) -> dequantized w
    activation: object  # (x [tokens, in]) -> dequantized x


def simulation(method: str, block_size: int = 32, per_channel: bool = False, accuracy_level: int = 4) -> Simulation:
    if method == "smoothquant":
        return Simulation(lambda w: _int8_weight(w, per_channel), _uint8_activation)
    if method == "awq":
        act = (lambda x: _int8_blocks(x, block_size)) if accuracy_level == 4 else (lambda x: x)
        return Simulation(lambda w: _q4_weight(w, block_size), act)
    raise ValueError(f"no simulation for {method!r}")


# --- the search -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class SearchSettings:
    """The grid each method searches (recorded in quantize_config.json)."""

    grid: int = 20  # alphas 0, 1/grid, ..., 1 (AutoAWQ's n_grid)
    max_tokens: int = 512  # calibration tokens per group the search scores (a fixed-stride sample)

    def alphas(self) -> list[float]:
        return [i / self.grid for i in range(self.grid + 1)]


@dataclass(frozen=True)
class GroupScale:
    """The searched scale of one group: s [in], the alpha that gave it, and the output errors
    (mean squared, relative to the outputs' mean square) without and with it."""

    scale: np.ndarray
    alpha: float | None  # None: the identity (no alpha beat unscaled)
    error_naive: float
    error: float


def candidate(method: str, alpha: float, x_absmax, x_meanabs, w_absmax):
    """s for one alpha: SmoothQuant's max|X|^a / max|W|^(1-a), or AWQ's mean|X|^a normalized by
    sqrt(max(s) * min(s)) (AutoAWQ's normalization: keeps the weights' overall scale)."""
    import torch

    if method == "smoothquant":
        s = x_absmax.clamp(min=1e-5) ** alpha / w_absmax.clamp(min=1e-5) ** (1 - alpha)
    else:
        s = x_meanabs.clamp(min=1e-5) ** alpha
        s = s / torch.sqrt(s.max() * s.min())
    return round_scale(s.clamp(*SCALE_RANGE))


def round_scale(s):
    """Scales rounded to float16's precision: the choice no longer depends on the last bits of a
    threaded reduction, so a re-export writes the same bytes."""
    import torch

    return s.to(torch.float16).to(torch.float32) if s.abs().max() < 65504 else s


def search_group(method: str, x, weights: Sequence, stats: dict, sim: Simulation, settings: SearchSettings) -> GroupScale:
    """The alpha (and its s) that minimises sum over the group's linears of |Q(X/s) Q(W s).T - X W.T|^2
    on the sample x [tokens, in]; weights: the group's [out, in] fp32 tensors."""
    import torch

    w_absmax = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0)
    refs = [x @ w.T for w in weights]
    power = sum(float((r * r).mean()) for r in refs) or 1.0

    def error(s) -> float:
        xq = sim.activation(x / s)
        return sum(float(((xq @ sim.weight(w * s).T - r) ** 2).mean()) for w, r in zip(weights, refs)) / power

    ones = torch.ones_like(w_absmax)
    best_alpha, best_s, naive = None, ones, error(ones)
    best = naive
    for alpha in settings.alphas():
        s = candidate(method, alpha, stats["absmax"], stats["meanabs"], w_absmax)
        e = error(s)
        if e < best:
            best_alpha, best_s, best = alpha, s, e
    return GroupScale(best_s.numpy().astype(np.float32), best_alpha, naive, best)


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
