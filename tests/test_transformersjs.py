"""transformers.js (node, @huggingface/transformers pinned in tests/js) on qconv's ONNX export.

The export of the embedded trained tiny reranker, in all five variants, is loaded by transformers.js
from a local path with remote models off, in every dtype it names (fp32, fp16, q8, q4, q4f16), and
its logits are held against onnxruntime-python running the same graph on the same token ids; the JS
tokenizer + chat template must give exactly the ids of qconv's PromptEncoder. The model card's
transformers.js snippet is run verbatim.

Needs `make js` (npm ci into tests/js/node_modules). Without it these tests skip, except under
CI=true, where a missing extra is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

JS_DIR = Path(__file__).resolve().parent / "js"
NODE_MODULES = JS_DIR / "node_modules" / "@huggingface" / "transformers"
QCONV = Path(sys.executable).with_name("qconv")

# transformers.js dtype -> qconv variant file. Same graph, same kernels (onnxruntime-node vs
# onnxruntime-python): measured bit-identical; the bounds leave room for the two ORT builds to differ.
DTYPES = {
    "fp32": ("model.onnx", 1e-5),  # relative
    "fp16": ("model_fp16.onnx", 1e-3),
    "q8": ("model_quantized.onnx", 1e-3),
    "q4": ("model_q4.onnx", 1e-3),
    "q4f16": ("model_q4f16.onnx", 1e-3),
}
PAIRS = [
    {"query": "What is the capital of China?", "document": "The capital of China is Beijing."},
    {"query": "What is the capital of China?", "document": "Gravity pulls objects toward the earth."},
    {"query": "how do plants make food", "document": "Photosynthesis turns light, water and CO2 into sugar in the chloroplasts of leaves. " * 3},
    {"query": "中国的首都是哪里？", "document": "北京是中华人民共和国的首都。 café naïve – “quotes” 🙂"},
    {"query": "  spaces\tand\ttabs  ", "document": "line one\n\nline two\r\n  indented"},
]
INSTRUCTION = "Given a question, find the passage that answers it"


def _require_js() -> None:
    missing = [what for what, ok in (("node", shutil.which("node")), ("tests/js/node_modules (run `make js`)", NODE_MODULES.is_dir())) if not ok]
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but transformers.js is not installed: missing {', '.join(missing)}")
        pytest.skip(f"transformers.js not installed: missing {', '.join(missing)}")


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    _require_js()
    out = tmp_path_factory.mktemp("tjs") / "tiny-onnx"
    # The default exporter, whichever it is; --no-verify because this test is the check.
    done = subprocess.run([str(QCONV), "export-onnx", "qconv:tiny-reranker", str(out), "--quantize", "all", "--no-verify", "--quiet"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return out


def _node(script: Path, *args: str, cwd: Path = JS_DIR) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(["node", str(script), *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, f"node failed:\n{done.stderr[-3000:]}"
    return done


def _run_js(model: Path, tmp_path: Path, instruction: str | None) -> dict:
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"model": str(model), "dtypes": list(DTYPES), "pairs": PAIRS, "instruction": instruction}), encoding="utf-8")
    return json.loads(_node(JS_DIR / "score.mjs", str(request)).stdout)


def _encoder(model: Path, instruction: str | None):
    from qwen_convert.reranker import DEFAULT_INSTRUCTION, PromptEncoder, load_tokenizer

    return PromptEncoder(load_tokenizer(model), instruction=instruction or DEFAULT_INSTRUCTION)


def _ort_logits(model: Path, file_name: str, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model / "onnx" / file_name), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input_ids": input_ids, "attention_mask": attention_mask})[0][:, 0].astype(np.float64)


@pytest.mark.parametrize("instruction", [None, INSTRUCTION], ids=["default-instruction", "custom-instruction"])
def test_transformersjs_matches_onnxruntime(export_dir, tmp_path, instruction):
    from qwen_convert.reranker import Pair

    js = _run_js(export_dir, tmp_path, instruction)
    assert js["versions"]["@huggingface/transformers"] == json.loads((JS_DIR / "package.json").read_text())["dependencies"]["@huggingface/transformers"]
    encoder = _encoder(export_dir, instruction)
    pairs = [Pair(p["query"], p["document"]) for p in PAIRS]

    # The JS tokenizer + shipped chat template give exactly qconv's prompt ids.
    assert js["ids"] == [encoder.ids(p) for p in pairs]

    # tokenizer_config.json pads left; the graph reads the last real token from the mask.
    batch = encoder.encode(pairs, padding_side="left")
    failures = []
    for dtype, (file_name, tol) in DTYPES.items():
        got = js["results"][dtype]
        assert "error" not in got, f"{dtype}: {got.get('error')}"
        ref_batch = _ort_logits(export_dir, file_name, batch.input_ids, batch.attention_mask)
        ref_single = np.array([_ort_logits(export_dir, file_name, e.input_ids, e.attention_mask)[0] for e in (encoder.encode([p]) for p in pairs)])
        for label, ref, cand in (("batch", ref_batch, np.array(got["batch"])), ("single", ref_single, np.array(got["single"]))):
            assert cand.shape == ref.shape == (len(PAIRS),)
            err = np.abs(cand - ref) / (np.abs(ref) if dtype == "fp32" else 1.0)
            if err.max() > tol:
                failures.append(f"{dtype} {label}: max {'rel' if dtype == 'fp32' else 'abs'} error {err.max():.3g} > {tol}")
        # A graph that ignores its input would pass the comparison above; the scores must rank.
        assert np.ptp(ref_batch) > 0.1, f"{dtype}: logits barely vary ({ref_batch})"
    assert not failures, "; ".join(failures)
    # Why the loading code uses PreTrainedModel: if this ever loads, the card can use the Auto class.
    assert "qwen3" in js["auto_seqcls"], js["auto_seqcls"]


def test_model_card_snippet_runs_verbatim(export_dir, tmp_path):
    """The README's transformers.js block, copied out unchanged, prints the q4f16 P(yes) onnxruntime gives."""
    from qwen_convert.reranker import Pair

    card = (export_dir / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```js\n(.*?)```", card, flags=re.S)
    assert len(blocks) == 1, "the card should hold one transformers.js block"
    snippet = JS_DIR / f".card-{os.getpid()}.mjs"  # inside tests/js so its imports resolve to node_modules
    snippet.write_text(blocks[0], encoding="utf-8")
    try:
        # The snippet names the export by its directory name, relative to where node runs.
        printed = _node(snippet, cwd=export_dir.parent).stdout.split()
    finally:
        snippet.unlink(missing_ok=True)
    dtype = re.search(r'dtype: "(\w+)"', blocks[0]).group(1)
    query, document = re.search(r'role: "query", content: "([^"]*)".*?role: "document", content: "([^"]*)"', blocks[0], flags=re.S).groups()
    encoded = _encoder(export_dir, None).encode([Pair(query, document)])
    ref = _ort_logits(export_dir, DTYPES[dtype][0], encoded.input_ids, encoded.attention_mask)[0]
    assert float(printed[-1]) == pytest.approx(1 / (1 + np.exp(-ref)), abs=1e-5)


def test_readme_shows_the_card_snippet():
    """README.md's transformers.js block is the tested card snippet for an export named `out`."""
    from qwen_convert.onnx.card import _TRANSFORMERSJS_SNIPPET

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    assert re.findall(r"```js\n(.*?)```", readme, flags=re.S) == [_TRANSFORMERSJS_SNIPPET.replace("NAME", "out")]
