"""Calibrated quantization (issue #19): outlier channels built into trained and random rerankers,
held against an independent reference (the streamed forward: transformers' decoder layers).

The construction (qwen_convert.fixtures.inject_outliers) rescales a model exactly: its fp32 graph
scores like the original's, but a few input channels of every linear layer run tens of times larger
than the rest, as real LLMs' do. Naive int8 must break on it (or the test proves nothing); the
calibrated variants must stay as close to the original as the naive ones are on the clean model.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from qwen_convert.cli import app
from qwen_convert.fixtures import OutlierSpec, TinySpec, build_tiny_reranker, inject_outliers
from qwen_convert.onnx.export import ExportOptions, export_onnx
from qwen_convert.progress import NULL as NULL_REPORTER
from qwen_convert.scoring.batches import prompt_encoder
from qwen_convert.scoring.metrics import sigmoid
from qwen_convert.scoring.onnx_scorers import load_onnx_scorers
from qwen_convert.scoring.probes import group_by_query, load_pairs
from qwen_convert.scoring.streamed.engine import stream_forward
from qwen_convert.verify.gates import DEFAULT_GATES

QUANTIZED = ("int8", "q4", "q4f16")
# Not the issue's x50 on 3 channels: the tests pick their own construction.
SPEC = OutlierSpec(scale=40.0, channels=4, seed=11)
EVAL_QUERIES = 30  # of the trained tiny's 60 held-out queries (270 pairs): enough to see drift, fast


def tiny() -> Path:
    return Path(str(resources.files("qwen_convert").joinpath("data/tiny-reranker")))


@pytest.fixture(scope="module")
def pairs():
    all_pairs = load_pairs(tiny() / "eval.jsonl")
    queries = list(group_by_query(all_pairs))[:EVAL_QUERIES]
    return [p for p in all_pairs if p.query in queries]


def reference(model: Path, pairs) -> np.ndarray:
    """The original causal model's streamed fp32 forward, one query per padded batch."""
    encoder = prompt_encoder(model, None, 8192)
    groups = list(group_by_query(pairs).values())
    out = np.zeros(len(pairs))
    logits = stream_forward(model, [encoder.encode([pairs[i] for i in g]) for g in groups], "causal",
                            (encoder.tokens.yes_id, encoder.tokens.no_id))
    for g, values in zip(groups, logits):
        out[g] = values
    return out


def onnx_scores(export_dir: Path, variant: str, pairs, expand_q4: bool = False) -> np.ndarray:
    """The variant's scores with the file's own kernels (a q4 graph's MatMulNBits, as onnxruntime on a
    GPU, ORTModel and transformers.js run it), or with expand_q4 as qconv runs q4 on the CPU (int8
    kernels built at load, scoring/kernels.py: int8 activations on top of the 4-bit weights)."""
    (scorer,) = load_onnx_scorers(export_dir, [variant], threads=1, expand_q4=expand_q4)
    encoder = prompt_encoder(export_dir, None, 8192)
    out = np.zeros(len(pairs))
    for g in group_by_query(pairs).values():
        out[g] = scorer.score(encoder.encode([pairs[i] for i in g]))
    return out


def drift(ref: np.ndarray, cand: np.ndarray) -> tuple[float, float]:
    """(max |Δlogit|, max |ΔP(yes)|)."""
    return float(np.abs(cand - ref).max()), float(np.abs(sigmoid(cand) - sigmoid(ref)).max())


def calibration_file() -> Path:
    """The tiny's in-distribution calibration pairs (recipes/tiny.toml uses them)."""
    return tiny() / "calibration.jsonl"


def export(src: Path, out: Path, modes=QUANTIZED, method: str | None = None, **kw) -> Path:
    # No prefix graphs: they double each export and are not what these tests hold (test_prefix.py does).
    export_onnx(src, out, ExportOptions(modes=tuple(modes), verify=False, quant_method=method, prefix_graphs=False, **kw))
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, pairs) -> dict:
    """The trained tiny, clean and with outliers, exported naive and calibrated, and the reference."""
    root = tmp_path_factory.mktemp("calibration")
    outlier = inject_outliers(tiny(), root / "outlier", SPEC)
    return {
        "ref": reference(tiny(), pairs),
        "outlier": outlier,
        "clean_naive": export(tiny(), root / "clean-naive", method="naive"),
        "clean_calibrated": export(tiny(), root / "clean-calibrated", fp32=False, calibration_file=calibration_file()),
        "outlier_naive": export(outlier, root / "outlier-naive", method="naive"),
        "outlier_calibrated": export(outlier, root / "outlier-calibrated", fp32=False, calibration_file=calibration_file()),
    }


