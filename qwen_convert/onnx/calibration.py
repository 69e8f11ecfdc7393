"""The calibration set and the pass that measures what the quantizers will meet.

The set is verify's built-in probes, or the user's JSONL pairs (`--calibration FILE`, the format
`--pairs` reads), checked before any work: too big, empty, malformed, a prompt longer than the
model, or a single query (one query's documents share most of their tokens: a set that narrow
calibrates for itself) are each one error naming the file and line. Its sha256 goes into
quantize_config.json, so an export says what it was calibrated on.

The pass is the streamed engine's forward (qwen_convert/stream/engine.py: one decoder layer in
memory at a time, never the whole model), with hooks on each layer's linear inputs. Per group of
linears that share an input (smoothing.GROUPS) it records per-channel max |x| and mean |x| over
every calibration token, keeps a fixed-stride sample of the tokens, and, while that layer's weights
are still loaded, searches each requested method's scale on the sample (smoothing.search_group).
Only the scales and statistics outlive the layer: memory is one layer (as the checkpoint stores it,
bf16, and one matrix widened to fp32 at a time), the set's hidden states and the samples. Prompts
run one per batch, so no padding token enters the statistics.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qwen_convert.errors import InputFileError, QconvError
from qwen_convert.progress import NULL, Reporter

from .smoothing import (
    FAMILIES,
    GROUPS,
    MIN_GAIN,
    FoldPlan,
    GroupScale,
    SearchSettings,
    Simulation,
    attention_forward,
    chunk_rows,
    linear_forward,
    mlp_tail,
    search_group,
)

MAX_FILE_BYTES = 16 << 20  # a calibration set is hundreds of pairs, not a corpus
MAX_PAIRS = 1024
MIN_QUERIES = 2
HINT = 'pass a JSONL file of {"query": ..., "document": ...} pairs from at least two queries (or leave out --calibration)'


@dataclass(frozen=True)
class CalibrationSet:
    pairs: tuple  # reranker.Pair-like (query, document)
    source: str  # "builtin" or the file's path
    sha256: str  # of the file's bytes, or of the built-in pairs as canonical JSONL
    lines: tuple[int, ...]  # each pair's line in the file (0 for the built-in set)

    def to_dict(self) -> dict:
        return {"source": self.source, "sha256": self.sha256, "pairs": len(self.pairs),
                "queries": len({p.query for p in self.pairs})}


def _canonical_sha(pairs) -> str:
    text = "".join(json.dumps({"query": p.query, "document": p.document}, ensure_ascii=False, sort_keys=True) + "\n"
                   for p in pairs)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _pair_lines(path: Path) -> list[int]:
    """Line numbers of the non-blank lines, the pairs load_pairs returns in the same order."""
    with path.open("rb") as fh:
        return [n for n, raw in enumerate(fh, start=1) if raw.strip()]


def load_calibration_set(path: Path | str | None) -> CalibrationSet:
    """The built-in probes (None) or the pairs of PATH, checked for size and variety."""
    from qwen_convert.scoring.probes import PROBE_PAIRS, load_pairs

    if path is None:
        pairs = tuple(PROBE_PAIRS)
        return CalibrationSet(pairs, "builtin", _canonical_sha(pairs), tuple(0 for _ in pairs))
    path = Path(path)
    if path.is_file() and path.stat().st_size > MAX_FILE_BYTES:
        raise InputFileError(f"calibration file {path}, line 1: {path.stat().st_size / 2**20:.1f} MiB is more than the "
                             f"{MAX_FILE_BYTES >> 20} MiB a calibration set may be", f"keep a few hundred pairs; {HINT}")
    lines = _pair_lines(path) if path.is_file() else []
    if path.is_file() and not lines:
        raise InputFileError(f"calibration file {path}, line 1: the file is empty", HINT)
    pairs = load_pairs(path)  # missing, malformed: one error naming the file (and line)
    if len(pairs) > MAX_PAIRS:
        raise InputFileError(f"calibration file {path}, line {lines[MAX_PAIRS]}: more than {MAX_PAIRS} pairs",
                             f"calibration needs a few hundred; {HINT}")
    if len({p.query for p in pairs}) < MIN_QUERIES:
        raise InputFileError(f"calibration file {path}, line {lines[-1]}: all {len(pairs)} pairs share one query "
                             f"({pairs[0].query[:40]!r})", HINT)
    return CalibrationSet(tuple(pairs), str(path), hashlib.sha256(path.read_bytes()).hexdigest(), tuple(lines))


def check_lengths(cset: CalibrationSet, encoder, max_positions: int) -> list[list[int]]:
    """Token ids of every calibration prompt; a prompt longer than the model can attend is an error
    naming its line (calibrating on positions the model never saw measures nothing real)."""
    rows = encoder.batch_ids(cset.pairs)
    for row, line, pair in zip(rows, cset.lines, cset.pairs):
        if len(encoder.body_ids(pair)) > encoder.body_budget or len(row) > max_positions:
            where = f"calibration file {cset.source}, line {line}" if line else "built-in calibration pair"
            raise InputFileError(f"{where}: the prompt is longer than the model's {max_positions} positions",
                                 f"shorten the document; {HINT}")
    return rows


@dataclass
class _Channels:
    """Running per-channel statistics of one group's input, and its token sample."""

    absmax: object = None
    sumabs: object = None
    seen: int = 0  # tokens so far
    sample: list = field(default_factory=list)

    def add(self, x, stride: int) -> None:
        import torch

        a = x.abs()
        m, s = a.amax(dim=0), a.sum(dim=0, dtype=torch.float64)
        self.absmax = m if self.absmax is None else torch.maximum(self.absmax, m)
        self.sumabs = s if self.sumabs is None else self.sumabs + s
        first = -self.seen % stride  # global token index seen + i is a multiple of the stride
        self.sample.append(x[first::stride].clone())
        self.seen += len(x)

    def stats(self) -> dict:
        return {"absmax": self.absmax, "meanabs": (self.sumabs / max(self.seen, 1)).float()}


