"""Denormals flushed on the threads that run qconv's onnxruntime sessions (scoring/denormals.py).

Each check runs in a fresh interpreter: onnxruntime sets the flags on the thread that creates the
first session of a process, and a new thread inherits its creator's, so this process's threads say
nothing once any test has opened a session.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from qwen_convert.onnx.export import ExportOptions, export_onnx
from qwen_convert.scoring.denormals import SESSION_CONFIG
from qwen_convert.scoring.onnx_scorers import session_options

X86_LINUX = sys.platform == "linux" and platform.machine().lower() in ("x86_64", "amd64")
# 1e-38 / 2 is a denormal: 0.0 where the calling thread flushes them.
HALF_OF_SMALL = "float(np.float32(1e-38) * np.float32(0.5))"


def run(code: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_session_is_made_with_denormals_flushed():
    opts = session_options(2)
    assert opts.get_session_config_entry(SESSION_CONFIG[0]) == "1"
    assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (2, 1)


@pytest.mark.skipif(not X86_LINUX, reason="the thread's own flags are set on x86-64 Linux only")
def test_flush_denormals_here_sets_the_calling_thread_only():
    out = run(f"""
import json, threading, numpy as np
from qwen_convert.scoring.denormals import flush_denormals_here
seen = {{}}
def worker():
    seen["before"] = {HALF_OF_SMALL}
    seen["set"] = flush_denormals_here()
    seen["after"] = {HALF_OF_SMALL}
t = threading.Thread(target=worker); t.start(); t.join()
print(json.dumps({{**seen, "main": {HALF_OF_SMALL}}}))
""")
    assert out["before"] > 0 and out["set"] is True and out["after"] == 0.0 and out["main"] > 0, out


@pytest.mark.skipif(not X86_LINUX, reason="the thread's own flags are set on x86-64 Linux only")
def test_serve_runs_sessions_on_a_thread_that_flushes():
    """The batcher's worker thread (where serve runs a model's sessions) flushes; the event loop's does not."""
    out = run(f"""
import json, numpy as np
from types import SimpleNamespace
from qwen_convert.serve.batcher import Batcher
from qwen_convert.serve.metrics import ServerMetrics
from qwen_convert.serve.options import ServeOptions
batcher = Batcher(SimpleNamespace(name="m", pad_id=0, engine=None, prefix=None), ServeOptions(), ServerMetrics())
worker = batcher._executor.submit(lambda: {HALF_OF_SMALL}).result()
print(json.dumps({{"worker": worker, "main": {HALF_OF_SMALL}}}))
""")
    assert out["worker"] == 0.0 and out["main"] > 0, out


def test_flushing_leaves_the_scores_as_they_were(tmp_path):
    """The shipped tiny reranker's fp32 graph on a left-padded batch (its padding bias puts denormals
    in the softmax), in a process whose sessions flush and in one whose sessions do not: same logits."""
    tiny = Path(str(resources.files("qwen_convert").joinpath("data/tiny-reranker")))
    export_onnx(tiny, tmp_path / "out", ExportOptions(verify=False, prefix_graphs=False))
    model = tmp_path / "out" / "onnx" / "model.onnx"
    rng = np.random.default_rng(3)
    ids = rng.integers(10, 1000, size=(4, 48)).tolist()
    mask = [[0] * 20 + [1] * 28, [1] * 48, [0] * 5 + [1] * 43, [0] * 40 + [1] * 8]
    code = """
import json, sys, numpy as np, onnxruntime as ort
from qwen_convert.scoring.onnx_scorers import session_options
opts = session_options(2) if sys.argv[1] == "flush" else ort.SessionOptions()
opts.intra_op_num_threads = 2
session = ort.InferenceSession(sys.argv[2], opts, providers=["CPUExecutionProvider"])
ids, mask = json.loads(sys.argv[3])
(logits,) = session.run(["logits"], {"input_ids": np.array(ids, np.int64), "attention_mask": np.array(mask, np.int64)})
print(json.dumps(logits.reshape(-1).tolist()))
"""
    results = {}
    for how in ("flush", "plain"):
        done = subprocess.run([sys.executable, "-c", code, how, str(model), json.dumps([ids, mask])],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        results[how] = np.array(json.loads(done.stdout.strip().splitlines()[-1]))
    assert results["flush"].shape == (4,)
    np.testing.assert_allclose(results["flush"], results["plain"], rtol=0, atol=1e-6)
