"""A `qconv serve` process for tests: a tiny export, a torch blocker, start/stop on a free port.

Shared by test_serve.py and test_serve_browser.py (import the fixtures into the test module).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

QCONV = str(Path(sys.executable).with_name("qconv"))
STARTUP_SECONDS = 60
BLOCKED = ("torch", "transformers")
_EXPORTS: dict[Path, Path] = {}  # basetemp -> export: one export per test session, whichever module asks


@pytest.fixture(scope="session")
def export(tmp_path_factory) -> Path:
    """`qconv export-onnx qconv:tiny-reranker OUT --quantize int8` (fp32 + int8; parity is the tests' job)."""
    base = tmp_path_factory.getbasetemp()
    if base in _EXPORTS:
        return _EXPORTS[base]
    out = tmp_path_factory.mktemp("serve") / "tiny"
    subprocess.run([QCONV, "export-onnx", "qconv:tiny-reranker", str(out), "--quantize", "int8", "--no-verify", "--quiet"],
                   check=True, capture_output=True, timeout=600)
    _EXPORTS[base] = out
    return out


@pytest.fixture(scope="session")
def fp32_only(export, tmp_path_factory) -> Path:
    """The same export without its int8 graph: served by default as fp32 (tells the two apart)."""
    out = tmp_path_factory.mktemp("serve-fp32") / "tiny-fp32"
    shutil.copytree(export, out)
    (out / "onnx" / "model_quantized.onnx").unlink()
    return out


@pytest.fixture(scope="session")
def no_torch(tmp_path_factory) -> Path:
    """A PYTHONPATH entry whose torch and transformers raise on import."""
    root = tmp_path_factory.mktemp("no-torch")
    for name in BLOCKED:
        (root / name).mkdir()
        (root / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked: the serving path must not import it')\n")
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path):
        self.proc, self.url, self.log = proc, url, log

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kw)


def wait_for_health(proc: subprocess.Popen, url: str, log: Path, what: str, seconds: float, poll: float = 0.1) -> None:
    """Until GET url/health answers 200; fail with the log's tail if the process exits or time runs out."""
    deadline = time.monotonic() + seconds
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not up after {seconds} s:\n{log.read_text()[-3000:]}")
        time.sleep(poll)


@contextmanager
def serving(*args: str, block_torch: Path | None = None, env: dict | None = None, log_dir: Path):
    """Start `qconv serve ARGS` on a free port, wait for /health (bounded), always stop it."""
    port = free_port()
    environ = dict(os.environ, **(env or {}))
    if block_torch is not None:
        environ["PYTHONPATH"] = os.pathsep.join([str(block_torch), environ.get("PYTHONPATH", "")])
    log = log_dir / f"serve-{port}.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([QCONV, "serve", *args, "--port", str(port)], stdout=subprocess.DEVNULL, stderr=err, env=environ)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(proc, url, log, "qconv serve", STARTUP_SECONDS)
        yield Server(proc, url, log)
    finally:
        stop(proc, 20)


def stop(proc: subprocess.Popen, seconds: float) -> None:
    """SIGTERM (a server drains), then SIGKILL if it is still up after `seconds`."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def metric(server: Server, name: str, **labels) -> float:
    """One sample of /metrics, read with prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