@dataclass(frozen=True)
class Calibration:
    """What the pass found: per method, per (layer, group), the searched scale."""

    set: CalibrationSet
    tokens: int
    settings: SearchSettings
    scales: dict[str, dict[tuple[int, str], GroupScale]]
    outlier_ratio: dict[str, float]  # group -> max over layers of max_j|X_j| / median_j|X_j|
    logits: np.ndarray  # the set's fp32 logits from the pass (a free reference)
    absmax: dict[tuple[int, str], np.ndarray] = field(default_factory=dict)  # (layer, group) -> max_t |X_tj|

    def activations(self, method: str) -> tuple[dict[str, np.ndarray], dict]:
        """Each group's input max |x| per channel as `method`'s folded graph sees it (X / s), keyed
        model.layers.N.GROUP, with where a smoothing scale of that input folds (kernels.Fold)."""
        from qwen_convert.scoring.kernels import Fold

        absmax, folds = {}, {}
        by_name = {g.name: g for g in GROUPS}
        for (layer, group), value in sorted(self.absmax.items()):
            found = self.scales.get(method, {}).get((layer, group))
            scale = found.scale if found is not None and found.family is not None else 1.0
            prefix, g = f"model.layers.{layer}.", by_name[group]
            absmax[prefix + group] = (value / scale).astype(np.float32)
            producer = prefix + (g.producer if g.producer_axis == "vector" else g.producer.removesuffix(".weight"))
            folds[prefix + group] = Fold(tuple(prefix + n for n in g.linears), producer, g.producer_axis)
        return absmax, folds

    def plan(self, method: str) -> FoldPlan:
        """The fold of `method`'s scales (the groups no scale helped stay as they are)."""
        plan = FoldPlan()
        by_name = {g.name: g for g in GROUPS}
        for (layer, group), found in sorted(self.scales.get(method, {}).items()):
            if found.family is not None:
                plan.add(layer, by_name[group], found.scale)
        return plan

    def summary(self, method: str) -> dict:
        """quantize_config.json's record of one method: settings, chosen alphas, errors."""
        found = self.scales[method]
        groups = {}
        for g in GROUPS:
            rows = [found[k] for k in sorted(found) if k[1] == g.name]
            groups[g.name] = {
                "alpha_per_layer": [r.alpha for r in rows],
                "family_per_layer": [r.family for r in rows],
                "relative_error_naive_max": _sig(max(r.error_naive for r in rows)),
                "relative_error_max": _sig(max(r.error for r in rows)),
                "input_outlier_ratio_max": _sig(self.outlier_ratio[g.name]),
            }
        return {"method": method, "families": list(FAMILIES[method]), "min_gain": MIN_GAIN[method],
                "alpha_grid": self.settings.alphas(), "sample_tokens_per_group": self.settings.max_tokens,
                "sample_rows_per_linear": self.settings.max_rows, "alpha_search": "every other alpha, then the two beside the best",
                "objective": ("mean |Y(Q(X/s), Q(W s)) - Y(X, W)|^2 relative to mean |Y(X, W)|^2, Y: q/k/v through the "
                              "attention on whole calibration prompts, gate/up through the MLP, down_proj its own output"),
                "judged_on": {g.name: g.judged_on for g in GROUPS}, "groups": groups}


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def calibrate(path: Path | str, cset: CalibrationSet, methods: dict[str, Simulation], settings: SearchSettings = SearchSettings(),
              reporter: Reporter = NULL) -> Calibration:
    """Run the calibration set through the checkpoint at PATH layer by layer, recording each group's
    input statistics and searching each method's scales (methods: name -> its Simulation)."""
    run = _prepare(path, cset)
    stride = max(1, math.ceil(run.tokens / settings.max_tokens))
    prompt_stride = max(1, round(run.tokens / settings.max_tokens))  # about max_tokens in whole prompts
    scales: dict[str, dict] = {m: {} for m in methods}
    ratio = {g.name: 0.0 for g in GROUPS}
    absmax: dict[tuple[int, str], np.ndarray] = {}

    def observe(index: int, layer):
        channels = {g.name: _Channels() for g in GROUPS}
        handles = [layer.get_submodule(g.hook).register_forward_pre_hook(
            lambda _m, args, c=channels[g.name]: c.add(args[0].reshape(-1, args[0].shape[-1]).float(), stride))
            for g in GROUPS]
        prompts: list = []  # whole prompts (every prompt_stride-th) at the attention's input, with its call's kwargs
        calls = itertools.count()

        def grab(_module, _args, kwargs):
            if next(calls) % prompt_stride == 0:
                prompts.append((kwargs["hidden_states"].clone(), {k: v for k, v in kwargs.items() if k != "hidden_states"}))

        handles.append(layer.self_attn.register_forward_pre_hook(grab, with_kwargs=True))

        def done():
            for h in handles:
                h.remove()
            for g in GROUPS:
                stats = channels[g.name].stats()
                ratio[g.name] = max(ratio[g.name], float(stats["absmax"].max() / stats["absmax"].median().clamp(min=1e-12)))
                absmax[(index, g.name)] = stats["absmax"].float().cpu().numpy()
            searches = {method: _LayerSearch(layer, channels, prompts, sim, settings) for method, sim in methods.items()}
            for phase in (ATTENTION_GROUPS, OTHER_GROUPS):
                for method, search in searches.items():
                    for g in phase:
                        scales[method][(index, g.name)] = search.run(method, g)
                if phase is ATTENTION_GROUPS:
                    _release_attention(layer, channels, prompts)
        return done

    # The layer's matrices as stored (bf16: 368 MiB of an 8B-wide layer, not 736), widened as each runs;
    # the search reads them by the row chunk or sample (_LayerSearch.weight).
    logits = run.forward(reporter, "calibration", observer=observe, stored=True)
    return Calibration(cset, run.tokens, settings, scales, ratio, logits, absmax)


