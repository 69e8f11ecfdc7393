"""`score`: ranks documents; P(yes) is sigmoid of the reference logit for causal, seq-cls and ONNX dirs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from _handmade import one_torch_thread, reference_logit
from typer.testing import CliRunner

from qwen_convert.checkpoint.files import open_checkpoint
from qwen_convert.cli import app
from qwen_convert.errors import QconvError
from qwen_convert.formats import ArtifactKind
from qwen_convert.scoring import registry, torch_scorers
from qwen_convert.scoring.batches import prompt_encoder
from qwen_convert.scoring.probes import PROBE_PAIRS
from qwen_convert.scoring.registry import load_scorers
from qwen_convert.scoring.score import ScoreOptions, score_documents
from qwen_convert.seqcls.convert import convert_to_seqcls

_one_thread = pytest.fixture(autouse=True, scope="module")(one_torch_thread)

QUERY = PROBE_PAIRS[0].query
DOCS = [p.document for p in PROBE_PAIRS[:4]] + ["巴黎是法国的首都。"]


@pytest.fixture(scope="module")
def seqcls_dir(tiny_models, tmp_path_factory):
    return convert_to_seqcls(tiny_models["untied_fp32"], tmp_path_factory.mktemp("score") / "seqcls").out


def _expected_logits(src, docs):
    """Each prompt alone, unpadded, through the plain causal LM: logit(yes) − logit(no)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    encoder = prompt_encoder(src, None, 8192)
    return np.array([reference_logit(model, encoder.tokens, encoder.ids(p)) for p in _pairs(docs)])


def _pairs(docs):
    from qwen_convert.scoring.probes import LabeledPair

    return [LabeledPair(QUERY, d) for d in docs]


def test_causal_and_seqcls_rank_by_sigmoid_of_the_reference_logit(tiny_models, seqcls_dir):
    src = tiny_models["untied_fp32"]
    expected = _expected_logits(src, DOCS)
    for model in (src, seqcls_dir):
        result = score_documents(model, QUERY, DOCS, options=ScoreOptions(batch_size=3))
        [q] = result.queries
        assert q.query == QUERY and len(q.documents) == len(DOCS)
        assert [d.rank for d in q.documents] == [1, 2, 3, 4, 5]
        assert [d.index for d in q.documents] == list(np.argsort(-expected, kind="stable"))
        for d in q.documents:
            assert d.document == DOCS[d.index]
            assert d.logit == pytest.approx(expected[d.index], abs=2e-6)
            assert d.p_yes == pytest.approx(1 / (1 + np.exp(-expected[d.index])), abs=1e-6)
    assert score_documents(src, QUERY, DOCS).kind == "causal" and result.kind == "seqcls"


