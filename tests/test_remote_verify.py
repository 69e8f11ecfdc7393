"""`qconv verify REF URL`: a running server as a candidate, through the CLI.

The servers are real HTTP servers on 127.0.0.1: tests/scoreserver.py (transformers scoring a
`qconv seqcls` directory with its chat template, with switchable faults) and `qconv serve` on an
ONNX export. What is checked: a correct server passes with exit 0; each misconfiguration fails
with exit 1 and names its cause; transport faults are one line on stderr, exit 1.
"""

from __future__ import annotations

import json

import pytest
from scoreserver import ScoreServer
from servers import export  # noqa: F401  (session fixture: the embedded model exported to ONNX)
from typer.testing import CliRunner

from qwen_convert.cli import app
from qwen_convert.seqcls.convert import ConvertOptions, convert_to_seqcls

PAIRS = [
    {"query": "what is the capital of china", "document": "the capital of china is beijing", "label": 1},
    {"query": "what is the capital of china", "document": "gravity pulls apples down", "label": 0},
    {"query": "what is the capital of china", "document": "beijing is a large city", "label": 1},
    {"query": "how do plants grow", "document": "plants use sunlight to grow", "label": 1},
    {"query": "how do plants grow", "document": "the stock market fell today", "label": 0},
    {"query": "how do plants grow", "document": "seeds need water and soil", "label": 1},
]


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("remote")
    seqcls = root / "seqcls"
    convert_to_seqcls(tiny_models["untied_fp32"], seqcls, ConvertOptions(score_dtype="float32"))
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    with ScoreServer(seqcls) as server:
        yield tiny_models["untied_fp32"], server, pairs


def _verify(ref, url, pairs, *extra):
    result = CliRunner().invoke(app, ["verify", str(ref), url, "--pairs", str(pairs), "--no-cache", "--json", "-q", *extra])
    return result, (json.loads(result.stdout) if result.stdout.strip().startswith("{") else None)


@pytest.mark.parametrize("api", ["auto", "rerank", "v1/rerank", "score", "v1/score"])
def test_correct_server_passes(setup, api):
    ref, server, pairs = setup
    server.mode = "correct"
    result, report = _verify(ref, server.url, pairs, "--api", api)
    assert result.exit_code == 0, result.output
    (cand,) = report["candidates"]
    assert cand["passed"] and cand["engine"] == "server"
    assert cand["max_abs_prob"] <= 1e-4


@pytest.mark.parametrize("mode, cause", [
    ("no-template", "template"),
    ("constant", "every pair scored the same"),
    ("logits", "raw logits"),
])
def test_misconfigured_server_fails_naming_the_cause(setup, mode, cause):
    ref, server, pairs = setup
    server.mode = mode
    try:
        result, report = _verify(ref, server.url, pairs)
    finally:
        server.mode = "correct"
    assert result.exit_code == 1, result.output
    (cand,) = report["candidates"]
    assert not cand["passed"]
    assert cause in json.dumps(cand["failures"]), cand["failures"]


@pytest.mark.parametrize("mode, text", [("http500", "500"), ("nonjson", "JSON")])
def test_transport_faults_are_one_line(setup, mode, text):
    ref, server, pairs = setup
    server.mode = mode
    try:
        result = CliRunner().invoke(app, ["verify", str(ref), server.url, "--pairs", str(pairs), "--no-cache", "-q"])
    finally:
        server.mode = "correct"
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and text in lines[0], result.stderr


def test_connection_refused_is_one_line(setup):
    ref, _, pairs = setup
    result = CliRunner().invoke(app, ["verify", str(ref), "http://127.0.0.1:9", "--pairs", str(pairs), "--no-cache", "-q"])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "127.0.0.1:9" in lines[0], result.stderr


def test_verify_passes_against_qconv_serve(export, tmp_path):
    """`qconv verify REF http://127.0.0.1:PORT` against `qconv serve` on the embedded model's fp32 graph."""
    from servers import serving

    with serving(str(export), "--variant", "fp32", log_dir=tmp_path) as server:
        result = CliRunner().invoke(app, ["verify", "qconv:tiny-reranker", server.url, "--no-cache", "--json", "-q"])
    assert result.exit_code == 0, result.output
    (cand,) = json.loads(result.stdout)["candidates"]
    assert cand["passed"] and cand["engine"] == "server" and cand["max_abs_prob"] <= 1e-4
