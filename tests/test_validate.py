"""Bad input is one line on stderr, exit 1, nothing written: a config that disagrees with its tensors
(validate.py, for seqcls / export-onnx; inspect reports instead), and every OUT that cannot be
written (under a file, read-only, a pseudo filesystem, a full disk) for seqcls / export-onnx / run.

Broken checkpoints are the tiny fixture with config.json edited or the safetensors rewritten; the
read-only and full disks are real tmpfs mounts (skipped where this process may not mount).
"""

from __future__ import annotations

import contextlib
import gc
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from qwen_convert.checkpoint.files import open_checkpoint
from qwen_convert.checkpoint.validate import checkpoint_problems
from qwen_convert.cli import app
from qwen_convert.fixtures import TinySpec, build_tiny_reranker

SPEC = TinySpec(tied=False, dtype="float32", seed=7)  # untied, so the lm_head can be broken too
H, LAYERS, HEADS, KV, HD, INTER = SPEC.hidden_size, SPEC.num_hidden_layers, SPEC.num_attention_heads, SPEC.num_key_value_heads, SPEC.head_dim, SPEC.intermediate_size
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return build_tiny_reranker(tmp_path_factory.mktemp("validate") / "good", SPEC)


def _copy(base: Path, tmp_path: Path, name: str) -> Path:
    dst = tmp_path / name
    shutil.copytree(base, dst)
    return dst


def _edit_config(model: Path, **changes) -> None:
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(changes)
    (model / "config.json").write_text(json.dumps(cfg, indent=2))


def _rewrite(model: Path, edit) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(model / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(model / WEIGHTS), metadata={"format": "pt"})


def _vocab(model: Path) -> int:
    return json.loads((model / "config.json").read_text())["vocab_size"]


