"""`kill -9` at any instant of `qconv run` over a finished run leaves that run whole (or the new one
whole), never a mix; the next run completes. And the directory swap itself cannot be cut in half."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qwen_convert import fsutil
from qwen_convert.pipeline import run as pipeline
from qwen_convert.pipeline.manifest import MANIFEST, check_manifest
from qwen_convert.pipeline.staging import staging_dir

ROOT = Path(__file__).resolve().parent.parent
PAIRS = [("capital of france", "Paris is the capital of France.", 1), ("capital of france", "Bananas are yellow.", 0),
         ("python list sort", "list.sort() sorts a list in place.", 1), ("python list sort", "The weather is mild.", 0)]
NEW = ["--set", 'artifacts.onnx=["fp32", "fp16"]']


def snapshot(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def variants(root: Path) -> list[str]:
    return sorted(a["name"] for a in json.loads((root / MANIFEST).read_text())["artifacts"] if a["kind"] == "onnx")


@pytest.fixture
def recipe(tmp_path, tiny_models) -> Path:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": q, "document": d, "label": label}) + "\n" for q, d, label in PAIRS))
    path = tmp_path / "kill.toml"
    path.write_text(f'name = "kill"\n[source]\npath = "{tiny_models["tied_fp32"]}"\n'
                    f'[artifacts]\nonnx = ["fp32"]\n[verify]\npairs = "pairs.jsonl"\nmax_length = 128\n')
    return path


def killed_run(recipe: Path, out: Path, after_lines: int, delay: float) -> bool:
    """`qconv run` over `out`, SIGKILLed `delay` s after its `after_lines`-th stderr line; True if it
    finished first."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "-m", "qwen_convert.cli", "run", str(recipe), "--out", str(out), *NEW],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for _ in range(after_lines):
            if not proc.stderr.readline():
                break
        time.sleep(delay)
        finished = proc.poll() is not None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    return finished


def test_sigkill_at_many_points_of_a_run_keeps_the_old_or_the_new_run_whole(recipe, tmp_path):
    out = tmp_path / "X"
    assert pipeline.run_recipe(recipe, out=out).passed
    old = snapshot(out)
    assert variants(out) == ["onnx/fp32"]
    rng = random.Random(22)
    outcomes, staged = [], []
    for after in (1, 2, 3, 4, 5, 6, 8, 10):
        finished = killed_run(recipe, out, after, rng.uniform(0.0, 0.6))
        staged.append(staging_dir(out).is_dir())  # killed mid-run: the new run's steps wait beside X
        check = check_manifest(out)
        assert check.passed, (after, check.missing, check.changed, check.unexpected)
        now = snapshot(out)
        if now == old:
            outcomes.append("old")
        else:  # the new run, complete: its manifest names both variants and every file hashes as listed
            assert variants(out) == ["onnx/fp16", "onnx/fp32"], after
            outcomes.append("new")
        assert not [p for p in out.rglob("*") if fsutil.TMP_MARKER in p.name or ".qconv-staging" in p.name]
        if finished:
            break
    # Most kills land inside the run (resumed each time from the staging sibling), so X stayed the old run.
    assert outcomes.count("old") >= 3 and sum(staged) >= 2, (outcomes, staged)
    assert outcomes == sorted(outcomes, key=["old", "new"].index), outcomes  # never back from new to old

    result = pipeline.run_recipe(recipe, out=out, overrides=NEW[1:])
    assert result.passed and variants(out) == ["onnx/fp16", "onnx/fp32"] and check_manifest(out).passed
    assert not staging_dir(out).exists()
    assert ".qconv-staging" not in (out / "verify.json").read_text()  # its paths name X, where the files are
    assert sorted(p.name for p in tmp_path.iterdir()) == ["X", "kill.toml", "pairs.jsonl"]


def test_directory_swap_cut_between_its_renames_is_undone(tmp_path, monkeypatch):
    out, new = tmp_path / "out", tmp_path / "new"
    for d, text in ((out, "old"), (new, "new")):
        d.mkdir()
        (d / "model.onnx").write_text(text)

    fsutil.replace_dir(new, out)  # renameat2(RENAME_EXCHANGE): one step
    assert (out / "model.onnx").read_text() == "new" and not new.exists()

    # Where the filesystem cannot exchange, two renames: a kill between them leaves OUT renamed aside...
    new.mkdir()
    (new / "model.onnx").write_text("newer")
    monkeypatch.setattr(fsutil, "exchange", lambda a, b: False)
    real, calls = os.rename, []

    def rename(a, b):
        calls.append((a, b))
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands for SIGKILL: nothing after this point runs
        real(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        fsutil.replace_dir(new, out)
    monkeypatch.setattr(os, "rename", real)
    assert not out.exists()
    # ... and the next writer puts it back before anything else: OUT is the last complete output.
    with fsutil.atomic_output_dir(out, force=True) as tmp:
        assert (out / "model.onnx").read_text() == "new"
        (tmp / "model.onnx").write_text("next")
    assert (out / "model.onnx").read_text() == "next"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "out"]


def test_publish_leaves_a_killed_attempts_temporaries_behind(tmp_path):
    """A resumed staging directory can hold a killed step's temporary file (verify's score cache writes
    one next to its entry); publishing the finished run must not carry it into OUT."""
    from qwen_convert.pipeline.staging import publish

    work, out = tmp_path / ".X.qconv-staging", tmp_path / "X"
    (work / ".reference-cache").mkdir(parents=True)
    (work / "onnx" / f".model.onnx{fsutil.TMP_MARKER}dir").mkdir(parents=True)
    (work / "onnx" / f".model.onnx{fsutil.TMP_MARKER}dir" / "part").write_text("half")
    (work / ".reference-cache" / "entry.json").write_text("{}")
    (work / ".reference-cache" / f".entry2.json{fsutil.TMP_MARKER}abc").write_text("{")
    (work / "manifest.json").write_text("{}")
    out.mkdir()
    (out / "old.txt").write_text("old")
    publish(work, out)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        ".reference-cache", ".reference-cache/entry.json", "manifest.json", "onnx"]
