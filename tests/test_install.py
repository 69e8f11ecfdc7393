"""Installing qconv next to a user's stack: `pip install 'qconv[all]'` into a venv that already holds
transformers 5.x, sentence-transformers 6.x and torch changes none of them.

The venv is a scratch one whose site-packages holds the *metadata* (dist-info) of torch, transformers,
sentence-transformers and every package they depend on, copied from the venv running the tests:
pip's resolver decides what to install, upgrade or downgrade from installed metadata alone, so this
is the user's venv as pip sees it, without copying gigabytes of torch. pip then resolves qconv[all]
(a wheel built from this checkout) against it with `--dry-run --report`: nothing is installed, and
only the package index is contacted. Before optimum-onnx became the separate `optimum` extra this
resolve downgraded transformers to 4.57.6 and sentence-transformers to 5.7.0.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import venv
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
STACK = ("torch", "transformers", "sentence-transformers")
# What pip prints when it cannot reach an index: then the test cannot say anything (outside CI).
UNREACHABLE = re.compile(r"NewConnectionError|Failed to establish a new connection|Temporary failure in name "
                         r"resolution|Network is unreachable|ProxyError|Could not fetch URL")

pytestmark = [pytest.mark.registry, pytest.mark.slow]


def _closure(names) -> list[metadata.Distribution]:
    """The installed distributions `names` need (their requirements without extras, markers evaluated)."""
    seen: dict[str, metadata.Distribution] = {}
    todo = list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        dist = metadata.distribution(name)
        seen[name] = dist
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return sorted(seen.values(), key=lambda d: canonicalize_name(d.metadata["Name"]))


def _user_venv(root: Path) -> tuple[Path, dict[str, str]]:
    """A venv holding (as pip sees it) the stack of the venv running the tests; its python, and what it holds."""
    venv.EnvBuilder(with_pip=False).create(root)
    python = root / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    held = {}
    for dist in _closure(STACK):
        info = next(Path(dist.locate_file(f)).parent for f in dist.files if f.name == "METADATA")  # .dist-info
        shutil.copytree(info, site / info.name)
        held[canonicalize_name(dist.metadata["Name"])] = dist.version
    return python, held


def _qconv_wheel(out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)],
                   check=True, capture_output=True, text=True)
    (wheel,) = out.glob("qconv-*.whl")
    return wheel


def test_qconv_all_installs_beside_transformers_5_sentence_transformers_6_and_torch_without_changing_them(tmp_path):
    stack = {name: metadata.version(name) for name in STACK}
    if not (stack["transformers"].startswith("5.") and stack["sentence-transformers"].startswith("6.")):
        message = f"this venv holds {stack}, not transformers 5.x and sentence-transformers 6.x (make install)"
        pytest.fail(message) if os.environ.get("CI") == "true" else pytest.skip(message)
    python, held = _user_venv(tmp_path / "user-venv")
    assert {name: held[name] for name in STACK} == stack
    wheel = _qconv_wheel(tmp_path / "wheel")
    report = tmp_path / "report.json"
    # No -c constraints.txt: what a user's plain `pip install 'qconv[all]'` does.
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--dry-run", "--quiet",
                           "--report", str(report), f"qconv[all] @ {wheel.as_uri()}"],
                          capture_output=True, text=True, timeout=600)
    if done.returncode and UNREACHABLE.search(done.stderr) and os.environ.get("CI") != "true":
        pytest.skip(f"no package index reachable: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr
    install = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    # A real resolve: qconv itself and what convert/serve add that the user's venv lacked.
    assert install["qconv"] == "0.1.0"
    assert {"onnx", "onnxruntime", "fastapi", "uvicorn", "modelscope"} <= install.keys()
    changed = {name: (held[name], install[name]) for name in held if name in install}
    assert changed == {}, f"pip would replace what the user's venv holds (held, new): {changed}"
    assert "optimum-onnx" not in install and "optimum" not in install
