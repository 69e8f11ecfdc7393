"""`--exporter optimum` on a checkpoint saved by transformers 5, whose config.json keeps RoPE only in
`rope_parameters`: optimum-onnx runs beside transformers 4.x, which reads top-level `rope_theta` alone
and would silently trace rope_theta = 10000. The export stages a config.json with the 4.x keys, so the
graph computes the source's function; the reference here is torch on the ORIGINAL (4.x-keyed) config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from qwen_convert.checkpoint.rope import legacy_rope_keys
from qwen_convert.errors import ExportError, SourceError
from qwen_convert.onnx.optimum_compat import optimum_rope_keys

THETA = 1000000.0  # the tiny fixtures' rope_theta, as Qwen3's; transformers 4.x's default is 10000
PROMPTS = ["cheap flights to tokyo", "how to fix a leaking tap"]
PAIRS_TEXT = [("what is a cat", "a cat is a small domesticated animal that purrs"), ("q", "d " * 60),
              ("capital of france", "Paris is the capital and largest city of France, on the Seine.")]


def _as_transformers5(src: Path, dst: Path) -> Path:
    """A copy of src whose config.json has RoPE the way transformers 5 saves it: rope_parameters only."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    theta = config.pop("rope_theta", THETA)
    config.pop("rope_scaling", None)
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


# --- the key mapping (any venv) --------------------------------------------------------------------

def test_legacy_keys_of_each_config_form():
    assert legacy_rope_keys({"rope_theta": THETA}) == {}  # transformers 4.x / the hub's Qwen3 configs
    both = {"rope_theta": THETA, "rope_parameters": {"rope_type": "default", "rope_theta": THETA}}
    assert legacy_rope_keys(both) == {}  # qconv:tiny-chat-lm: nothing to adapt
    assert legacy_rope_keys({"rope_parameters": {"rope_type": "default", "rope_theta": THETA}}) == {"rope_theta": THETA}
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    yarn = {"rope_parameters": {**scaling, "rope_theta": THETA}}
    assert legacy_rope_keys(yarn) == {"rope_theta": THETA, "rope_scaling": scaling}
    assert legacy_rope_keys({**yarn, "rope_theta": THETA}) == {"rope_scaling": scaling}


def test_a_rope_type_transformers_4_cannot_express_is_one_line_naming_the_remedy():
    config = {"rope_parameters": {"rope_type": "proportional", "rope_theta": THETA, "partial_rotary_factor": 0.5}}
    with pytest.raises(ExportError, match=r"rope_type 'proportional'.*--exporter builder") as info:
        optimum_rope_keys(config, Path("/m"))
    assert "\n" not in str(info.value)
    # A torch load (scoring, verify's reference) under transformers 4.x: the main install's transformers 5.
    with pytest.raises(SourceError, match=r"rope_type 'proportional'.*transformers >= 5") as info:
        legacy_rope_keys(config, Path("/m"))
    assert "\n" not in str(info.value)


# --- the exports (optimum venv) --------------------------------------------------------------------

@pytest.mark.optimum
def test_causal_lm_from_a_transformers5_config_traces_the_source_rope(tmp_path):
    from qwen_convert.onnx.causal_lm import CausalExportOptions, build_tiny_causal_lm, export_causal_lm
    from qwen_convert.onnx.causal_verify import CausalGates, verify_causal_lm

    original = build_tiny_causal_lm(tmp_path / "lm", seed=3)  # transformers 4.x writes top-level rope_theta
    assert json.loads((original / "config.json").read_text())["rope_theta"] == THETA
    src = _as_transformers5(original, tmp_path / "lm5")
    out = tmp_path / "onnx"
    export_causal_lm(src, out, CausalExportOptions(modes=("fp32",), exporter="optimum"))

    settings = json.loads((out / "quantize_config.json").read_text())
    assert settings["source_config_adapted"]["keys"] == {"rope_theta": THETA}
    assert not any(p.name.startswith(".") for p in out.rglob("*"))  # the staged source is gone
    assert "rope_theta" not in json.loads((src / "config.json").read_text())  # and the source untouched
    gates = CausalGates(tol_logit=1e-4, min_token_agreement=1.0)
    report = verify_causal_lm(original, out, PROMPTS, max_new_tokens=10, gates=gates)
    assert report.variants[0].greedy_identical == len(PROMPTS) and report.variants[0].max_abs_logit < 1e-4, report.variants[0]
    # The reference on the transformers-5 source itself: torch reads its rope_theta under transformers 4.x too.
    same = verify_causal_lm(src, out, PROMPTS, max_new_tokens=10, gates=gates)
    got, want = same.variants[0], report.variants[0]
    assert (got.greedy_identical, got.first_divergence, got.decode_max_abs_logit, got.prefill_max_abs_logit) == \
        (want.greedy_identical, want.first_divergence, want.decode_max_abs_logit, want.prefill_max_abs_logit)
    assert got.passed


