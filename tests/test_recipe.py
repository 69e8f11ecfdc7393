"""Recipes: loading, defaults, one-line validation errors, and `--dry-run` as the CLI's configuration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomllib
from typer.testing import CliRunner

from qwen_convert.cli import app
from qwen_convert.errors import RecipeError
from qwen_convert.pipeline.recipe import Recipe, load_recipe, recipe_from_dict

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
runner = CliRunner()


def dry_run(*args: str) -> str:
    result = runner.invoke(app, ["run", *args, "--dry-run"])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_every_shipped_recipe_loads():
    recipes = {p.stem: load_recipe(p) for p in RECIPES.glob("*.toml")}
    assert {"qwen3-reranker-0.6b", "qwen3-reranker-4b", "qwen3-reranker-8b", "tiny", "qwen3-0.6b-query-expansion",
            "tiny-query-expansion"} <= set(recipes)
    # 4B and 8B: only the variants that export and verify on a 16 GB runner (the 8B's fp32 graph is ~30 GB).
    expected = {"0.6B": ("fp32", "fp16", "int8", "q4", "q4f16"), "4B": ("int8", "q4", "q4f16"), "8B": ("int8", "q4", "q4f16")}
    for size, modes in expected.items():
        r = recipes[f"qwen3-reranker-{size.lower()}"]
        assert r.kind == "reranker"
        assert r.source.modelscope == r.source.huggingface == f"Qwen/Qwen3-Reranker-{size}"
        assert r.artifacts.seqcls and r.artifacts.onnx == modes, size
    assert recipes["tiny"].artifacts.onnx == ("fp32", "fp16", "int8", "q4", "q4f16")
    tiny = recipes["tiny"]
    assert tiny.source.path == "qconv:tiny-reranker" and tiny.verify.pairs == "qconv:tiny-reranker/eval.jsonl"
    assert recipes["qwen3-0.6b-query-expansion"].kind == "causal-lm"
    assert recipes["qwen3-0.6b-query-expansion"].artifacts.onnx == ("fp32", "q4f16")
    for name, r in recipes.items():
        assert r.name == name  # the file name is the recipe name (and the default output directory)


def test_defaults_are_filled_per_kind():
    r = recipe_from_dict({"name": "x", "source": {"huggingface": "a/b"}})
    assert r.artifacts.onnx == ("fp32", "fp16", "int8", "q4", "q4f16") and r.gates.tol_logit == 1e-4
    assert r.instruction.startswith("Given a web search query")
    c = recipe_from_dict({"name": "x", "kind": "causal-lm", "source": {"huggingface": "a/b"}})
    assert c.artifacts.onnx == ("fp32", "q4f16") and not c.artifacts.seqcls and c.verify.prompts
    assert "seqcls" not in c.to_dict()["artifacts"] and "instruction" not in c.to_dict()


@pytest.mark.parametrize("text, message", [
    ('name = "x"\n[source]\npath = "qconv:tiny-reranker"\n[gates]\ntol_logits = 1e-3\n',
     "unknown key 'gates.tol_logits' (did you mean 'gates.tol_logit'?)"),
    ('name = "x"\nknd = "reranker"\n[source]\npath = "p"\n', "unknown key 'knd' (did you mean 'kind'?)"),
    ('name = "x"\n[sources]\npath = "p"\n', "unknown key 'sources' (did you mean 'source"),
    ('name = "x"\n[source]\npath = "p"\n[gates]\ntol_logit = "1e-4"\n', 'gates.tol_logit must be a number, got string "1e-4"'),
    ('name = "x"\n[source]\npath = "p"\n[gates]\nmin_retention = true\n', "gates.min_retention must be a number, got boolean"),
    ('name = "x"\n[source]\npath = "p"\n[artifacts]\nonnx = ["fp32", "q3"]\n',
     "unknown ONNX mode 'q3' in artifacts.onnx (valid for reranker: fp32, fp16, int8, q4, q4f16, auto)"),
    ('name = "x"\n[source]\npath = "p"\n[artifacts]\nonnx = "fp32"\n', "artifacts.onnx must be a list of strings"),
    ('name = "x"\n[source]\npath = "p"\n[artifacts]\nseqcls = "yes"\n', "artifacts.seqcls must be true or false"),
    ('name = "x"\n[source]\npath = "p"\n[quantization]\nblock_size = 48\n', "block_size must be a power of two >= 16"),
    ('name = "x"\nkind = "causal-lm"\n[source]\npath = "p"\n[artifacts]\nseqcls = true\n',
     "artifacts.seqcls does not apply to a causal-lm recipe"),
    ('name = "x"\nkind = "classifier"\n[source]\npath = "p"\n', "unknown kind 'classifier' (valid kinds: reranker, causal-lm)"),
    ('name = "x"\n[source]\n', "[source] names no model"),
    ('[source]\npath = "p"\n', "missing name"),
    ('name = "x"\n[source\npath = "p"\n', "is not valid TOML"),
])
def test_bad_recipes_fail_with_one_line_naming_the_key(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert message in str(info.value)
    result = runner.invoke(app, ["run", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and message in result.stderr
    assert not (tmp_path / "out").exists()


def test_set_overrides_are_validated_like_the_file():
    with pytest.raises(RecipeError, match=r"--set: unknown key 'gates.tol' \(did you mean"):
        load_recipe(RECIPES / "tiny.toml", ["gates.tol=1"])
    with pytest.raises(RecipeError, match="gates.tol_fp16 must be a number"):
        load_recipe(RECIPES / "tiny.toml", ["gates.tol_fp16=abc"])
    with pytest.raises(RecipeError, match="is not KEY=VALUE"):
        load_recipe(RECIPES / "tiny.toml", ["gates.tol_fp16"])
    r = load_recipe(RECIPES / "tiny.toml", ['artifacts.onnx=["fp32","q4"]', "source.revision=v1.0", "gates.tol_logit=1e-3"])
    assert r.artifacts.onnx == ("fp32", "q4") and r.source.revision == "v1.0" and r.gates.tol_logit == 1e-3


@pytest.mark.parametrize("size, disk", [("4b", "~2.3 GB"), ("8b", "4.3 GB")])
def test_large_recipes_default_to_the_variants_a_16gb_runner_verifies(size, disk):
    recipe = RECIPES / f"qwen3-reranker-{size}.toml"
    resolved = tomllib.loads(dry_run(str(recipe)))
    assert resolved["artifacts"]["onnx"] == ["int8", "q4", "q4f16"]
    text = recipe.read_text()
    # The comments give each variant's disk and memory (the q4f16 row checked by its disk figure).
    rows = [line for line in text.splitlines() if line.startswith("#   ") and "onnx/model_" in line]
    assert [r.split()[1] for r in rows] == ["int8", "q4", "q4f16"]
    assert disk in rows[2] and all("< 0.5 GB" in r for r in rows)
    # fp32 can still be asked for, and a reranker recipe without fp32 is valid.
    assert load_recipe(recipe, ['artifacts.onnx=["fp32","int8"]']).artifacts.onnx == ("fp32", "int8")


def test_only_the_optimum_causal_lm_exporter_needs_fp32(tmp_path):
    assert recipe_from_dict({"name": "x", "source": {"path": "p"}, "artifacts": {"onnx": ["q4"]}}).artifacts.onnx == ("q4",)
    built = recipe_from_dict({"name": "x", "kind": "causal-lm", "source": {"path": "p"}, "artifacts": {"onnx": ["q4f16", "int8"]}})
    assert built.artifacts.exporter == "builder" and built.quantization.method == "calibrated"
    with pytest.raises(RecipeError, match="artifacts.onnx needs fp32"):
        recipe_from_dict({"name": "x", "kind": "causal-lm", "source": {"path": "p"},
                          "artifacts": {"onnx": ["q4f16"], "exporter": "optimum"}})
    traced = recipe_from_dict({"name": "x", "kind": "causal-lm", "source": {"path": "p"}, "artifacts": {"exporter": "optimum"}})
    assert traced.quantization.method == "naive"  # onnxruntime's quantizers: the only method that path has
    with pytest.raises(RecipeError, match="needs artifacts.exporter"):
        recipe_from_dict({"name": "x", "kind": "causal-lm", "source": {"path": "p"},
                          "artifacts": {"exporter": "optimum"}, "quantization": {"method": "calibrated"}})
    with pytest.raises(RecipeError, match="unknown artifacts.exporter 'torch'"):
        recipe_from_dict({"name": "x", "kind": "causal-lm", "source": {"path": "p"}, "artifacts": {"exporter": "torch"}})
    with pytest.raises(RecipeError, match="artifacts.exporter does not apply to a reranker recipe"):
        recipe_from_dict({"name": "x", "source": {"path": "p"}, "artifacts": {"exporter": "builder"}})


def test_dry_run_round_trips_as_toml_and_json(tmp_path):
    toml_text = dry_run(str(RECIPES / "qwen3-reranker-8b.toml"))
    expected = load_recipe(RECIPES / "qwen3-reranker-8b.toml")
    assert toml_text == expected.to_toml()
    (tmp_path / "resolved.toml").write_text(toml_text)
    assert load_recipe(tmp_path / "resolved.toml") == expected
    assert dry_run(str(tmp_path / "resolved.toml")) == toml_text  # a fixed point

    json_text = runner.invoke(app, ["run", str(RECIPES / "tiny.toml"), "--dry-run", "--json"]).stdout
    (tmp_path / "resolved.json").write_text(json_text)
    assert json.loads(json_text) == tomllib.loads(dry_run(str(RECIPES / "tiny.toml")))
    assert load_recipe(tmp_path / "resolved.json") == load_recipe(RECIPES / "tiny.toml")


def test_cli_configuration_equals_the_recipe_file(tmp_path):
    # A bare hub id with the defaults is exactly the shipped 0.6B recipe.
    assert dry_run("Qwen/Qwen3-Reranker-0.6B") == dry_run(str(RECIPES / "qwen3-reranker-0.6b.toml"))
    # CLI overrides == the same values written into the file.
    cli = dry_run(str(RECIPES / "tiny.toml"), "--set", 'artifacts.onnx=["fp32","q4f16"]', "--set", "gates.min_retention=0.9",
                  "--set", "verify.batch_size=4")
    edited = (RECIPES / "tiny.toml").read_text().replace('onnx = ["fp32", "fp16", "int8", "q4", "q4f16"]', 'onnx = ["fp32", "q4f16"]')
    edited = edited.replace("min_retention = 0.97", "min_retention = 0.9").replace("max_length = 512", "max_length = 512\nbatch_size = 4")
    (tmp_path / "tiny.toml").write_text(edited)
    assert cli == dry_run(str(tmp_path / "tiny.toml"))
    assert load_recipe(RECIPES / "tiny.toml", ["verify.padding_check=full"]).verify.padding_check == "full"
    with pytest.raises(RecipeError, match="verify.padding_check must be probe or full"):
        load_recipe(RECIPES / "tiny.toml", ["verify.padding_check=half"])
    assert load_recipe(RECIPES / "tiny.toml", ['artifacts.onnx=["fp32","q4f16"]', "gates.min_retention=0.9", "verify.batch_size=4"]) \
        == load_recipe(tmp_path / "tiny.toml")


def test_relative_paths_are_relative_to_the_recipe_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "r.toml").write_text('name = "r"\n[source]\npath = "../model"\n[verify]\npairs = "pairs.jsonl"\n')
    r = load_recipe(tmp_path / "sub" / "r.toml")
    assert r.source.path == str((tmp_path / "model").resolve())
    assert r.verify.pairs == str((tmp_path / "sub" / "pairs.jsonl").resolve())
    assert isinstance(recipe_from_dict(tomllib.loads(r.to_toml())), Recipe)
