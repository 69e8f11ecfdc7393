"""verify's drift gates (issue #19): quantized variants are gated on how far P(yes) moved and on ranking
agreement, not on NDCG retention alone. The test model is the shipped trained tiny reranker rescaled
to carry activation outliers (fixtures.inject_outliers: exact in fp32), where naive per-tensor int8
moves P(yes) by 0.2 on verify's own probes while NDCG retention stays above 0.97."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from qwen_convert.cli import app
from qwen_convert.errors import RecipeError
from qwen_convert.fixtures import OutlierSpec, inject_outliers
from qwen_convert.hub.resolve import builtin_path
from qwen_convert.onnx.export import ExportOptions, export_onnx
from qwen_convert.pipeline.recipe import load_recipe
from qwen_convert.verify import DEFAULT_GATES, VerifyOptions, gate_table

runner = CliRunner()


@pytest.fixture(scope="module")
def naive_exports(tmp_path_factory):
    """(model, its naive int8/q4/q4f16 export) for the clean trained tiny and its outlier twin."""
    root = tmp_path_factory.mktemp("gates")
    clean = builtin_path("tiny-reranker")
    outliers = inject_outliers(clean, root / "outliers", OutlierSpec(scale=50.0, channels=3, seed=0))
    options = ExportOptions(modes=("int8", "q4", "q4f16"), fp32=False, verify=False, quant_method="naive", prefix_graphs=False)
    return {name: (src, export_onnx(src, root / f"{name}-onnx", options).out) for name, src in
            (("clean", clean), ("outliers", outliers))}


def _verify(reference, candidate, *extra) -> tuple[int, dict]:
    result = runner.invoke(app, ["verify", str(reference), str(candidate), "--json", "--quiet", "--no-cache", *extra])
    return result.exit_code, json.loads(result.stdout)


def test_naive_int8_on_outliers_fails_by_default_though_its_ndcg_holds(naive_exports):
    src, onnx = naive_exports["outliers"]
    code, report = _verify(src, onnx, "--variant", "int8")
    assert code == 1 and not report["passed"]
    [int8] = report["candidates"]
    assert int8["retention"] >= 0.97  # NDCG retention alone (the gate before #19) would have passed it
    failed = {f["check"]: f for f in int8["failures"]}
    assert "max_abs_prob" in failed and failed["max_abs_prob"]["tolerance"] == 0.1
    assert failed["max_abs_prob"]["value"] == pytest.approx(int8["max_abs_prob"]) and int8["max_abs_prob"] > 0.15
    assert int8["gate"] == DEFAULT_GATES["int8"].to_dict()


def test_clean_naive_variants_still_pass(naive_exports):
    src, onnx = naive_exports["clean"]
    code, report = _verify(src, onnx)
    assert code == 0, [c["failures"] for c in report["candidates"]]
    by = {c["precision"]: c for c in report["candidates"]}
    assert by.keys() == {"int8", "q4", "q4f16"}
    for precision, c in by.items():
        gate = DEFAULT_GATES[precision]
        assert c["max_abs_prob"] <= gate.max_abs_prob and c["p95_abs_prob"] <= gate.p95_abs_prob
        assert c["ranking"]["mean_kendall_tau"] >= gate.min_mean_kendall_tau
        assert 0 < c["p95_abs_prob"] <= c["max_abs_prob"]


def test_the_drift_gates_are_set_from_the_cli(naive_exports):
    src, onnx = naive_exports["outliers"]
    code, report = _verify(src, onnx, "--variant", "int8", "--max-prob-drift", "0.5", "--p95-prob-drift", "0.5",
                           "--min-kendall-tau", "0.5")
    [int8] = report["candidates"]
    assert code == 0 and int8["passed"], int8["failures"]
    assert int8["gate"]["max_abs_prob"] == 0.5 and int8["gate"]["p95_abs_prob"] == 0.5
    assert int8["gate"]["min_mean_kendall_tau"] == 0.5
    code, report = _verify(src, onnx, "--variant", "int8", "--max-prob-drift", "0.5", "--p95-prob-drift", "0.01")
    [int8] = report["candidates"]
    assert code == 1 and [f["check"] for f in int8["failures"]] == ["p95_abs_prob"]
    assert int8["failures"][0]["value"] == pytest.approx(int8["p95_abs_prob"]) and int8["p95_abs_prob"] > 0.01


def test_the_report_names_the_failed_check(naive_exports):
    src, onnx = naive_exports["outliers"]
    result = runner.invoke(app, ["verify", str(src), str(onnx), "--variant", "int8", "--quiet", "--no-cache"])
    assert result.exit_code == 1
    [line] = [x for x in result.stdout.splitlines() if x.strip().startswith("FAIL outliers-onnx [onnx/int8]: max |ΔP(yes)|")]
    assert line.endswith("> 0.1") and float(line.split("|ΔP(yes)| ")[1].split()[0]) > 0.15
    assert "p95|ΔP|" in result.stdout  # the table's column


def test_gate_table_applies_the_drift_options_to_quantized_precisions_only():
    table = gate_table(VerifyOptions(max_prob_drift=0.3, p95_prob_drift=0.04, min_kendall_tau=0.9))
    for precision in ("int8", "q4", "q4f16", "bf16"):
        g = table[precision]
        assert (g.max_abs_prob, g.p95_abs_prob, g.min_mean_kendall_tau) == (0.3, 0.04, 0.9)
    assert table["fp32"] == DEFAULT_GATES["fp32"] and table["fp16"] == DEFAULT_GATES["fp16"]
    assert gate_table(VerifyOptions())["int8"].max_abs_prob == 0.1 and gate_table(VerifyOptions())["q4"].max_abs_prob == 0.2
    with pytest.raises(Exception, match="max_abs_prob is nan"):
        gate_table(VerifyOptions(max_prob_drift=float(np.nan)))


def test_recipes_carry_the_drift_gates(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "r"\nkind = "reranker"\n[source]\npath = "qconv:tiny-reranker"\n'
                      "[gates]\nmax_prob_drift = 0.15\np95_prob_drift = 0.03\nmin_kendall_tau = 0.85\n")
    gates = load_recipe(recipe).gates
    assert (gates.max_prob_drift, gates.p95_prob_drift, gates.min_kendall_tau) == (0.15, 0.03, 0.85)
    assert load_recipe(recipe, ["gates.max_prob_drift=0.2"]).gates.max_prob_drift == 0.2
    with pytest.raises(RecipeError, match="gates.p95_prob_drift must be between 0 and 1"):
        load_recipe(recipe, ["gates.p95_prob_drift=2"])
    dry = runner.invoke(app, ["run", str(recipe), "--dry-run", "--set", "gates.min_kendall_tau=0.7"])
    assert dry.exit_code == 0 and "min_kendall_tau = 0.7" in dry.stdout