@pytest.mark.optimum
def test_reranker_from_a_transformers5_config_traces_the_source_rope(tiny_models, tmp_path):
    from qwen_convert.onnx.export import ExportOptions, export_onnx
    from qwen_convert.reranker import Pair, PromptEncoder, load_tokenizer
    from qwen_convert.scoring.onnx_scorers import load_onnx_scorers
    from qwen_convert.scoring.registry import load_scorers

    PAIRS = [Pair(q, d) for q, d in PAIRS_TEXT]
    original = tiny_models["untied_fp32"]
    src = _as_transformers5(original, tmp_path / "reranker5")
    out = tmp_path / "onnx"
    # verify ON: its torch reference loads the transformers-5 source under transformers 4.x too.
    result = export_onnx(src, out, ExportOptions(modes=(), exporter="optimum"))
    assert result.verification is not None and result.passed, result.verification.render()

    settings = json.loads((out / "quantize_config.json").read_text())
    assert settings["source_config_adapted"]["keys"] == {"rope_theta": THETA}
    assert not any(p.name.startswith(".") for p in out.rglob("*"))
    batch = PromptEncoder(load_tokenizer(original), max_length=256).encode(PAIRS, "left")
    (onnx_fp32,) = load_onnx_scorers(out, ["fp32"])
    got = onnx_fp32.score(batch)
    np.testing.assert_allclose(got, load_scorers(original)[0].score(batch), atol=1e-4)
    np.testing.assert_allclose(got, load_scorers(src)[0].score(batch), atol=1e-4)


@pytest.mark.optimum
def test_the_optimum_export_refuses_such_a_rope_type_before_out_exists(tmp_path):
    from qwen_convert.onnx.causal_lm import CausalExportOptions, build_tiny_causal_lm, export_causal_lm

    src = _as_transformers5(build_tiny_causal_lm(tmp_path / "lm", seed=3), tmp_path / "lm5")
    config = json.loads((src / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "proportional", "rope_theta": THETA, "partial_rotary_factor": 0.5}
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="use --exporter builder"):
        export_causal_lm(src, tmp_path / "onnx", CausalExportOptions(modes=("fp32",), exporter="optimum"))
    assert not (tmp_path / "onnx").exists()


# --- qconv's own torch references on such a source (optimum venv: transformers 4.x) ----------------

@pytest.fixture(scope="module")
def reranker5(tiny_models, tmp_path_factory):
    """(original, its transformers-5 copy, [a builder fp32 export of the copy, its seq-cls conversion]):
    neither the builder nor the seq-cls conversion needs torch."""
    from qwen_convert.onnx.export import ExportOptions, export_onnx
    from qwen_convert.seqcls.convert import ConvertOptions, convert_to_seqcls

    root = tmp_path_factory.mktemp("reranker5")
    original = tiny_models["untied_fp32"]
    src = _as_transformers5(original, root / "src")
    export_onnx(src, root / "onnx", ExportOptions(modes=(), verify=False, exporter="builder"))
    convert_to_seqcls(src, root / "seqcls", ConvertOptions(score_dtype="float32"))
    assert "rope_theta" not in json.loads((root / "seqcls" / "config.json").read_text())
    return original, src, [root / "onnx", root / "seqcls"]


@pytest.mark.optimum
@pytest.mark.parametrize("engine", ["transformers", "streamed"])
def test_verify_of_a_transformers5_source_under_transformers4_passes(reranker5, engine, tmp_path):
    from qwen_convert.reranker import Pair, PromptEncoder, load_tokenizer
    from qwen_convert.scoring.registry import load_scorers
    from qwen_convert.verify import VerifyOptions, verify

    original, src, candidates = reranker5
    cache = tmp_path / "cache"
    batch = PromptEncoder(load_tokenizer(original), max_length=256).encode([Pair(q, d) for q, d in PAIRS_TEXT], "left")
    expected = load_scorers(original, engine=engine)[0].score(batch)
    np.testing.assert_allclose(load_scorers(src, engine=engine)[0].score(batch), expected, rtol=0, atol=1e-6)

    options = VerifyOptions(pairs=tuple(Pair(q, d) for q, d in PAIRS_TEXT), batch_size=2, engine=engine, cache_dir=cache)
    report = verify(src, candidates, options)
    assert report.reference.engine == engine and report.reference.cache == "miss"
    assert report.passed, report.render()
    assert [c.name for c in report.candidates] == ["onnx/fp32", "onnx/fp32+prefix", "seqcls"]
    assert all(c.max_abs_logit < 1e-4 for c in report.candidates), report.render()
    # Scores cached before the 4.x keys were added (rope_theta 10000) have another key: never reused.
    keys = [json.loads(f.read_text())["material"] for f in cache.rglob("*.json")]
    torch_keys = [k for k in keys if "graph" not in k.get("artifact", {})]  # the reference's and the seq-cls candidate's
    assert [k.get("rope_adapted") for k in torch_keys] == [{"rope_theta": THETA}] * 2