def test_outlier_construction_is_exact(trained, pairs):
    # fp32 graphs of the original and the rescaled model score alike (rounding only) ...
    clean = onnx_scores(trained["clean_naive"], "fp32", pairs)
    rescaled = onnx_scores(trained["outlier_naive"], "fp32", pairs)
    assert drift(clean, rescaled)[0] < 1e-4
    assert drift(trained["ref"], rescaled)[0] < 1e-4


def test_naive_int8_breaks_on_outliers(trained, pairs):
    # ... while naive int8 moves P(yes) by more than 0.2 somewhere: the construction bites.
    _, dp = drift(trained["ref"], onnx_scores(trained["outlier_naive"], "int8", pairs))
    _, dp_clean = drift(trained["ref"], onnx_scores(trained["clean_naive"], "int8", pairs))
    assert dp > 0.2 and dp_clean < 0.1


@pytest.mark.parametrize("variant", QUANTIZED)
def test_calibrated_variant_keeps_the_clean_models_drift(trained, pairs, variant):
    naive_clean = drift(trained["ref"], onnx_scores(trained["clean_naive"], variant, pairs))
    naive_outlier = drift(trained["ref"], onnx_scores(trained["outlier_naive"], variant, pairs))
    calibrated = drift(trained["ref"], onnx_scores(trained["outlier_calibrated"], variant, pairs))
    assert calibrated[0] <= 2 * naive_clean[0] and calibrated[1] <= 0.1, (calibrated, naive_clean)
    assert calibrated[0] < naive_outlier[0], (calibrated, naive_outlier)
    # On the clean model, calibration is no worse than naive beyond noise.
    clean = drift(trained["ref"], onnx_scores(trained["clean_calibrated"], variant, pairs))
    assert clean[0] <= 1.25 * naive_clean[0], (clean, naive_clean)
    if variant == "q4":  # run as qconv runs q4 on the CPU: int8 activations add drift, still inside q4's gate
        expanded = drift(trained["ref"], onnx_scores(trained["outlier_calibrated"], variant, pairs, expand_q4=True))
        assert expanded[1] <= DEFAULT_GATES["q4"].max_abs_prob, (expanded, calibrated)


def test_quantize_config_records_the_calibration(trained):
    config = json.loads((trained["outlier_calibrated"] / "quantize_config.json").read_text())
    q = config["quantization"]
    assert q["method"] == "calibrated" and q["variants"] == {"int8": "smoothquant", "q4": "awq", "q4f16": "awq"}
    assert q["calibration_set"] == {"source": str(calibration_file()), "pairs": 108, "queries": 12,
                                    "sha256": hashlib.sha256(calibration_file().read_bytes()).hexdigest()}
    layers = 3
    for method in ("smoothquant", "awq"):
        groups = q["methods"][method]["groups"]
        assert set(groups) == {"attn_in", "mlp_in", "mlp_out"}
        assert all(len(g["alpha_per_layer"]) == layers for g in groups.values())
        # x40 outliers in the norms: the statistics summary sees them.
        assert groups["attn_in"]["input_outlier_ratio_max"] > 20
        assert all(g["relative_error_max"] <= g["relative_error_naive_max"] for g in groups.values())
    # The 4-bit embedding alone moves this model's scores past the budget: both 4-bit variants keep 8-bit rows.
    mixed = q["mixed_precision"]
    assert mixed["embedding_4bit_max_dp_on_calibration"] > mixed["budget"] and set(mixed["kept"]) == {"q4", "q4f16"}
    naive = json.loads((trained["outlier_naive"] / "quantize_config.json").read_text())
    assert naive["quantization"] == {"method": "naive"}