def _break(kind: str, model: Path) -> tuple[str, str, str]:
    """Break `model` one way; return (tensor named, shape found, shape expected) as the error prints them."""
    v = _vocab(model)
    if kind == "vocab-smaller-than-embedding":
        _edit_config(model, vocab_size=v - 8)
        return "model.embed_tokens.weight", f"[{v}, {H}]", f"[{v - 8}, {H}]"
    if kind == "hidden-size-differs":
        _edit_config(model, hidden_size=2 * H)
        return "model.embed_tokens.weight", f"[{v}, {H}]", f"[{v}, {2 * H}]"
    if kind == "layer-tensor-missing":
        _rewrite(model, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
        return "model.layers.1.mlp.down_proj.weight", "is missing", f"[{H}, {INTER}]"
    if kind == "extra-layer":
        def add_layer(t):
            for name in [n for n in t if n.startswith(f"model.layers.{LAYERS - 1}.")]:
                t[name.replace(f"layers.{LAYERS - 1}.", f"layers.{LAYERS}.")] = t[name].copy()
        _rewrite(model, add_layer)
        return f"model.layers.{LAYERS}.", f"layer {LAYERS}", f"num_hidden_layers {LAYERS}"
    if kind == "head-wrong-shape":
        _rewrite(model, lambda t: t.__setitem__("lm_head.weight", t["lm_head.weight"][: v - 1].copy()))
        return "lm_head.weight", f"[{v - 1}, {H}]", f"[{v}, {H}]"
    if kind == "kv-heads-differ":
        _edit_config(model, num_key_value_heads=KV * 2)
        return "model.layers.0.self_attn.k_proj.weight", f"[{KV * HD}, {H}]", f"[{2 * KV * HD}, {H}]"
    if kind == "yes-id-out-of-range":
        # Config and tensors agree with each other, but the tokenizer's "yes" (263) is past the 200 rows.
        def shrink(t):
            t["model.embed_tokens.weight"] = t["model.embed_tokens.weight"][:200].copy()
            t["lm_head.weight"] = t["lm_head.weight"][:200].copy()
        _rewrite(model, shrink)
        _edit_config(model, vocab_size=200, pad_token_id=None, bos_token_id=None, eos_token_id=None)
        return "yes token id", "model.embed_tokens.weight [200, 64]", "vocab_size 200"
    raise AssertionError(kind)


BROKEN = ["vocab-smaller-than-embedding", "hidden-size-differs", "layer-tensor-missing", "extra-layer",
          "head-wrong-shape", "kv-heads-differ", "yes-id-out-of-range"]


def _one_error_line(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def _nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")], "a temporary sibling was left"


def test_the_unbroken_fixture_passes(base, tmp_path):
    assert checkpoint_problems(open_checkpoint(base)) == []
    r = CliRunner().invoke(app, ["seqcls", str(base), str(tmp_path / "out"), "--quiet"])
    assert r.exit_code == 0, r.output
    assert checkpoint_problems(open_checkpoint(tmp_path / "out")) == []  # score.weight [1, H] is expected too


@pytest.mark.parametrize("kind", BROKEN)
@pytest.mark.parametrize("command", ["seqcls", "export-onnx"])
def test_config_disagreeing_with_tensors_is_one_line(base, tmp_path, kind, command):
    model = _copy(base, tmp_path, "src")
    tensor, found, expected = _break(kind, model)
    out = tmp_path / "out"
    line = _one_error_line(CliRunner().invoke(app, [command, str(model), str(out), "--quiet"]))
    assert tensor in line and found in line and expected in line, line
    _nothing_written(out)


def test_export_refuses_a_seqcls_source_with_a_wrong_score_head(base, tmp_path):
    from safetensors.numpy import load_file, save_file

    seqcls = tmp_path / "seqcls"
    assert CliRunner().invoke(app, ["seqcls", str(base), str(seqcls), "--quiet"]).exit_code == 0
    tensors = load_file(str(seqcls / WEIGHTS))
    tensors["score.weight"] = np.concatenate([tensors["score.weight"]] * 2)
    save_file(tensors, str(seqcls / WEIGHTS), metadata={"format": "pt"})
    out = tmp_path / "onnx"
    line = _one_error_line(CliRunner().invoke(app, ["export-onnx", str(seqcls), str(out), "--no-verify", "--quiet"]))
    assert "score.weight" in line and f"[2, {H}]" in line and f"[1, {H}]" in line, line
    _nothing_written(out)


@pytest.mark.parametrize("kind", BROKEN)
def test_inspect_reports_every_disagreement(base, tmp_path, kind):
    model = _copy(base, tmp_path, "src")
    tensor, found, expected = _break(kind, model)
    r = CliRunner().invoke(app, ["inspect", str(model), "--json"])
    assert r.exit_code == 0, r.output
    problems = json.loads(r.stdout)["problems"]
    assert any(tensor in p and found in p and expected in p for p in problems), problems
    text = CliRunner().invoke(app, ["inspect", str(model)]).stdout
    assert any(line.startswith("problem: ") and tensor in line for line in text.splitlines())


# --- OUT that cannot be written ---------------------------------------------------------------------

COMMANDS = {
    "seqcls": lambda src, out: ["seqcls", src, str(out), "--quiet"],
    "export-onnx": lambda src, out: ["export-onnx", src, str(out), "--no-verify", "--quiet"],
    "run": lambda src, out: ["run", src, "--out", str(out), "--quiet"],
}


@contextlib.contextmanager
def _tmpfs(where: Path, options: str):
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode})")
    try:
        yield where
    finally:
        gc.collect()  # a failed writer's file object may still hold a deleted file open
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], check=True)


def _invoke(command: str, src: Path, out: Path):
    return CliRunner().invoke(app, COMMANDS[command](str(src), out))


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_out_under_a_file(base, tmp_path, command):
    afile = tmp_path / "somefile"
    afile.write_text("not a directory")
    line = _one_error_line(_invoke(command, base, afile / "sub"))
    assert "cannot write to" in line and f"{afile} is a file" in line, line
    assert afile.read_text() == "not a directory"


@pytest.mark.parametrize("out", ["/proc/qconv-test/out", "/sys/qconv-test", "/dev/qconv-test/out"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_out_on_a_pseudo_filesystem(base, command, out):
    out = Path(out)
    line = _one_error_line(_invoke(command, base, out))
    assert "pseudo filesystem" in line and str(out) in line, line
    assert not out.exists()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_out_on_a_read_only_filesystem(base, tmp_path, command):
    with _tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        line = _one_error_line(_invoke(command, base, ro / "out"))
        assert "read-only file system" in line, line
        assert list(ro.iterdir()) == []


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_out_on_a_full_disk(base, tmp_path, command):
    # 256 KiB: room for the sidecar files, not for the weights (the fixture's are ~1.5 MB).
    with _tmpfs(tmp_path / "full", "size=256k") as disk:
        out = disk / "out"
        line = _one_error_line(_invoke(command, base, out))
        assert "no space left" in line and str(disk) in line, line
        if command == "run":
            # run keeps its step record so the same command resumes; no artifact or temporary is left.
            left = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
            assert all(not p.endswith((".safetensors", ".onnx")) and ".qconv-tmp-" not in p for p in left), left
            assert not (out / "seqcls").exists()
        else:
            assert list(disk.iterdir()) == []
