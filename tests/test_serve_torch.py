"""`qconv serve` of a seq-cls torch directory (the optional path of #11): scores over HTTP equal
`qconv score` on the same directory, on every rerank route and /score, in fp32 and bf16.

The model is the trained tiny reranker converted by `qconv seqcls` (fp32 head). This path loads the
model through scoring.load_scorers, so, unlike the ONNX path, it does import torch: the test checks
that too, so the ONNX-only claim of test_serve.py stays meaningful.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from servers import serving
from test_serve import QUERIES

from qwen_convert.hub.resolve import resolve_model
from qwen_convert.seqcls.convert import ConvertOptions, convert_to_seqcls


@pytest.fixture(scope="module")
def seqcls(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serve-torch") / "tiny-seqcls"
    convert_to_seqcls(resolve_model("qconv:tiny-reranker").path, out, ConvertOptions(score_dtype="float32"))
    return out


def qconv_score(model: Path, query: str, docs: list[str], dtype: str) -> dict[str, float]:
    """What `qconv score MODEL --query Q --doc D... --dtype DTYPE` computes (its library function)."""
    from qwen_convert.scoring.score import ScoreOptions, score_documents

    result = score_documents(model, query, docs, options=ScoreOptions(dtype=dtype, batch_size=64, max_length=2048))
    return {d.document: d.p_yes for d in result.queries[0].documents}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_seqcls_directory_served_equals_qconv_score(seqcls, dtype, tmp_path):
    args = [str(seqcls)] + ([] if dtype == "float32" else ["--variant", dtype])
    with serving(*args, log_dir=tmp_path) as s, s.client() as c:
        (card,) = c.get("/v1/models").json()["data"]
        assert (card["id"], card["kind"], card["variant"]) == ("tiny-seqcls", "seqcls", dtype)
        worst = 0.0
        for query, docs in QUERIES.items():
            want = qconv_score(seqcls, query, docs, dtype)
            assert len(set(want.values())) > 1  # a constant head would pass any equality
            for route in ("/rerank", "/v1/rerank", "/v2/rerank"):
                body = c.post(route, json={"query": query, "documents": docs})
                assert body.status_code == 200, body.text
                results = body.json()["results"]
                assert sorted(r["index"] for r in results) == list(range(len(docs)))
                assert [r["relevance_score"] for r in results] == sorted((r["relevance_score"] for r in results), reverse=True)
                worst = max(worst, *(abs(r["relevance_score"] - want[docs[r["index"]]]) for r in results))
            scored = c.post("/v1/score", json={"text_1": query, "text_2": docs}).json()["data"]
            worst = max(worst, *(abs(d["score"] - want[docs[d["index"]]]) for d in scored))
        assert worst <= 1e-5, worst
        maps = Path(f"/proc/{s.proc.pid}/maps").read_text()
    assert "libtorch" in maps  # this path runs torch (the ONNX path's absence check sees it when it is there)


def test_onnx_only_variant_names_are_refused_for_a_seqcls_directory(seqcls, tmp_path):
    import subprocess

    from servers import QCONV

    bad = subprocess.run([QCONV, "serve", str(seqcls), "--variant", "int8"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "does not apply to a seq-cls model" in bad.stderr and "float32" in bad.stderr