def test_reexport_writes_the_same_bytes(trained, tmp_path):
    again = export(trained["outlier"], tmp_path / "again", fp32=False, calibration_file=calibration_file())
    for name in ("model_quantized.onnx", "model_q4.onnx", "model_q4f16.onnx", "model_q4.activations.safetensors"):
        first = (trained["outlier_calibrated"] / "onnx" / name).read_bytes()
        assert hashlib.sha256(first).digest() == hashlib.sha256((again / "onnx" / name).read_bytes()).digest(), name
    assert (json.loads((again / "quantize_config.json").read_text())["quantization"]
            == json.loads((trained["outlier_calibrated"] / "quantize_config.json").read_text())["quantization"])


# --- q4 on the CPU's int8 kernels: smoothed from the export's activation record --------------------


def test_activation_record_says_what_the_graph_sees(trained):
    from qwen_convert.scoring.kernels import activations_file, read_activations

    onnx_dir = trained["outlier_calibrated"] / "onnx"
    record = activations_file(onnx_dir / "model_q4.onnx")
    assert record == onnx_dir / "model_q4.activations.safetensors"
    # Only q4 runs on the int8 kernels: int8 is smoothed at export, q4f16 keeps MatMulNBits.
    assert sorted(p.name for p in onnx_dir.glob("*.activations.safetensors")) == ["model_q4.activations.safetensors"]
    assert activations_file(trained["outlier_naive"] / "onnx" / "model_q4.onnx") is None
    absmax, folds = read_activations(record)
    layers = 3
    assert len(absmax) == len(folds) == 3 * layers
    fold = folds["model.layers.1.mlp_out"]
    assert fold.linears == ("model.layers.1.mlp.down_proj",) and fold.producer == "model.layers.1.mlp.up_proj" and fold.axis == "rows"
    assert folds["model.layers.0.attn_in"].producer == "model.layers.0.input_layernorm.weight"
    # The record is the graph's input after the AWQ fold: x40 outliers, much smaller once divided by s.
    config = json.loads((trained["outlier_calibrated"] / "quantize_config.json").read_text())["quantization"]
    assert config["cpu_int8_kernels"]["variants"] == ["q4"]
    ratio = max(float(a.max() / np.median(a)) for k, a in absmax.items() if k.endswith("attn_in"))
    assert 1 < ratio < config["methods"]["awq"]["groups"]["attn_in"]["input_outlier_ratio_max"]


def test_smoothing_folds_exactly(trained):
    """gamma' * W' = gamma * W per input channel, up to the int8 rounding of W' (half a step of its
    column): the fold moves range between the norm and the weights, never the function."""
    import onnx
    from onnx import numpy_helper

    from qwen_convert.scoring.kernels import dequantize_nbits, expand_q4

    file = trained["outlier_calibrated"] / "onnx" / "model_q4.onnx"
    smoothed = expand_q4(file, memory=1 << 40)
    plain = expand_q4(file, memory=1 << 40, smooth=False)
    assert smoothed.smoothed == 9 and plain.smoothed == 0 and "9 groups smoothed" in smoothed.kernels
    graph = onnx.load(str(file))
    inits = {t.name: numpy_helper.to_array(t, str(file.parent)) for t in graph.graph.initializer}
    new = {t.name: t for t in onnx.load_from_string(smoothed.model).graph.initializer}
    node = {n.name: n for n in graph.graph.node}["model.layers.2.self_attn.k_proj"]
    k = next(a.i for a in node.attribute if a.name == "K")
    w = dequantize_nbits(inits[node.input[1]], inits[node.input[2]], None, k)  # [out, in]
    gamma = inits["model.layers.2.input_layernorm.weight"]
    gamma2 = numpy_helper.to_array(new["model.layers.2.input_layernorm.weight"])
    q, scale = smoothed.weights[node.input[1] + ".int8"], numpy_helper.to_array(new[node.input[1] + ".int8_scale"])
    w2 = (q.astype(np.float32) * scale[None, :]).T  # [out, in]
    assert not np.allclose(gamma2, gamma)
    bound = np.abs(gamma2)[None, :] * scale[:, None] / 2 * (1 + 1e-5) + 1e-7
    assert np.all(np.abs(gamma2[None, :] * w2 - gamma[None, :] * w) <= bound)