def test_cli_score_json_and_table(tiny_models):
    runner = CliRunner()
    src = str(tiny_models["tied_fp32"])
    args = ["score", src, "--query", QUERY] + [x for d in DOCS[:3] for x in ("--doc", d)]
    r = runner.invoke(app, args + ["--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    results = out["queries"][0]["results"]
    assert out["kind"] == "causal" and out["precision"] == "fp32" and out["queries"][0]["query"] == QUERY
    assert [x["rank"] for x in results] == [1, 2, 3]
    assert results[0]["p_yes"] >= results[1]["p_yes"] >= results[2]["p_yes"]
    expected = _expected_logits(tiny_models["tied_fp32"], DOCS[:3])
    for x in results:
        assert x["p_yes"] == pytest.approx(1 / (1 + np.exp(-expected[x["index"]])), abs=1e-6)
        assert x["document"] == DOCS[x["index"]]
    r = runner.invoke(app, args)
    assert r.exit_code == 0
    lines = r.stdout.splitlines()
    assert lines[2] == f"query: {QUERY}" and "P(yes)" in lines[3]
    assert lines[4].split()[:2] == ["1", f"{results[0]['p_yes']:.4f}"]


def test_pairs_file_groups_queries_and_keeps_labels(tiny_models, tmp_path):
    f = tmp_path / "pairs.jsonl"
    rows = [PROBE_PAIRS[i] for i in (0, 22, 1, 23, 24)]
    f.write_text("".join(json.dumps({"query": p.query, "document": p.document, "label": p.label}, ensure_ascii=False) + "\n"
                         for p in rows), encoding="utf-8")
    result = score_documents(tiny_models["tied_fp32"], pairs_file=f, options=ScoreOptions(batch_size=2))
    assert [q.query for q in result.queries] == [PROBE_PAIRS[0].query, PROBE_PAIRS[22].query]
    assert sorted(d.document for d in result.queries[1].documents) == sorted(p.document for p in rows[1::2] + rows[4:])
    assert {d.label for d in result.queries[0].documents} == {3.0, 0.0}
    assert "label" in result.to_dict()["queries"][0]["results"][0]


def test_onnx_export_scores_with_fp32_unless_told(tiny_models, seqcls_dir, monkeypatch, tmp_path):
    """The ONNX seam: an export dir without variant files asks the ONNX loader for fp32 (whose error
    names the missing file), or the named variant."""
    export = tmp_path / "export"
    shutil.copytree(seqcls_dir, export)
    (export / "onnx").mkdir()
    asked = []

    def fake_onnx_loader(path, variants, dtype):
        asked.append(tuple(variants))
        scorer = load_scorers(seqcls_dir)[0]
        scorer.name, scorer.kind, scorer.precision = f"onnx/{variants[0]}", ArtifactKind.ONNX, variants[0]
        return [scorer]

    monkeypatch.setitem(registry.LOADERS, ArtifactKind.ONNX, fake_onnx_loader)
    result = score_documents(export, QUERY, DOCS[:2])
    assert result.kind == "onnx" and result.scorer == "onnx/fp32"
    assert score_documents(export, QUERY, DOCS[:2], options=ScoreOptions(variant="q4f16")).precision == "q4f16"
    assert asked == [("fp32",), ("q4f16",)]
    with pytest.raises(QconvError, match="--variant q4 applies to ONNX exports"):
        score_documents(tiny_models["tied_fp32"], QUERY, DOCS[:1], options=ScoreOptions(variant="q4"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "error: nothing to score (pass --query with one or more --doc, or --pairs FILE.jsonl)"),
        (["--doc", "d"], "error: --doc given without --query (add --query TEXT)"),
        (["--query", "q"], "error: --query given without any --doc (add one --doc TEXT per document)"),
        (["--query", "q", "--doc", "d", "--pairs", "PAIRS"], "error: give either --query with --doc, or --pairs, not both"),
        (["--pairs", "PAIRS", "--max-length", "30"], "error: max length 30 leaves no room for the query and document"),
    ],
)
def test_cli_score_errors(tiny_models, tmp_path, args, message):
    pairs = tmp_path / "p.jsonl"
    pairs.write_text('{"query": "q", "document": "d"}\n')
    args = [str(pairs) if a == "PAIRS" else a for a in args]
    r = CliRunner().invoke(app, ["score", str(tiny_models["tied_fp32"]), *args])
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.startswith(message) and r.stderr.count("\n") == 1


def test_cli_score_bad_pairs_line_and_missing_model(tiny_models, tmp_path):
    pairs = tmp_path / "p.jsonl"
    pairs.write_text('{"query": "q", "document": "d"}\n{"query": "q", "document": "d"}\n{"query": "q", "doc": "d"}\n')
    r = CliRunner().invoke(app, ["score", str(tiny_models["tied_fp32"]), "--pairs", str(pairs)])
    assert r.exit_code == 1 and f'{pairs}, line 3: missing key "document"' in r.stderr and r.stderr.count("\n") == 1
    r = CliRunner().invoke(app, ["score", str(tmp_path / "nowhere"), "--query", "q", "--doc", "d"])
    assert r.exit_code == 1 and "does not exist" in r.stderr and "Traceback" not in r.output


def test_real_onnx_export_scores_like_the_reference(tiny_models, tmp_path):
    """End to end through onnxruntime: fp32 graph by default, a named variant on request."""
    from qwen_convert.onnx.export import ExportOptions, export_onnx

    src = tiny_models["untied_fp32"]
    out = export_onnx(src, tmp_path / "onnx", ExportOptions(modes=("int8",), verify=False)).out
    expected = _expected_logits(src, DOCS)
    [q] = score_documents(out, QUERY, DOCS, options=ScoreOptions(batch_size=2, variant="fp32")).queries
    for d in q.documents:
        assert d.logit == pytest.approx(expected[d.index], abs=1e-5)
    # Without --variant: the faster of int8 and fp32 (no verify report) on this machine, measured once.
    default = score_documents(out, QUERY, DOCS[:2])
    assert default.precision in ("int8", "fp32") and default.variant_choice in ("measured", "cached measurement")
    r = CliRunner().invoke(app, ["score", str(out), "--variant", "int8", "--json", "--query", QUERY, "--doc", DOCS[0], "--doc", DOCS[1]])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["scorer"] == "onnx/int8" and data["precision"] == "int8" and len(data["queries"][0]["results"]) == 2
    r = CliRunner().invoke(app, ["score", str(out), "--variant", "q3", "--query", QUERY, "--doc", DOCS[0]])
    assert r.exit_code == 1 and "unknown ONNX variant 'q3'" in r.stderr


def test_length_batches_cut_before_a_prompt_that_would_pad_the_batch_past_the_ratio(tiny_models):
    from qwen_convert.scoring.batches import MAX_PADDED_RATIO, encode_batches, length_batches

    # verify's first three probe queries on the 0.6B tokenizer: batches of 8 pad 3,128 tokens for 2,307 real
    lengths = [102, 108, 123, 126, 130, 131, 133, 135, 138, 157, 512, 512]
    bounds = length_batches(lengths, 8)
    assert bounds == [(0, 8), (8, 10), (10, 12)]
    assert sum((b - a) * lengths[b - 1] for a, b in bounds) == 2418 and MAX_PADDED_RATIO == 1.25
    for a, b in bounds:  # each batch within the ratio, and no cut that the ratio did not force
        assert (b - a) * lengths[b - 1] <= MAX_PADDED_RATIO * sum(lengths[a:b])
        if b < len(lengths) and b - a < 8:
            assert (b - a + 1) * lengths[b] > MAX_PADDED_RATIO * sum(lengths[a:b + 1])
    assert length_batches([], 8) == [] and length_batches([5, 5, 5], 2) == [(0, 2), (2, 3)]
    assert length_batches([10, 100], 8, ratio=100.0) == [(0, 2)]

    encoder = prompt_encoder(tiny_models["tied_fp32"], None, 8192)
    pairs = sorted([*PROBE_PAIRS[:3], PROBE_PAIRS[9]], key=lambda p: len(encoder.ids(p)))
    rows = [len(encoder.ids(p)) for p in pairs]
    assert rows[-1] > 3 * rows[-2]  # PROBE_PAIRS[9] has the long document
    split = encode_batches(encoder, pairs, 4, "left", by_length=True)
    assert [b.attention_mask.sum(axis=1).tolist() for b in split] == [rows[:3], rows[3:]]
    assert [b.input_ids.shape[0] for b in encode_batches(encoder, pairs, 4, "left")] == [4]


def test_fp32_load_of_a_bf16_checkpoint_widens_the_stored_weights_bit_for_bit(tiny_models):
    import torch
    from transformers import AutoModelForCausalLM

    path = tiny_models["untied_bf16_sharded"]
    checkpoint = open_checkpoint(path)
    assert {t.dtype for t in checkpoint.tensors.values()} == {"BF16"}
    ours = torch_scorers._from_pretrained(AutoModelForCausalLM, path, "float32", checkpoint)
    theirs = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    mine, ref = dict(ours.state_dict()), dict(theirs.state_dict())
    assert mine.keys() == ref.keys() and all(v.dtype == torch.float32 for v in mine.values())
    assert all(torch.equal(mine[k], ref[k]) for k in ref) and not ours.training
    assert [b.dtype for b in ours.buffers()] == [b.dtype for b in theirs.buffers()]
