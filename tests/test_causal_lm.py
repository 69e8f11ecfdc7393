"""The query-expansion causal LM: ONNX with KV cache, driven by optimum's ORTModelForCausalLM.generate()."""

from __future__ import annotations

import pytest

from qwen_convert.onnx.causal_lm import (
    CausalExportOptions,
    CausalGates,
    build_tiny_causal_lm,
    export_causal_lm,
    load_ort_causal_lm,
    verify_causal_lm,
)

# optimum-onnx's exporter and ORTModelForCausalLM: qconv[optimum], run in .venv-optimum (make test-optimum).
pytestmark = pytest.mark.optimum

PROMPTS = ["cheap flights to tokyo", "how to fix a leaking tap", "symptoms of vitamin d deficiency in adults"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("causal")
    src = build_tiny_causal_lm(root / "lm", seed=7)
    result = export_causal_lm(src, root / "onnx", CausalExportOptions(modes=("fp32", "q4f16")))
    return src, root / "onnx", result


@pytest.fixture(scope="module")
def torch_lm(lm):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = lm[0]
    return AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(str(src))


def test_export_layout_and_kv_cache_io(lm):
    import onnx

    _, out, result = lm
    assert [v.mode for v in result.variants] == ["fp32", "q4f16"]
    for name in ("config.json", "generation_config.json", "tokenizer.json", "onnx/model.onnx", "onnx/model_q4f16.onnx"):
        assert (out / name).is_file(), name
    graph = onnx.load(str(out / "onnx/model.onnx"), load_external_data=False).graph
    inputs = [i.name for i in graph.input]
    assert inputs[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert "past_key_values.1.value" in inputs and "present.1.value" in [o.name for o in graph.output]
    q4 = onnx.load(str(out / "onnx/model_q4f16.onnx"), load_external_data=False).graph
    assert any(n.op_type == "MatMulNBits" for n in q4.node)
    # fp32 at the boundary (keep_io_types): the same past_key_values feed both variants.
    elem = {i.name: i.type.tensor_type.elem_type for i in q4.input}
    assert elem["past_key_values.0.key"] == onnx.TensorProto.FLOAT
    assert (out / "onnx/model_q4f16.onnx").stat().st_size < (out / "onnx/model.onnx").stat().st_size / 2


def test_ort_generate_matches_torch_greedily_token_for_token(lm, torch_lm):
    import torch

    _, out, _ = lm
    ref, tok = torch_lm
    ort = load_ort_causal_lm(out, "fp32")
    for prompt in PROMPTS:
        enc = tok(prompt, return_tensors="pt")
        kwargs = dict(max_new_tokens=20, do_sample=False, num_beams=1, pad_token_id=tok.pad_token_id)
        expected = ref.generate(**enc, **kwargs)
        got = ort.generate(**enc, **kwargs)
        assert expected.shape[1] == enc["input_ids"].shape[1] + 20  # really generated 20 tokens
        assert torch.equal(got, expected), prompt
    # A left-padded batch: the cache, the mask and the positions must line up per row.
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=12, do_sample=False, num_beams=1, pad_token_id=tok.pad_token_id)
    assert torch.equal(ort.generate(**enc, **kwargs), ref.generate(**enc, **kwargs))


def test_fp32_logits_match_torch(lm, torch_lm):
    import numpy as np
    import torch

    _, out, _ = lm
    ref, tok = torch_lm
    ort = load_ort_causal_lm(out, "fp32")
    enc = tok(PROMPTS[2], return_tensors="pt")
    with torch.inference_mode():
        expected = ref(**enc).logits.numpy()
    got = ort(**enc).logits.numpy()
    assert got.shape == expected.shape and got.shape[-1] == ref.config.vocab_size
    assert np.max(np.abs(got - expected)) < 1e-4


def test_stock_optimum_loader_needs_the_head_dim_fix(lm):
    """The tiny LM has head_dim 32 != hidden 64 / 4 heads, as Qwen3-0.6B (128 != 1024 / 16): optimum's
    own first-step cache has the wrong width, which load_ort_causal_lm corrects."""
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    src, out, _ = lm
    tok = AutoTokenizer.from_pretrained(str(src))
    stock = ORTModelForCausalLM.from_pretrained(str(out), subfolder="onnx", file_name="model.onnx")
    with pytest.raises(Exception, match="invalid dimensions"):
        stock.generate(**tok("hello", return_tensors="pt"), max_new_tokens=2, do_sample=False)


def test_verify_reports_fp32_identical_and_q4f16_agreement(lm):
    src, out, _ = lm
    report = verify_causal_lm(src, out, PROMPTS[:2], max_new_tokens=10, modes=("fp32", "q4f16"),
                              gates=CausalGates(tol_logit=1e-4, min_token_agreement=0.8))
    fp32, q4f16 = report.variants
    assert fp32.passed and fp32.greedy_identical == 2 and fp32.max_abs_logit < 1e-4 and fp32.token_agreement == 1.0
    # 0.8 is the tiny query-expansion recipe's gate: 4-bit weights may flip a near-tied token, not most.
    assert q4f16.passed and q4f16.token_agreement >= 0.8 and q4f16.max_abs_logit > fp32.max_abs_logit
    assert report.passed and "PASSED" in report.render()
    strict = verify_causal_lm(src, out, PROMPTS[:1], max_new_tokens=4, modes=("fp32",), gates=CausalGates(tol_logit=1e-12))
    assert not strict.passed and "max |Δlogit|" in strict.variants[0].failures[0]
