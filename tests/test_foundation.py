"""The shared pieces: safetensors validation, atomic outputs, the prompt encoder, the CLI shell."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from qwen_convert.checkpoint.files import open_checkpoint
from qwen_convert.checkpoint.safetensors_io import OutTensor, encode, read_header, read_rows, write_safetensors
from qwen_convert.cli import app
from qwen_convert.errors import OutputError, WeightsError
from qwen_convert.fixtures import tokenizer_path
from qwen_convert.fsutil import atomic_output_dir
from qwen_convert.reranker import PREFIX, SUFFIX, Pair, PromptEncoder, load_tokenizer


def test_safetensors_roundtrip_matches_reference_reader(tmp_path):
    from safetensors.numpy import load_file, save_file

    arrays = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones((2, 2), np.float16)}
    save_file(arrays, tmp_path / "src.safetensors")
    src = read_header(tmp_path / "src.safetensors")
    extra = OutTensor("c", "F32", (2,), data=encode(np.array([1.5, -2.0]), "F32"))
    write_safetensors(tmp_path / "out.safetensors", [OutTensor(i.name, i.dtype, i.shape, source=i) for i in src.tensors.values()] + [extra])
    out = load_file(tmp_path / "out.safetensors")
    np.testing.assert_array_equal(out["a"], arrays["a"])
    np.testing.assert_array_equal(out["b"], arrays["b"])
    np.testing.assert_array_equal(out["c"], [1.5, -2.0])
    np.testing.assert_array_equal(read_rows(src.tensors["a"], [2, 0]), arrays["a"][[2, 0]])


def test_bf16_encode_rounds_like_torch():
    import torch

    x = torch.randn(1000, dtype=torch.float32) * 10
    ours = np.frombuffer(encode(x.numpy(), "BF16"), dtype="<u2")
    theirs = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours, theirs)


def test_truncated_safetensors_is_named(tmp_path):
    from safetensors.numpy import save_file

    save_file({"w": np.zeros((64, 64), np.float32)}, tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(data[:-100])
    with pytest.raises(WeightsError, match="m.safetensors: file is truncated"):
        read_header(tmp_path / "m.safetensors")
    (tmp_path / "m.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(WeightsError, match="corrupt or truncated safetensors header"):
        read_header(tmp_path / "m.safetensors")


def test_sharded_index_naming_missing_shard(tiny_models, tmp_path):
    import shutil

    src = tmp_path / "m"
    shutil.copytree(tiny_models["untied_bf16_sharded"], src)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (src / victim).unlink()
    with pytest.raises(WeightsError, match=f"names shard {victim}, which is missing"):
        open_checkpoint(src)


def test_pickle_only_checkpoint_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(WeightsError, match="only pickle weights"):
        open_checkpoint(tmp_path)


def test_atomic_output_dir_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(out) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise KeyboardInterrupt
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
    with atomic_output_dir(out) as tmp:
        (tmp / "done").write_text("1")
    assert (out / "done").read_text() == "1"
    with pytest.raises(OutputError, match="not empty"):
        with atomic_output_dir(out):
            pass
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "new").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["new"]


def test_truncation_cuts_body_never_suffix():
    tok = load_tokenizer(tokenizer_path())
    enc = PromptEncoder(tok, max_length=80)
    ids = enc.ids(Pair("short query", "word " * 500))
    assert len(ids) == 80
    suffix = tok.encode(SUFFIX, add_special_tokens=False)
    prefix = tok.encode(PREFIX, add_special_tokens=False)
    assert ids[-len(suffix):] == suffix
    assert ids[: len(prefix)] == prefix
    assert "short query" in tok.decode(ids)


def test_padding_sides_put_real_tokens_at_last_index():
    tok = load_tokenizer(tokenizer_path())
    enc = PromptEncoder(tok)
    pairs = [Pair("q", "a long document " * 5), Pair("q", "d")]
    for side in ("left", "right"):
        b = enc.encode(pairs, side)
        for i, p in enumerate(pairs):
            row = b.input_ids[i][b.attention_mask[i] == 1].tolist()
            assert row == enc.ids(p)
            assert b.input_ids[i, b.last_index[i]] == enc.suffix_ids[-1]


def test_help_is_fast_and_imports_nothing_heavy():
    code = (
        "import sys, time; t=time.time(); from qwen_convert.cli import app; "
        "from typer.testing import CliRunner; r=CliRunner().invoke(app, ['--help']); "
        "heavy=[m for m in ('torch','transformers','onnxruntime','optimum','modelscope','huggingface_hub') if m in sys.modules]; "
        "print(r.exit_code, heavy, time.time()-t)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split(maxsplit=2)
    assert out[0] == "0"
    assert out[1] == "[]", out
    assert float(out[2]) < 1.0


def test_every_command_has_help():
    runner = CliRunner()
    for cmd in ("seqcls", "inspect", "score", "verify", "export-onnx", "download", "run"):
        r = runner.invoke(app, [cmd, "--help"])
        assert r.exit_code == 0, (cmd, r.output)
        assert "Usage:" in r.output
