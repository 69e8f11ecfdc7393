"""`qconv inspect`: numbers checked against transformers and the files on disk."""

from __future__ import annotations

import json
import shutil

from typer.testing import CliRunner

from qwen_convert.cli import app
from qwen_convert.reranker import load_tokenizer, reranker_tokens
from qwen_convert.seqcls.convert import convert_to_seqcls


def _inspect_json(path) -> dict:
    r = CliRunner().invoke(app, ["inspect", str(path), "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_inspect_causal_fixtures_match_transformers(tiny_models):
    import torch
    from transformers import AutoModelForCausalLM

    for name, src in tiny_models.items():
        info = _inspect_json(src)
        model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
        tokens = reranker_tokens(load_tokenizer(src))
        assert info["kind"] == "causal" and info["already_seqcls"] is False
        assert info["architecture"] == "Qwen3ForCausalLM"
        assert info["parameters"] == model.num_parameters(), name  # tied weights counted once, as stored
        dtype = "BF16" if "bf16" in name else "F32"
        assert info["dtypes"] == {dtype: info["parameters"]}
        assert info["tied"] is name.startswith("tied")
        assert info["head"] == ("embed_tokens (tied)" if name.startswith("tied") else "lm_head (untied)")
        assert (info["yes_id"], info["no_id"], info["pad_id"]) == (tokens.yes_id, tokens.no_id, tokens.pad_id)
        assert info["sharded"] is name.endswith("sharded")
        on_disk = {p.name: p.stat().st_size for p in src.iterdir() if p.is_file()}
        assert {f["name"]: f["bytes"] for f in info["files"]} == on_disk
        assert info["total_bytes"] == sum(on_disk.values())
        assert (info["hidden_size"], info["num_hidden_layers"], info["vocab_size"]) == (64, 2, len(load_tokenizer(src)))
        assert info["problems"] == []


def test_inspect_seqcls_output(tiny_models, tmp_path):
    for name in ("untied_fp32", "tied_bf16_sharded"):
        src = tiny_models[name]
        out = convert_to_seqcls(src, tmp_path / name).out
        before, after = _inspect_json(src), _inspect_json(out)
        assert after["kind"] == "seqcls" and after["already_seqcls"] is True
        assert after["architecture"] == "Qwen3ForSequenceClassification" and after["num_labels"] == 1
        lm_head = 0 if before["tied"] else 1544 * 64
        assert after["parameters"] == before["parameters"] - lm_head + 64
        assert after["head"] == "score [1, 64] (F32)"
        assert after["config_pad_id"] == after["pad_id"] == before["pad_id"]
        assert after["dtypes"].get("F32", 0) >= 64
    text = CliRunner().invoke(app, ["inspect", str(out)]).stdout
    assert "already a seq-cls conversion" in text and "score [1, 64]" in text


def test_inspect_onnx_dir_lists_onnx_files(tiny_models, tmp_path):
    out = tmp_path / "onnxdir"
    (out / "onnx").mkdir(parents=True)
    shutil.copy(tiny_models["tied_fp32"] / "config.json", out / "config.json")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_models["tied_fp32"] / f, out / f)
    (out / "onnx" / "model.onnx").write_bytes(b"\0" * 100)
    (out / "onnx" / "model.onnx_data").write_bytes(b"\0" * 300)
    (out / "onnx" / "model_q4f16.onnx").write_bytes(b"\0" * 50)
    info = _inspect_json(out)
    assert info["kind"] == "onnx" and info["parameters"] is None
    assert {f["name"]: f["bytes"] for f in info["onnx_files"]} == {
        "onnx/model.onnx": 100, "onnx/model.onnx_data": 300, "onnx/model_q4f16.onnx": 50}
    assert "onnx/model_q4f16.onnx" in CliRunner().invoke(app, ["inspect", str(out)]).stdout


def test_inspect_refuses_what_it_cannot_read(tmp_path):
    r = CliRunner().invoke(app, ["inspect", str(tmp_path / "missing")])
    assert r.exit_code == 1 and r.stderr.startswith("error: ") and "does not exist" in r.stderr
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80")
    r = CliRunner().invoke(app, ["inspect", str(tmp_path)])
    assert r.exit_code == 1 and "only pickle weights" in r.stderr and "Traceback" not in r.output