def test_smoothed_int8_kernels_keep_q4_scores_under_outliers(trained, pairs):
    """What `qconv score --variant q4` runs on a CPU: with the record, no worse than the file's own
    MatMulNBits and far better than unsmoothed int8 kernels on a model with x40 outliers."""
    import qwen_convert.scoring.kernels as kernels
    from qwen_convert.scoring import onnx_scorers

    export_dir = trained["outlier_calibrated"]
    smoothed = drift(trained["ref"], onnx_scores(export_dir, "q4", pairs, expand_q4=True))
    own = drift(trained["ref"], onnx_scores(export_dir, "q4", pairs))
    record = kernels.activations_file
    try:
        kernels.activations_file = lambda _path: None
        onnx_scorers._sessions.clear()
        unsmoothed = drift(trained["ref"], onnx_scores(export_dir, "q4", pairs, expand_q4=True))
    finally:
        kernels.activations_file = record
        onnx_scorers._sessions.clear()
    assert smoothed[1] <= 0.1 and smoothed[0] < unsmoothed[0], (smoothed, unsmoothed, own)
    assert smoothed[0] <= 1.25 * own[0], (smoothed, own)


# --- the default calibration set (the built-in probes), and mixed precision -----------------------

# Another construction than SPEC: fewer, larger outlier channels, calibrated on the probes.
PROBE_SPEC = OutlierSpec(scale=60.0, channels=2, seed=4)