# The groups judged through the attention come first in GROUPS, so every method's attention groups are
# searched before any MLP group: the attention's weights (q, k, v, o: 160 MiB of an 8B-wide layer in
# fp32) and the captured prompts are then freed, and the MLP search, the pass's peak, runs without them.
ATTENTION_GROUPS = tuple(g for g in GROUPS if g.judged_on == "attention")
OTHER_GROUPS = tuple(g for g in GROUPS if g.judged_on != "attention")
assert GROUPS == ATTENTION_GROUPS + OTHER_GROUPS, "the attention groups must be searched first"


class _LayerSearch:
    """One method's search of one decoder layer's groups, run in GROUPS order, each on the weights as
    the graph will hold them once the earlier groups' folds are applied (mlp_out's fold divides
    up_proj's rows). The MLP groups see a row sample only, sliced before any factor is applied: an
    8B-wide MLP weight is 200 MB in fp32, and whole scaled copies of gate, up and down held ~0.6 GB
    beside the layer."""

    def __init__(self, layer, channels: dict, prompts: list, sim: Simulation, settings: SearchSettings):
        self.layer, self.channels, self.prompts, self.sim, self.settings = layer, channels, prompts, sim, settings
        self.rows: dict = {}  # linear -> row factor [out, 1] an earlier group's fold put on it
        self.columns: dict = {}  # linear -> column factor [1, in]

    def weight(self, name, picked=None, picked_columns=None):
        from qwen_convert.scoring.streamed.layer import linear_weight

        w, r, c = linear_weight(self.layer.get_submodule(name), picked, picked_columns), self.rows.get(name), self.columns.get(name)
        if picked is not None and r is not None:
            r = r[picked]
        if picked_columns is not None and c is not None:
            c = c[:, picked_columns]
        return w * (r if r is not None else 1.0) * (c if c is not None else 1.0) if r is not None or c is not None else w

    def column_absmax(self, name):  # max |w| per input channel, a view of COLUMN_CHUNK_BYTES of rows at a time
        import torch

        n, k = self.layer.get_submodule(name).weight.shape
        step = chunk_rows(k, COLUMN_CHUNK_BYTES)
        return torch.stack([self.weight(name, slice(a, a + step)).abs().amax(dim=0) for a in range(0, n, step)]).amax(dim=0)

    def run(self, method: str, g) -> GroupScale:
        """Group g's scale (groups in GROUPS order, one call each)."""
        import torch

        from qwen_convert.scoring.streamed.layer import stored_weight

        layer, channels, weight = self.layer, self.channels, self.weight
        stats = {**channels[g.name].stats(), "w_absmax": torch.stack([self.column_absmax(n) for n in g.linears]).amax(dim=0)}
        if g.judged_on == "attention":
            forward = attention_forward(layer.self_attn, self.prompts, [n.removeprefix("self_attn.") for n in g.linears])
            # As stored (8B-wide q/k/v in bf16: 50 MiB, not 100); rounded() and the module widen them.
            assert not any(n in self.rows or n in self.columns for n in g.linears), "attention groups come first"
            sample = [stored_weight(layer.get_submodule(n)) for n in g.linears]
        else:
            x = torch.cat(channels[g.name].sample)
            channels[g.name].sample = [x]  # the pieces would stay beside their copy (8B-wide mlp_out: 24 MiB)
            picked = _row_sample(layer.get_submodule(g.linears[0]).weight.shape[0], self.settings.max_rows)
            sample = [weight(n, picked) for n in g.linears]
            forward = linear_forward(x, mlp_tail(weight("mlp.down_proj", picked_columns=picked)) if g.judged_on == "mlp" else None)
        result = search_group(method, forward, sample, stats, self.sim, self.settings)
        if result.family is not None:
            s = torch.from_numpy(result.scale)
            self.columns.update({n: s[None, :] for n in g.linears})
            if g.producer_axis == "rows":
                self.rows[g.producer.removesuffix(".weight")] = 1.0 / s[:, None]
        return result


