"""`qconv run`: the embedded tiny recipe end to end, manifest hashes, --check, skip/resume, failing gates."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest

# The local hub servers of the download tests (hubs needs repo and source_model; local_network_only is autouse).
from conftest import optimum_installed
from hubserver import MODEL, hubs, local_network_only, repo, source_model  # noqa: F401
from typer.testing import CliRunner

from qwen_convert.cli import app
from qwen_convert.errors import RecipeError
from qwen_convert.hub.resolve import builtin_path
from qwen_convert.pipeline import run as pipeline
from qwen_convert.pipeline.manifest import MANIFEST, REPORT, SCHEMA_VERSION, STATE, check_manifest
from qwen_convert.pipeline.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "tiny.toml"
runner = CliRunner()
PAIRS = [
    {"query": "capital of france", "document": "Paris is the capital of France.", "label": 1},
    {"query": "capital of france", "document": "Bananas are yellow.", "label": 0},
    {"query": "capital of france", "document": "France borders Spain.", "label": 0},
    {"query": "python list sort", "document": "list.sort() sorts a list in place.", "label": 1},
    {"query": "python list sort", "document": "The weather is mild today.", "label": 0},
    {"query": "python list sort", "document": "sorted() returns a new sorted list.", "label": 1},
]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_cli(*args: str):
    return runner.invoke(app, ["run", *args, "--quiet"])


def steps_run(out: Path) -> dict[str, bool]:
    """step -> True if it ran in the last run, False if it was skipped as intact."""
    timings = json.loads((out / MANIFEST).read_text())["timings"]
    return {k: not v["skipped"] for k, v in timings.items() if k != "total"}


# --- the embedded tiny recipe, end to end --------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-run") / "tiny"
    result = run_cli(str(TINY), "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["passed"] is True
    return out


def test_tiny_recipe_manifest_matches_the_files(tiny_run):
    manifest = json.loads((tiny_run / MANIFEST).read_text())
    assert manifest["schema_version"] == SCHEMA_VERSION and manifest["passed"] and manifest["failures"] == []
    assert manifest["recipe"] == load_recipe(TINY).to_dict()
    # Every listed file, hashed here independently of qconv.
    names = {a["name"]: a for a in manifest["artifacts"]}
    assert {"seqcls", "onnx/fp32", "onnx/fp16", "onnx/int8", "onnx/q4", "onnx/q4f16", "onnx/support", "verify"} == set(names)
    for art in manifest["artifacts"]:
        assert art["files"] and art["bytes"] == sum(f["bytes"] for f in art["files"])
        for f in art["files"]:
            path = tiny_run / f["path"]
            assert path.stat().st_size == f["bytes"] and sha256(path) == f["sha256"], f["path"]
    assert names["onnx/q4f16"]["path"] == "onnx/onnx/model_q4f16.onnx" and names["onnx/q4f16"]["mode"] == "q4f16"
    assert names["onnx/q4f16"]["sha256"] == sha256(tiny_run / "onnx/onnx/model_q4f16.onnx")
    assert (tiny_run / "seqcls/model.safetensors").is_file()
    # The source: the embedded model, each of its files hashed.
    src = builtin_path("tiny-reranker")
    assert manifest["source"]["hub"] == "builtin" and manifest["source"]["id"] == "qconv:tiny-reranker"
    for f in manifest["source"]["files"]:
        assert sha256(src / f["path"]) == f["sha256"]
    assert "model.safetensors" in {f["path"] for f in manifest["source"]["files"]}
    # Versions, metrics with gates, timings.
    import onnxruntime
    import torch

    assert manifest["tool"]["libraries"]["torch"] == torch.__version__
    assert manifest["tool"]["libraries"]["onnxruntime"] == onnxruntime.__version__
    gated = {(m["artifact"], m["name"]): m for m in manifest["metrics"] if m["gate"]}
    assert gated[("onnx/fp32", "max_abs_logit")]["value"] <= 1e-4 and gated[("onnx/fp32", "max_abs_logit")]["passed"]
    assert gated[("onnx/q4f16", "retention")]["gate"] == ">= 0.97"
    assert set(steps_run(tiny_run)) == {"resolve", "seqcls", "onnx", "verify"} and all(steps_run(tiny_run).values())
    # The verify report it rests on used the recipe's labeled eval set.
    report = json.loads((tiny_run / "verify.json").read_text())
    assert report["pairs"]["source"].endswith("eval.jsonl") and report["ndcg"]["gains"] == "labels"
    text = (tiny_run / REPORT).read_text()
    assert text.startswith("# qconv run: tiny — PASSED") and "| onnx/q4f16 | q4f16 |" in text
    libs = {n: manifest["tool"]["libraries"][n] for n in ("torch", "transformers", "onnxruntime", "optimum-onnx")}
    assert libs["transformers"] == version("transformers") and libs["optimum-onnx"] == (
        version("optimum-onnx") if optimum_installed() else None)
    assert f"\n- qconv 0.1.0; {', '.join(f'{n} {v}' for n, v in libs.items() if v)}\n" in text
    check = runner.invoke(app, ["run", str(tiny_run), "--check"])
    assert check.exit_code == 0 and "every file matches" in check.stdout


def test_check_names_changed_missing_and_unexpected_files(tiny_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(tiny_run, out)
    q4 = out / "onnx/onnx/model_q4.onnx"
    data = bytearray(q4.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte different
    q4.write_bytes(bytes(data))
    (out / "seqcls/tokenizer.json").unlink()
    (out / "onnx/onnx/extra.onnx").write_bytes(b"x")
    result = runner.invoke(app, ["run", str(out), "--check", "--json"])
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["changed"] == ["onnx/onnx/model_q4.onnx (sha256 differs)"]
    assert report["missing"] == ["seqcls/tokenizer.json"]
    assert report["unexpected"] == ["onnx/onnx/extra.onnx"]
    (out / MANIFEST).write_text('{"schema_version": 99}')
    bad = runner.invoke(app, ["run", str(out), "--check"])
    assert bad.exit_code == 1 and "schema_version 99" in bad.stderr


def test_rerun_skips_intact_steps_and_redoes_a_damaged_one(tiny_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(tiny_run, out)
    before = json.loads((out / MANIFEST).read_text())
    started = time.perf_counter()
    assert run_cli(str(TINY), "--out", str(out)).exit_code == 0
    assert not any(steps_run(out).values())  # everything intact: nothing redone
    assert time.perf_counter() - started < 15
    after = json.loads((out / MANIFEST).read_text())
    assert after["artifacts"] == before["artifacts"] and after["metrics"] == before["metrics"]

    # Damage the seq-cls weights: that step is redone; its bytes come out identical, so nothing after it is.
    weights = out / "seqcls/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    assert run_cli(str(TINY), "--out", str(out)).exit_code == 0
    assert steps_run(out) == {"resolve": False, "seqcls": True, "onnx": False, "verify": False}
    recorded = {f["path"]: f["sha256"] for a in before["artifacts"] for f in a["files"]}
    assert sha256(weights) == recorded["seqcls/model.safetensors"]
    assert check_manifest(out).passed


def test_recipe_without_fp32_writes_no_fp32_graph_and_gates_against_the_causal_reference(tmp_path):
    """What the 4B/8B recipes do (int8, q4, q4f16 only), on the trained tiny reranker."""
    recipe = tmp_path / "tiny-quantized.toml"
    recipe.write_text((TINY.read_text().replace('name = "tiny"', 'name = "tiny-quantized"')
                       .replace('onnx = ["fp32", "fp16", "int8", "q4", "q4f16"]', 'onnx = ["int8", "q4", "q4f16"]')))
    assert load_recipe(recipe).artifacts.onnx == ("int8", "q4", "q4f16")
    out = tmp_path / "out"
    result = run_cli(str(recipe), "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    files = {p.name for p in (out / "onnx" / "onnx").iterdir()}
    # No model.onnx(_data), no fp16; q4's activation record (its CPU int8 kernels smooth with it).
    assert files == {"model_quantized.onnx", "model_q4.onnx", "model_q4f16.onnx", "model_q4.activations.safetensors", "prefix"}, files
    settings = json.loads((out / "onnx" / "quantize_config.json").read_text())
    assert settings["exporter"] == "builder" and list(settings["files"]) == ["int8", "q4", "q4f16"]

    manifest = json.loads((out / MANIFEST).read_text())
    assert {a["name"] for a in manifest["artifacts"]} == {"seqcls", "onnx/int8", "onnx/q4", "onnx/q4f16", "onnx/support", "verify"}
    q4 = next(a for a in manifest["artifacts"] if a["name"] == "onnx/q4")
    assert sorted(Path(f["path"]).name for f in q4["files"]) == ["model_q4.activations.safetensors", "model_q4.onnx"]
    report = json.loads((out / "verify.json").read_text())
    assert report["reference"]["path"] == str(builtin_path("tiny-reranker").resolve())
    ndcg_ref = report["reference"]["ndcg"]
    by_name = {c["name"]: c for c in report["candidates"]}
    assert set(by_name) == {"seqcls", "onnx/int8", "onnx/q4", "onnx/q4f16", "onnx/int8+prefix", "onnx/q4+prefix", "onnx/q4f16+prefix"}
    gated = {(m["artifact"], m["name"]): m for m in manifest["metrics"] if m["gate"]}
    for mode in ("int8", "q4", "q4f16"):
        c = by_name[f"onnx/{mode}"]
        # Retention is NDCG against the causal reference's NDCG (there is no fp32 graph to compare with).
        assert c["ndcg_reference"] == ndcg_ref and abs(c["retention"] - c["ndcg"] / ndcg_ref) < 1e-12
        m = gated[(f"onnx/{mode}", "retention")]
        assert m["gate"] == ">= 0.97" and m["passed"] is True and m["value"] == c["retention"]
        assert 0 < c["max_abs_logit"] < 1  # scored for real, not a copy of the reference
        # the real quantized graph's own padding invariance on the right-padded probe, gated
        p = gated[(f"onnx/{mode}", "padding_delta")]
        side = c["per_side"]["right"]
        assert p["passed"] is True and p["value"] == side["padding_delta"] <= side["padding_limit"]
        assert p["gate"] == f"<= {side['padding_limit']:g}" and side["padding_limit"] == 2 * c["per_side"]["left"]["max_abs_logit"] + 1e-4
    assert manifest["passed"] and not manifest["failures"]
    assert runner.invoke(app, ["run", str(out), "--check"]).exit_code == 0


# --- a small local recipe: resume, gates, ownership ----------------------------------------------------

@pytest.fixture
def small(tmp_path, tiny_models) -> Path:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    recipe = tmp_path / "small.toml"
    recipe.write_text(f'name = "small"\n[source]\npath = "{tiny_models["tied_fp32"]}"\n'
                      f'[artifacts]\nonnx = ["fp32", "fp16"]\n[verify]\npairs = "pairs.jsonl"\nmax_length = 256\n')
    return recipe


def test_resume_after_an_interrupted_run_skips_completed_steps(small, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def interrupted(ctx):
        raise KeyboardInterrupt

    monkeypatch.setitem(pipeline.STEPS, "onnx", interrupted)
    result = run_cli(str(small), "--out", str(out))
    assert result.exit_code == 130 and "run the same command again to resume" in result.stderr
    state = json.loads((out / STATE).read_text())
    assert list(state["steps"]) == ["resolve", "seqcls"] and not (out / MANIFEST).exists()
    monkeypatch.undo()

    result = pipeline.run_recipe(small, out=out)
    assert result.passed
    assert {k: v["skipped"] for k, v in result.timings.items() if k != "total"} == \
        {"resolve": True, "seqcls": True, "onnx": False, "verify": False}
    assert check_manifest(out).passed


def test_resume_after_a_killed_process(small, tmp_path):
    """A hard kill (no cleanup at all) after the seq-cls step: the next run picks up from there."""
    out = tmp_path / "out"
    env = {**os.environ, "QCONV_DEBUG": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "qwen_convert.cli", "run", str(small), "--out", str(out), "--quiet"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            try:
                if "seqcls" in json.loads((out / STATE).read_text())["steps"]:
                    break
            except (OSError, ValueError):
                pass
            assert proc.poll() is None, "the run ended before it could be interrupted"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / MANIFEST).exists()
    result = pipeline.run_recipe(small, out=out)
    assert result.timings["resolve"]["skipped"] and result.timings["seqcls"]["skipped"]
    assert not list(out.rglob(".*qconv-tmp-*"))  # the killed step's half-written sibling is gone
    assert check_manifest(out).passed


def test_failing_gate_exits_1_and_the_report_names_it(small, tmp_path):
    out = tmp_path / "out"
    assert run_cli(str(small), "--out", str(out)).exit_code == 0
    result = run_cli(str(small), "--out", str(out), "--set", "gates.tol_logit=1e-12", "--set", "gates.min_retention=1.0")
    assert result.exit_code == 1
    # Only verify depends on the gates: everything else was reused.
    assert steps_run(out) == {"resolve": False, "seqcls": False, "onnx": False, "verify": True}
    report = (out / REPORT).read_text()
    assert report.startswith("# qconv run: small — FAILED")
    assert "- seqcls: max |Δlogit|" in report and "- onnx/fp32: max |Δlogit|" in report and "> 1.0e-12" in report
    manifest = json.loads((out / MANIFEST).read_text())
    assert not manifest["passed"] and any(f.startswith("onnx/fp32: max |Δlogit|") for f in manifest["failures"])
    failed = {(m["artifact"], m["name"]) for m in manifest["metrics"] if m["passed"] is False}
    assert {("seqcls", "max_abs_logit"), ("onnx/fp32", "max_abs_logit")} <= failed
    assert "FAILED" in result.stdout


def test_output_directory_of_another_recipe_is_refused(small, tmp_path):
    out = tmp_path / "out"
    assert run_cli(str(small), "--out", str(out)).exit_code == 0
    other = tmp_path / "other.toml"
    other.write_text(small.read_text().replace('name = "small"', 'name = "other"'))
    result = run_cli(str(other), "--out", str(out))
    assert result.exit_code == 1
    assert "holds the artifacts of recipe 'small', not 'other'" in result.stderr
    with pytest.raises(RecipeError, match="not empty and was not written by `qconv run`"):
        pipeline.run_recipe(small, out=small.parent)  # a directory with unrelated files
    # The same recipe without seq-cls: its old output goes, the manifest still matches the disk.
    assert run_cli(str(small), "--out", str(out), "--set", "artifacts.seqcls=false").exit_code == 0
    assert not (out / "seqcls").exists() and steps_run(out) == {"resolve": False, "onnx": True, "verify": True}
    assert check_manifest(out).passed


# --- the causal-LM recipe kind --------------------------------------------------------------------------

def test_causal_lm_recipe_runs_end_to_end(tmp_path):
    """The tiny query-expansion recipe as shipped (qconv:tiny-chat-lm, graph builder, no optimum)."""
    out = tmp_path / "out"
    recipe = ROOT / "recipes" / "tiny-query-expansion.toml"
    result = run_cli(str(recipe), "--out", str(out))
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / MANIFEST).read_text())
    kinds = {a["name"]: (a["kind"], a["mode"]) for a in manifest["artifacts"]}
    assert kinds["onnx/fp32"] == ("causal-lm-onnx", "fp32") and kinds["onnx/q4f16"] == ("causal-lm-onnx", "q4f16")
    metrics = {(m["artifact"], m["name"]): m for m in manifest["metrics"]}
    assert metrics[("onnx/fp32", "greedy_match")]["value"] == 1.0 and metrics[("onnx/fp32", "greedy_match")]["passed"]
    assert metrics[("onnx/fp32", "max_abs_logit")]["value"] < 1e-4
    assert metrics[("onnx/q4f16", "token_agreement")]["value"] >= 0.6  # measured 0.75 (recipe gate 0.6)
    settings = json.loads((out / "onnx" / "quantize_config.json").read_text())
    assert settings["exporter"] == "builder" and settings["quantization"]["method"] == "calibrated"
    assert check_manifest(out).passed


@pytest.mark.optimum
def test_causal_lm_recipe_with_the_optimum_exporter(tmp_path):
    out = tmp_path / "out"
    result = run_cli(str(ROOT / "recipes" / "tiny-query-expansion.toml"), "--out", str(out), "--set", "artifacts.exporter=optimum",
                     "--set", "gates.min_token_agreement=0")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "onnx" / "quantize_config.json").read_text())["exporter"] == "optimum"
    metrics = {(m["artifact"], m["name"]): m for m in json.loads((out / MANIFEST).read_text())["metrics"]}
    assert metrics[("onnx/fp32", "greedy_match")]["value"] == 1.0 and metrics[("onnx/fp32", "max_abs_logit")]["value"] < 1e-4


def test_causal_lm_recipe_without_the_optimum_extra_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    for name in ("optimum", "optimum.exporters", "optimum.exporters.onnx", "optimum.onnxruntime"):
        monkeypatch.setitem(sys.modules, name, None)  # as in the main venv, without qconv[optimum]
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(ROOT / "recipes" / "tiny-query-expansion.toml"), "--out", str(out), "--quiet",
                                 "--set", "artifacts.exporter=optimum", "--set", "quantization.method=naive"])
    assert result.exit_code == 1
    assert result.stderr == ("error: recipe tiny-query-expansion (kind causal-lm, artifacts.exporter optimum) needs optimum-onnx, "
                             "which is not installed (pip install 'qconv[optimum]' in a venv of its own: optimum-onnx pins "
                             "transformers < 4.58)\n")
    assert not out.exists()


# --- a hub recipe, against the local hub servers of the download tests ----------------------------------


def test_hub_recipe_falls_back_and_records_the_source(hubs, repo, tmp_path):
    """ModelScope id unknown there -> the Hugging Face id; the manifest names hub, id, revision, commit.
    The re-run reuses the resolved files without a single request to either hub."""
    recipe = tmp_path / "hub.toml"
    recipe.write_text(f'name = "hub"\n[source]\nmodelscope = "Qwen/Not-On-ModelScope"\nhuggingface = "{MODEL}"\n'
                      f'[artifacts]\nonnx = []\n[verify]\npairs = "{tmp_path / "pairs.jsonl"}"\nmax_length = 256\n')
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    out = tmp_path / "out"
    result = pipeline.run_recipe(recipe, out=out)
    assert result.passed
    source = result.manifest.source
    assert (source["hub"], source["id"], source["revision"]) == ("huggingface", MODEL, "main")
    assert source["commit"] == hubs.hf.repos[MODEL].commit
    # Every file fetched (the pickle copy on the hub never is), each hashed.
    assert {f["path"]: f["sha256"] for f in source["files"]} == \
        {name: hashlib.sha256(data).hexdigest() for name, data in repo.files.items() if not name.endswith(".bin")}
    assert hubs.ms.requests  # ModelScope was asked first
    hubs.ms.requests.clear()
    hubs.hf.requests.clear()
    again = pipeline.run_recipe(recipe, out=out)
    assert all(t["skipped"] for k, t in again.timings.items() if k != "total")
    assert hubs.ms.requests == [] and hubs.hf.requests == []
