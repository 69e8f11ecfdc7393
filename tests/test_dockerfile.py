"""The serving image's Dockerfile agrees with the package it installs and the CLI it runs.

No Docker daemon (and no registry for the python base image) is reachable where these tests run, so
the image is not built here. What can drift without a build is checked instead: the extra the RUN
line installs exists and is torch-free, every path the install reads is copied and not excluded by
.dockerignore, and the ENTRYPOINT + CMD, run as they are (model path, port and address swapped for a
tiny export, a free port and 127.0.0.1, the API key in the environment as `docker run -e` passes it), start `qconv
serve` so that the HEALTHCHECK command itself answers healthy while the other routes need the key.
The key is shown only as an environment variable (or a secret file), never as an argument or ENV.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import httpx
import pytest
import tomllib
from servers import QCONV, export, free_port, wait_for_health  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
TORCH = ("torch", "transformers", "optimum", "sentence-transformers")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", "\n".join(ln for ln in DOCKERFILE.splitlines() if not ln.lstrip().startswith("#")))
    return [tuple(ln.strip().split(None, 1)) for ln in text.splitlines() if ln.strip()]


def one(name: str) -> str:
    (arg,) = [a for i, a in instructions() if i == name]
    return arg


def extra_requirements(extra: str) -> list[str]:
    """An extra's requirements, with qconv[...] self-references expanded."""
    out = []
    for req in PYPROJECT["project"]["optional-dependencies"][extra]:
        m = re.fullmatch(r"qconv\[([\w,]+)\]", req)
        out += [r for e in m.group(1).split(",") for r in extra_requirements(e)] if m else [req]
    return out


def test_the_install_line_is_the_torch_free_serve_extra():
    run = [a for i, a in instructions() if i == "RUN" and "pip install" in a]
    assert len(run) == 1
    (extra,) = re.findall(r"'\.\[(\w+)\]'", run[0])
    assert extra == "serve" and "-c constraints.txt" in run[0]
    reqs = extra_requirements(extra) + PYPROJECT["project"]["dependencies"]
    names = {re.split(r"[<>=!\[ ;]", r, maxsplit=1)[0].lower() for r in reqs}
    assert {"onnxruntime", "fastapi", "uvicorn"} <= names and not names & set(TORCH)
    assert 'import torch' in run[0]  # the build fails if torch got in anyway
    # the Makefile's torch-free serving venv installs the same thing
    assert "pip install -q -c constraints.txt '.[serve]'" in (ROOT / "Makefile").read_text()
    assert re.fullmatch(r"python:3\.\d+-slim", one("FROM"))
    assert tuple(map(int, one("FROM").split(":")[1].split("-")[0].split("."))) >= (3, 10)  # requires-python


def test_what_the_install_reads_is_copied_and_not_ignored():
    copied = [w for a in (a for i, a in instructions() if i == "COPY") for w in shlex.split(a)[:-1]]
    needed = ["pyproject.toml", PYPROJECT["project"]["readme"], "constraints.txt", "qwen_convert"]
    assert all(n in copied for n in needed), copied
    rules = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")]

    def ignored(rel: str) -> bool:  # Docker's rule: the last matching pattern wins
        verdict = False
        for rule in rules:
            neg, pat = rule.startswith("!"), rule.lstrip("!").rstrip("/")
            if fnmatch(rel, pat) or rel.startswith(pat + "/") or (pat.startswith("**/") and fnmatch(Path(rel).name, pat[3:])):
                verdict = not neg
        return verdict

    package = [str(p.relative_to(ROOT)) for p in (ROOT / "qwen_convert").rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert package and not [p for p in package if ignored(p)]
    assert not [n for n in needed if ignored(n)]
    assert ignored(".venv/bin/python") and ignored("benchmarks/.work/x") and ignored("tests/test_serve.py")
    for data in ("qwen_convert/serve/static/index.html", "qwen_convert/templates", "qwen_convert/data"):
        assert (ROOT / data).exists() and not ignored(data)


def test_entrypoint_and_cmd_start_a_server_the_healthcheck_calls_healthy(export, tmp_path):
    entry, cmd = json.loads(one("ENTRYPOINT")), json.loads(one("CMD"))
    assert entry == ["qconv", "serve"] and cmd[0].startswith("/models/") and one("VOLUME") == '["/models"]'
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    health = json.loads(one("HEALTHCHECK").split("CMD", 1)[1])
    image_port = cmd[cmd.index("--port") + 1]
    assert f"127.0.0.1:{image_port}/health" in health[-1] and one("EXPOSE") == image_port

    port = str(free_port())
    # Everything as the image runs it but the model path, the port, and the address: a test binds loopback only.
    swap = {image_port: port, "0.0.0.0": "127.0.0.1"}
    argv = [QCONV, *entry[1:], str(export), *[swap.get(a, a) for a in cmd[1:]]]
    log = tmp_path / "serve.log"
    key = "image-test-key_0123456789"
    env = {k: v for k, v in os.environ.items() if not k.startswith("QCONV_")} | {key_env(): key}  # `docker run -e`
    with open(log, "wb") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, env=env)
    try:
        wait_for_health(proc, f"http://127.0.0.1:{port}", log, "the image's command", 60)
        probe = [sys.executable if health[0] == "python" else health[0], *health[1:-1], health[-1].replace(image_port, port)]
        assert subprocess.run(probe, timeout=30).returncode == 0  # the HEALTHCHECK sends no key: /health is open
        # the key in the environment guards the rest, and is not in the command line
        url = f"http://127.0.0.1:{port}/v1/models"
        assert httpx.get(url, timeout=10).status_code == 401
        assert httpx.get(url, headers={"Authorization": f"Bearer {key}"}, timeout=10).json()["data"][0]["variant"] == "int8"
        assert key.encode() not in Path(f"/proc/{proc.pid}/cmdline").read_bytes()
    finally:
        proc.terminate()
        proc.wait(30)
    # and fails once the server is gone, so the probe can tell
    assert subprocess.run(probe, timeout=30, capture_output=True).returncode != 0


def key_env() -> str:
    """The environment variable `qconv serve` reads its API key from (the CLI's own declaration)."""
    from typer.main import get_command

    from qwen_convert.cli import app

    (param,) = [p for p in get_command(app).commands["serve"].params if "--api-key" in getattr(p, "opts", [])]
    return param.envvar


def test_the_api_key_is_shown_as_an_environment_variable_never_an_argument():
    env = key_env()
    comments = [ln.lstrip("# ") for ln in DOCKERFILE.splitlines() if ln.lstrip().startswith("#")]
    runs = [ln for ln in comments if ln.startswith("docker run")]
    assert runs and all(f"-e {env} " in ln for ln in runs)  # every documented run passes the key
    assert f"{env}_FILE=/run/secrets/" in DOCKERFILE  # and the secret-file way
    # nothing the image runs or stores holds a key: no --api-key argument, no ENV with a key
    for instruction, args in instructions():
        assert "--api-key" not in args and "--admin-key" not in args, instruction
        assert not (instruction == "ENV" and "KEY" in args), args
    serving = (ROOT / "docs" / "serving.md").read_text()
    assert f"-e {env} " in serving and f"Authorization: Bearer ${env}" in serving


@pytest.mark.parametrize("option", ["--host", "--port", "--threads", "--max-length"])
def test_options_the_dockerfile_mentions_are_qconv_serve_options(option):
    from typer.main import get_command

    from qwen_convert.cli import app

    params = {o for p in get_command(app).commands["serve"].params for o in getattr(p, "opts", [])}
    assert option in DOCKERFILE and option in params