def _release_attention(layer, channels: dict, prompts: list) -> None:
    """Drop what only the attention groups' search needed: the attention's weights (on the meta
    device: no storage), the captured prompts and those groups' token samples."""
    layer.self_attn.to("meta")
    prompts.clear()
    for g in ATTENTION_GROUPS:
        channels[g.name].sample = []


# Rows of a weight column_absmax reads at once, in fp32 bytes. It picked 4,096 rows by index (a copy,
# then |.| another): all of an 8B-wide down_proj (4096 x 12288), 2 x 192 MiB beside the layer.
COLUMN_CHUNK_BYTES = 16 << 20


def _row_sample(n: int, limit: int):
    """At most `limit` evenly spaced row indices of n (all of them when n <= limit)."""
    import torch

    return torch.arange(n) if n <= limit else torch.linspace(0, n - 1, limit).round().long()


@dataclass(frozen=True)
class _Run:
    """The calibration prompts, one per batch (no padding), ready for the streamed forward."""

    path: Path
    head: str
    yes_no: tuple[int, int]
    batches: list

    @property
    def tokens(self) -> int:
        return sum(b.input_ids.size for b in self.batches)

    def forward(self, reporter: Reporter, label: str, **hooks) -> np.ndarray:
        from qwen_convert.scoring.streamed.engine import stream_forward

        try:
            logits = stream_forward(self.path, self.batches, self.head, self.yes_no, reporter, label, spill=True, **hooks)
        except RuntimeError as exc:  # torch's own errors (memory, shapes) as one line
            raise QconvError(f"calibration pass failed: {str(exc).splitlines()[0]}", "run with QCONV_DEBUG=1 for the traceback") from exc
        return np.concatenate(logits) if logits else np.zeros(0)