@pytest.fixture(scope="module")
def probes_calibrated(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("probes")
    outlier = inject_outliers(tiny(), root / "outlier", PROBE_SPEC)
    return {"outlier": outlier, "export": export(outlier, root / "calibrated", fp32=False)}


@pytest.mark.parametrize("variant", QUANTIZED)
def test_probe_calibrated_variant_meets_the_issue_targets(trained, probes_calibrated, pairs, variant):
    # Issue #19: with the default calibration set, max |ΔP| <= 0.1 and max |Δlogit| within 2x naive
    # on the clean model (q4 measured 0.15 before the 8-bit embedding fallback saw the probes' share).
    naive_clean = drift(trained["ref"], onnx_scores(trained["clean_naive"], variant, pairs))
    calibrated = drift(trained["ref"], onnx_scores(probes_calibrated["export"], variant, pairs))
    assert calibrated[0] <= 2 * naive_clean[0] and calibrated[1] <= 0.1, (calibrated, naive_clean)


def test_mixed_precision_keeps_the_embedding_where_it_is_most_of_the_drift(probes_calibrated):
    q = json.loads((probes_calibrated["export"] / "quantize_config.json").read_text())["quantization"]
    assert q["calibration_set"]["source"] == "builtin" and q["calibration_set"]["pairs"] == 40
    mixed = q["mixed_precision"]
    # On the probes the 4-bit embedding alone is inside the absolute budget, but most of the variant's drift.
    assert mixed["embedding_4bit_max_dp_on_calibration"] < mixed["budget"]
    assert 0 < mixed["embedding_4bit_max_dp_on_calibration"] < mixed["variant_4bit_max_dp_on_calibration"]
    assert mixed["embedding_share"] >= mixed["max_share"] and set(mixed["kept"]) == {"q4", "q4f16"}
    config = json.loads((probes_calibrated["export"] / "quantize_config.json").read_text())
    assert "kept at 8 bits by calibration" in config["encoders"]["q4"]["embedding"]


def test_choose_embedding_rule():
    from qwen_convert.onnx.mixed import EMBEDDING_MAX_DP, EMBEDDING_MAX_SHARE, choose_embedding

    assert choose_embedding(EMBEDDING_MAX_DP * 1.1, 1.0).keep_8bit  # past the absolute budget
    assert choose_embedding(0.01, 0.01 / EMBEDDING_MAX_SHARE).keep_8bit  # its share of the drift
    assert not choose_embedding(0.01, 0.1).keep_8bit
    assert not choose_embedding(0.0, 0.0).keep_8bit


def test_simulated_variant_forward_matches_the_onnx_graph(probes_calibrated, tmp_path):
    """mixed.quantized_layers simulates what the calibrated q4 graph computes: its logits on the probes
    sit far closer to onnxruntime's q4 than to fp32."""
    from qwen_convert.onnx.calibration import _prepare, calibrate, load_calibration_set
    from qwen_convert.onnx.mixed import embedding_4bit, quantized_layers
    from qwen_convert.onnx.smoothing import simulation
    from qwen_convert.scoring.probes import PROBE_PAIRS

    model = probes_calibrated["outlier"]
    cset = load_calibration_set(None)
    sim = simulation("awq")
    cal = calibrate(model, cset, {"awq": sim})
    # The export kept the embedding 8-bit: simulate exactly that graph (8-bit rows ~ fp32 rows here).
    simulated = _prepare(model, cset).forward(NULL_REPORTER, "sim", observer=quantized_layers(cal.plan("awq"), sim))
    graph = onnx_scores(probes_calibrated["export"], "q4", list(PROBE_PAIRS))
    off_graph, off_fp32 = np.abs(simulated - graph).max(), np.abs(cal.logits - graph).max()
    assert off_graph < off_fp32 / 3, (off_graph, off_fp32)
    assert embedding_4bit(32, True)(np.ones((2, 64), np.float32)).shape == (2, 64)


# --- --quantize auto -----------------------------------------------------------------------------

def test_quantize_auto_picks_the_smallest_passing_variant(tmp_path):
    out = tmp_path / "auto"
    code, err = _cli("export-onnx", "qconv:tiny-reranker", out, "--quantize", "auto", "--no-prefix-graphs", "--json")
    assert code == 0, err
    config = json.loads((out / "quantize_config.json").read_text())
    auto = config["auto"]
    sizes = {c["mode"]: c["bytes"] for c in auto["candidates"]}
    assert set(sizes) == {"fp16", "int8", "q4", "q4f16"}
    passing = [c["mode"] for c in auto["candidates"] if c["passed"]]
    assert auto["chosen"] == min(passing, key=sizes.get) == "q4f16", auto
    assert all((out / "onnx" / f).exists() for f in ("model.onnx", "model_fp16.onnx", "model_quantized.onnx", "model_q4f16.onnx"))


def test_quantize_auto_skips_a_smaller_variant_that_fails():
    from types import SimpleNamespace as NS

    from qwen_convert.onnx.auto import choose_variant, expand_auto
    from qwen_convert.verify.gates import Failure

    def result(precision, failures=()):
        return NS(kind="onnx", precision=precision, failures=list(failures), not_verified=None, passed=not failures)

    report = NS(reference=NS(padding_invariant=True), candidates=[
        result("fp32"), result("int8"), result("q4", [Failure("max_abs_prob", 0.3, 0.2, "max |ΔP(yes)| 0.3 > 0.2")]),
        result("q4f16", [Failure("kendall_tau", 0.5, 0.8, "τ 0.5 < 0.8")])])
    variants = [NS(mode="fp32", bytes=400), NS(mode="int8", bytes=100), NS(mode="q4", bytes=60), NS(mode="q4f16", bytes=50)]
    choice = choose_variant(variants, report)
    assert choice.chosen == "int8" and [c.mode for c in choice.candidates] == ["q4f16", "q4", "int8"]
    assert choice.candidates[1].failures == ("max_abs_prob: max |ΔP(yes)| 0.3 > 0.2",)
    report.candidates[1] = result("int8", [Failure("max_abs_prob", 0.4, 0.1, "x")])
    assert choose_variant(variants, report).chosen is None
    assert expand_auto(["auto"]) == (("fp16", "int8", "q4", "q4f16"), True)
    assert expand_auto(["q4", "auto"]) == (("q4", "fp16", "int8", "q4f16"), True)
    assert expand_auto(["int8"]) == (("int8",), False)


def test_quantize_auto_needs_verification(tmp_path):
    code, err = _cli("export-onnx", "qconv:tiny-reranker", tmp_path / "out", "--quantize", "auto", "--no-verify")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and "--quantize auto" in lines[0] and "--no-verify" in lines[0], err
    assert not (tmp_path / "out").exists()


# --- the fold is exact: the fp32 graph with the calibrated scales folded in scores as without ---

@pytest.mark.parametrize("tied", [True, False])
def test_fold_is_exact_on_random_models(tmp_path, pairs, tied):
    from qwen_convert.checkpoint.files import open_checkpoint
    from qwen_convert.formats import QuantMode
    from qwen_convert.onnx.build import build_onnx
    from qwen_convert.onnx.calibration import calibrate, load_calibration_set
    from qwen_convert.onnx.smoothing import simulation

    base = build_tiny_reranker(tmp_path / "base", TinySpec(tied=tied, num_hidden_layers=4, seed=21 + tied))
    model = inject_outliers(base, tmp_path / "outlier", OutlierSpec(scale=25.0, channels=2, seed=3 + tied))
    few = tmp_path / "calibration.jsonl"  # 3 queries: a short pass
    few.write_text("".join(calibration_file().read_text().splitlines(keepends=True)[:27]))
    cal = calibrate(model, load_calibration_set(few), {"smoothquant": simulation("smoothquant"), "awq": simulation("awq")})
    ckpt = open_checkpoint(model)
    export(model, tmp_path / "out", modes=(), method="naive")  # fp32 graph + sidecars, unfolded
    plain = onnx_scores(tmp_path / "out", "fp32", pairs[:27])
    assert drift(reference(base, pairs[:27]), plain)[0] < 1e-4
    for method in ("smoothquant", "awq"):
        plan = cal.plan(method)
        assert plan  # the search found scales worth folding on every model with outliers
        build_onnx(ckpt, tmp_path / "out" / "onnx" / "model.onnx", QuantMode.FP32, fold=plan)
        assert drift(plain, onnx_scores(tmp_path / "out", "fp32", pairs[:27]))[0] < 1e-5, method


def test_real_width_layers_are_calibrated(tmp_path, pairs):
    """Qwen3-Reranker-0.6B's widths (hidden 1024, 16/8 heads of 128, intermediate 3072), 2 layers,
    random weights with outliers: int8 calibrated stays near the reference where naive does not."""
    base = build_tiny_reranker(tmp_path / "base", TinySpec(tied=False, hidden_size=1024, num_hidden_layers=2, num_attention_heads=16,
                                                           num_key_value_heads=8, head_dim=128, intermediate_size=3072, seed=5))
    model = inject_outliers(base, tmp_path / "outlier", OutlierSpec(scale=50.0, channels=3, seed=2))
    few = pairs[:18]
    ref = reference(base, few)
    small = tmp_path / "calibration.jsonl"  # 3 queries of the tiny's calibration set: the pass stays a few seconds
    small.write_text("".join(calibration_file().read_text().splitlines(keepends=True)[:27]))
    naive = drift(ref, onnx_scores(export(model, tmp_path / "naive", modes=("int8",), method="naive", fp32=False), "int8", few))
    out = export(model, tmp_path / "calibrated", modes=("int8", "q4"), fp32=False, calibration_file=small)
    calibrated = drift(ref, onnx_scores(out, "int8", few))
    clean = drift(ref, onnx_scores(export(base, tmp_path / "clean", modes=("int8",), method="naive", fp32=False), "int8", few))
    assert calibrated[0] <= 2 * clean[0] and calibrated[0] < naive[0] / 2, (calibrated, naive, clean)
    # q4 on the CPU's int8 kernels: per-tensor activation ranges meet the x50 channels. Unsmoothed it
    # lost the ranking (measured: max |Δlogit| 13.0 against 4.3 on the file's own kernels; random
    # weights are hard on 4 bits); smoothed from the export's record it stays near MatMulNBits.
    own = drift(ref, onnx_scores(out, "q4", few))
    smoothed = drift(ref, onnx_scores(out, "q4", few, expand_q4=True))
    assert smoothed[0] <= 1.25 * own[0], (smoothed, own)


# --- bad input: one line naming the file and line, exit 1, nothing written ---------------------------

def _cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stderr


def _pair(query: str, doc: str = "a document") -> str:
    return json.dumps({"query": query, "document": doc}) + "\n"


BAD_FILES = {
    "empty": ("\n\n", "is empty"),
    "malformed": (_pair("q one") + "{not json\n", "line 2: not valid JSON"),
    "one query": (_pair("q one") + _pair("q one", "other"), "line 2: all 2 pairs share one query"),
    "too long": (_pair("q one") + _pair("q two", "word " * 9000), "line 2: the prompt is longer than the model's 8192 positions"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_calibration_file_is_one_line_and_writes_nothing(tmp_path, case):
    text, message = BAD_FILES[case]
    bad = tmp_path / "calibration.jsonl"
    bad.write_text(text)
    code, err = _cli("export-onnx", "qconv:tiny-reranker", tmp_path / "out", "--quantize", "int8", "--no-verify", "--calibration", bad)
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and str(bad) in lines[0] and message in lines[0], err
    assert not (tmp_path / "out").exists()


def test_oversized_calibration_file(tmp_path, monkeypatch):
    from qwen_convert.onnx import calibration

    monkeypatch.setattr(calibration, "MAX_FILE_BYTES", 100)
    big = tmp_path / "big.jsonl"
    big.write_text(_pair("q one") + _pair("q two") + _pair("q three"))
    code, err = _cli("export-onnx", "qconv:tiny-reranker", tmp_path / "out", "--quantize", "q4", "--no-verify", "--calibration", big)
    assert code == 1 and f"calibration file {big}, line 1" in err and "MiB" in err, err
    assert not (tmp_path / "out").exists()


def test_calibration_file_and_naive_method_from_the_cli(tmp_path):
    good = tmp_path / "calibration.jsonl"
    good.write_text("".join(_pair(q, d) for q in ("is the kitchen good", "how to voyage") for d in ("the kitchen is good", "a boat")))
    code, err = _cli("export-onnx", "qconv:tiny-reranker", tmp_path / "cal", "--no-fp32", "--quantize", "int8", "--no-verify",
                     "--calibration", good)
    assert code == 0, err
    q = json.loads((tmp_path / "cal" / "quantize_config.json").read_text())["quantization"]
    assert q["calibration_set"] == {"source": str(good), "sha256": hashlib.sha256(good.read_bytes()).hexdigest(), "pairs": 4, "queries": 2}
    code, err = _cli("export-onnx", "qconv:tiny-reranker", tmp_path / "naive", "--no-fp32", "--quantize", "int8", "--no-verify",
                     "--quant-method", "naive", "--calibration", good)
    assert code == 1 and "--calibration was given with the naive method" in err
    code, err = _cli("export-onnx", "qconv:tiny-reranker", tmp_path / "bad", "--quantize", "int8", "--quant-method", "gptq")
    assert code == 1 and "unknown quantization method 'gptq'" in err and not (tmp_path / "bad").exists()


def test_recipe_with_auto_ships_the_chosen_variant(tmp_path):
    from qwen_convert.pipeline import run as pipeline

    out = tmp_path / "run"
    result = pipeline.run_recipe("recipes/tiny.toml", out=out,
                                 overrides=['artifacts.onnx=["auto"]', "artifacts.seqcls=false"])
    manifest = json.loads((out / "manifest.json").read_text())
    chosen = json.loads((out / "onnx" / "quantize_config.json").read_text())["auto"]["chosen"]
    assert result.manifest.passed and chosen in ("int8", "q4", "q4f16")
    assert [a["name"] for a in manifest["artifacts"] if a["name"].startswith("onnx/") and a["name"] != "onnx/support"] == [f"onnx/{chosen}"]
    verified = json.loads((out / "verify.json").read_text())["candidates"]
    assert {c["precision"] for c in verified} == {chosen}  # the full-prompt graph and its prefix graph


def test_recipe_gates_reach_the_auto_pick(tmp_path):
    """A recipe's [gates] are the gates auto picks by: a drift bound no quantized variant of the tiny can
    meet leaves fp16, and each quantized candidate names the check it failed with the recipe's bound."""
    from qwen_convert.pipeline import run as pipeline

    out = tmp_path / "run"
    result = pipeline.run_recipe("recipes/tiny.toml", out=out, overrides=[
        'artifacts.onnx=["auto"]', "artifacts.seqcls=false", "gates.max_prob_drift=0.0005"])
    auto = json.loads((out / "onnx" / "quantize_config.json").read_text())["auto"]
    assert auto["chosen"] == "fp16" and result.manifest.passed, auto
    failed = {c["mode"]: c["failures"] for c in auto["candidates"] if not c["passed"]}
    assert set(failed) == {"int8", "q4", "q4f16"}, auto
    assert all(any(f.startswith("max_abs_prob") and "0.0005" in f for f in fs) for fs in failed.values()), failed
