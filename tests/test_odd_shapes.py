"""Qwen3 shapes the fused kernels cannot take: every variant exports and verifies through the CLI.

GroupQueryAttention's CPU kernel refuses head_dims that are not a multiple of 8, and a 4-bit
embedding block must divide the hidden size; onnx/shapes.py picks plain attention ops and a smaller
block (or int8 rows). Random weights rank by noise, so the 4-bit variants are held to drift bounds
measured here rather than the trained-model ranking gates; fp32 and fp16 keep verify's own gates.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from typer.testing import CliRunner

from qwen_convert.cli import app
from qwen_convert.fixtures import TinySpec, build_tiny_reranker
from qwen_convert.onnx.shapes import q4_embedding_block

runner = CliRunner()
PAIRS = [
    ("capital of france", "Paris is the capital of France.", 1),
    ("capital of france", "Bananas are yellow.", 0),
    ("capital of france", "France borders Spain and Belgium.", 0),
    ("python list sort", "list.sort() sorts a list in place.", 1),
    ("python list sort", "The weather is mild today.", 0),
    ("python list sort", "sorted() returns a new sorted list.", 1),
]
SHAPES = {
    # hidden 48: the q4 embedding falls back to blocks of 16; head_dim 12, 2 query heads per KV head
    "h48_d12": (TinySpec(hidden_size=48, intermediate_size=80, num_attention_heads=4, num_key_value_heads=2, head_dim=12, seed=5),
                16, "GatherBlockQuantized"),
    # hidden 40: no power-of-two block >= 16 divides it -> int8 rows; head_dim 20, heads * head_dim 120 != hidden
    "h40_d20": (TinySpec(tied=False, hidden_size=40, intermediate_size=72, num_attention_heads=6, num_key_value_heads=2,
                         head_dim=20, seed=6), None, "Gather"),
}
# |ΔP(yes)| bounds for random-weight tiny models (measured: int8 <= 0.03, q4 <= 0.11 on these pairs).
MAX_PROB = {"int8": 0.06, "q4": 0.2, "q4f16": 0.2}


def test_embedding_block_choice():
    assert [q4_embedding_block(h, 32) for h in (64, 48, 40, 1024, 80, 24)] == [32, 16, None, 32, 16, None]
    assert q4_embedding_block(96, 64) == 32 and q4_embedding_block(128, 16) == 16


@pytest.fixture(scope="module", params=sorted(SHAPES))
def odd(request, tmp_path_factory) -> tuple[str, Path, Path]:
    root = tmp_path_factory.mktemp(request.param)
    model = build_tiny_reranker(root / "model", SHAPES[request.param][0])
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": q, "document": d, "label": label}) + "\n" for q, d, label in PAIRS))
    return request.param, model, pairs


def test_every_variant_of_an_odd_shape_exports_and_verifies(odd, tmp_path):
    name, model, pairs = odd
    spec, block, embedding_op = SHAPES[name]
    out = tmp_path / "out"
    result = runner.invoke(app, ["export-onnx", str(model), str(out), "--quantize", "all", "--no-verify"])
    assert result.exit_code == 0, result.output
    log = " ".join(result.stderr.split())  # the progress console wraps long lines
    assert f"head_dim {spec.head_dim} is not a multiple of 8" in log
    settings = json.loads((out / "quantize_config.json").read_text())
    shape = settings["shape"]
    # The same embedding kind in both 4-bit variants (the ops after "(" differ where calibration keeps
    # the rows at 8 bits: q4f16 casts them to fp16).
    kept = settings["quantization"].get("mixed_precision", {}).get("kept", {})
    kind = [e.split(" (")[0] for e in (settings["encoders"]["q4"]["embedding"], settings["encoders"]["q4f16"]["embedding"])]
    assert kind[0] == kind[1], kind
    if kept:  # calibration kept the 4-bit variants' embedding at 8 bits (onnx/mixed.py): said, and done
        assert kept == {"q4": ["model.embed_tokens (int8 rows)"], "q4f16": ["model.embed_tokens (int8 rows)"]}
        assert kind[0] == "int8 rows with one float32 scale per row"
        embedding_op = "Gather"
    else:
        assert kind[0] == shape["q4_embedding"].split(" (")[0]
    assert shape["head_dim"] == spec.head_dim and shape["attention"].startswith("MatMul+Softmax")
    if block is None:  # the shape's own fallback, whatever calibration then kept
        assert "int8 rows" in shape["q4_embedding"] and "the q4/q4f16 embedding is int8 rows" in log
    else:
        assert shape["q4_embedding"] == f"GatherBlockQuantized, blocks of {block} along hidden"
        assert f"block size 32 does not divide hidden size {spec.hidden_size}: blocks of {block}" in log
    for file in ("model.onnx", "model_q4.onnx", "model_q4f16.onnx"):
        nodes = onnx.load(str(out / "onnx" / file)).graph.node
        assert not [n for n in nodes if n.op_type == "GroupQueryAttention"]
        assert sum(n.op_type == "Softmax" for n in nodes) == spec.num_hidden_layers
    q4_nodes = onnx.load(str(out / "onnx" / "model_q4.onnx")).graph.node
    embed = next(n for n in q4_nodes if n.name.startswith("model.embed_tokens"))
    assert embed.op_type == embedding_op
    if block is not None and not kept:
        assert next(a.i for a in embed.attribute if a.name == "block_size") == block

    result = runner.invoke(app, ["verify", str(model), str(out), "--pairs", str(pairs), "--padding-check", "full", "--no-cache",
                                 "--max-prob-drift", "0.2", "--p95-prob-drift", "0.2", "--min-kendall-tau", "0",
                                 "--min-retention", "0.5", "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    by_name = {c["name"]: c for c in report["candidates"]}
    assert sorted(by_name) == ["onnx/fp16", "onnx/fp32", "onnx/int8", "onnx/q4", "onnx/q4f16"]
    assert all(c["passed"] for c in by_name.values())
    for c in by_name.values():  # every pair scored padded on both sides
        assert {side: s["pairs"] for side, s in c["per_side"].items()} == {"left": len(PAIRS), "right": len(PAIRS)}
    assert by_name["onnx/fp32"]["gate"]["max_abs_logit"] == 1e-4
    assert max(s["max_abs_logit"] for s in by_name["onnx/fp32"]["per_side"].values()) <= 1e-4
    assert max(s["max_abs_logit"] for s in by_name["onnx/fp16"]["per_side"].values()) <= 2e-2
    for mode, bound in MAX_PROB.items():
        assert 0 < by_name[f"onnx/{mode}"]["max_abs_prob"] <= bound, (mode, by_name[f"onnx/{mode}"]["max_abs_prob"])