def _prepare(path: Path | str, cset: CalibrationSet) -> _Run:
    from qwen_convert.checkpoint.files import load_config, open_checkpoint
    from qwen_convert.reranker import pad_rows
    from qwen_convert.scoring.batches import prompt_encoder

    config = load_config(path)
    encoder = prompt_encoder(Path(path), None, int(config.get("max_position_embeddings") or 32768))
    rows = check_lengths(cset, encoder, encoder.max_length)
    head, yes_no = ("seqcls", (-1, -1)) if "score.weight" in open_checkpoint(path).tensors else \
        ("causal", (encoder.tokens.yes_id, encoder.tokens.no_id))
    return _Run(Path(path), head, yes_no, [pad_rows([r], encoder.tokens.pad_id) for r in rows])


# --- the export's use: one pass, one fold plan per quantized variant ----------------------------

METHODS = ("calibrated", "naive")
# The calibrated method of each quantized variant (fp32/fp16 are never scaled: nothing to gain).
VARIANT_METHOD = {"int8": "smoothquant", "q4": "awq", "q4f16": "awq"}
# Variants qconv runs on the CPU's int8 kernels (scoring/kernels.py: q4 over float32 activations):
# their export keeps the activation record those kernels smooth with.
EXPANDED_ON_CPU = ("q4",)


@dataclass(frozen=True)
class VariantPlans:
    """Per variant (QuantMode value), the fold the builder applies, and quantize_config.json's record."""

    plans: dict[str, FoldPlan]
    keep: dict[str, frozenset]  # per variant, what stays at higher precision (build_onnx's keep)
    record: dict
    activations: dict[str, tuple[dict, dict]] = field(default_factory=dict)  # variant -> Calibration.activations

    def write_activations(self, onnx_dir: Path, file_name, reporter: Reporter = NULL) -> list[str]:
        """OUT/onnx/<variant file stem>.activations.safetensors for each variant run on the CPU's
        int8 kernels (file_name: variant -> its graph's file name); the names written."""
        from qwen_convert.scoring.kernels import ACTIVATIONS_SUFFIX, write_activations

        written = []
        for variant, (absmax, folds) in sorted(self.activations.items()):
            name = Path(file_name(variant)).stem + ACTIVATIONS_SUFFIX
            Path(onnx_dir).mkdir(parents=True, exist_ok=True)
            write_activations(Path(onnx_dir) / name, absmax, folds, {"variant": variant, **self.record["calibration_set"]})
            reporter.log(f"wrote {Path(onnx_dir).name}/{name}")
            written.append(name)
        return written


def check_method(method: str) -> str:
    if method not in METHODS:
        raise QconvError(f"unknown quantization method {method!r}", f"valid methods: {', '.join(METHODS)}")
    return method


def needs_calibration(method: str, modes) -> bool:
    return check_method(method) == "calibrated" and any(getattr(m, "value", m) in VARIANT_METHOD for m in modes)


def prepare_calibration(path: Path | str, calibration_file: Path | str | None) -> CalibrationSet:
    """Load and check the set against the model before anything is written (tokenizer only, no weights)."""
    from qwen_convert.checkpoint.files import load_config
    from qwen_convert.scoring.batches import prompt_encoder

    cset = load_calibration_set(calibration_file)
    config = load_config(path)
    check_lengths(cset, prompt_encoder(Path(path), None, int(config.get("max_position_embeddings") or 32768)),
                  int(config.get("max_position_embeddings") or 32768))
    return cset


def plan_variants(path: Path | str, cset: CalibrationSet, modes, options, settings: SearchSettings = SearchSettings(),
                  reporter: Reporter = NULL) -> VariantPlans:
    """One calibration pass for every quantized variant in `modes` (options: QuantizeOptions)."""
    from qwen_convert.checkpoint.files import load_config

    from .shapes import q4_embedding_block
    from .smoothing import simulation

    wanted = sorted({VARIANT_METHOD[m.value] for m in modes if m.value in VARIANT_METHOD})
    sims = {m: simulation(m, options.block_size, options.per_channel, options.accuracy_level) for m in wanted}
    cal = calibrate(path, cset, sims, settings, reporter)
    plans = {m.value: cal.plan(VARIANT_METHOD[m.value]) for m in modes if m.value in VARIANT_METHOD}
    record = {"method": "calibrated", "calibration_set": cset.to_dict(), "calibration_tokens": cal.tokens,
              "variants": {v: VARIANT_METHOD[v] for v in plans},
              "methods": {m: cal.summary(m) for m in wanted}}
    keep: dict[str, frozenset] = {}
    four_bit = [v for v in plans if VARIANT_METHOD[v] == "awq"]
    # The block the 4-bit embedding is really written with (shapes.py: a smaller one, or int8 rows,
    # where the requested block does not divide the hidden size): int8 rows need no drift check.
    block = q4_embedding_block(int(load_config(path)["hidden_size"]), options.block_size)
    if four_bit and options.quantize_embedding and block is not None:
        choice = choose_embedding_precision(path, cset, cal, sims["awq"], block, options.symmetric, reporter)
        keep = {v: frozenset({"model.embed_tokens"}) for v in four_bit} if choice.keep_8bit else {}
        record["mixed_precision"] = {**choice.to_dict(), "kept": {v: ["model.embed_tokens (int8 rows)"] for v in keep}}
    activations = {v: cal.activations(VARIANT_METHOD[v]) for v in plans if v in EXPANDED_ON_CPU}
    if activations:
        record["cpu_int8_kernels"] = {
            "variants": sorted(activations),
            "record": "onnx/<variant>.activations.safetensors: each linear group's input max |x| per channel (after the fold)",
            "use": "qconv runs these on the CPU's int8 kernels (per-tensor activation ranges) and smooths their int8 "
                   "weights with it at load (SmoothQuant, scoring/kernels.py)"}
    return VariantPlans(plans, keep, record, activations)


def choose_embedding_precision(path, cset: CalibrationSet, cal: Calibration, sim, block: int, symmetric: bool,
                               reporter: Reporter = NULL):
    """mixed.py's two simulated forwards of the calibration set (the 4-bit embedding alone; the
    whole calibrated 4-bit variant) and the choice they give."""
    from .mixed import choose_embedding, embedding_4bit, max_dp, quantized_layers

    run = _prepare(path, cset)
    rows = embedding_4bit(block, symmetric)
    alone = max_dp(run.forward(reporter, "calibration (4-bit embedding)", embedding=rows, stored=True), cal.logits)
    whole = max_dp(run.forward(reporter, "calibration (4-bit variant)", embedding=rows, stored=True,
                               observer=quantized_layers(cal.plan("awq"), sim, compact=True)), cal.logits)
    return choose_embedding(alone, whole)


def calibration_set(path: Path, modes, method: str, exporter: str, calibration_file: Path | None) -> CalibrationSet | None:
    """export_onnx's checked calibration set when a variant is calibrated (before OUT exists: a bad
    file writes nothing), else None."""
    import importlib.util

    from qwen_convert.errors import ExportError

    if not needs_calibration(method, modes):
        if calibration_file is not None and method == "naive":
            raise ExportError("--calibration was given with the naive method", "drop --calibration or use --quant-method calibrated")
        return None
    if exporter != "builder":
        raise ExportError(f"calibrated quantization needs the builder exporter, not {exporter}",
                          "drop --exporter or pass --quant-method naive")
    if importlib.util.find_spec("torch") is None:
        raise ExportError("calibrated quantization runs the model on the calibration set and needs torch",
                          "pip install 'qconv[convert]', or pass --quant-method naive")
    return prepare_calibration(path, calibration_file)


def describe_kept(settings: dict) -> dict:
    """quantize_config.json's `encoders` follow what mixed precision kept (an 8-bit embedding in a 4-bit variant)."""
    kept = settings.get("quantization", {}).get("mixed_precision", {}).get("kept")
    if kept:
        from .precision import describe_kept as describe

        describe(settings, kept)
    return settings
