"""A transformers-5 checkpoint, as optimum-onnx's transformers 4.x must see it.

optimum-onnx pins transformers < 4.58. transformers 5 saves RoPE as `rope_parameters` {rope_type,
rope_theta, <scaling keys>} with no top-level `rope_theta` / `rope_scaling`; transformers 4.x reads
only the top-level keys, so it would silently trace rope_theta = 10000 (Qwen3: 1e6) and the graph
would compute another function than the source. Both optimum call sites (the reranker's trace in
export.py, the causal LM's main_export in causal_lm.py) trace from `optimum_source(...)`: the source
itself, or a staged copy (symlinks to every file, config.json rewritten with the 4.x keys). The key
mapping itself is checkpoint/rope.py's, which qconv's own torch loads apply too.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from qwen_convert.checkpoint.rope import legacy_rope_keys, needs_legacy_keys
from qwen_convert.errors import ExportError, SourceError

STAGE_DIR = ".optimum-source"


@dataclass(frozen=True)
class OptimumSource:
    """The directory optimum traces, and what config.json needed for the installed transformers."""

    path: Path
    keys: dict  # the top-level 4.x keys written into the staged config.json; {} when traced as is
    transformers: str

    def settings(self) -> dict:
        """quantize_config.json's record of the adaptation ({} when there was none)."""
        if not self.keys:
            return {}
        return {"source_config_adapted": {
            "keys": self.keys, "from": "rope_parameters",
            "why": f"transformers {self.transformers} (optimum-onnx's) reads RoPE only from top-level "
                   "rope_theta / rope_scaling; the source config.json keeps it in rope_parameters (transformers 5)",
        }}


def optimum_rope_keys(config: dict, root: Path | str = "") -> dict:
    """checkpoint.rope.legacy_rope_keys, its refusal an export error that names the exporter that needs no 4.x keys."""
    try:
        return legacy_rope_keys(config, root)
    except SourceError as exc:
        raise ExportError(f"{exc.message}, and optimum-onnx traces with transformers 4.x",
                          "use --exporter builder, which reads rope_parameters itself") from exc


def check_optimum_source(config: dict, root: Path | str) -> None:
    """Refuse, before any work, a config the installed transformers cannot be given for optimum's trace."""
    if needs_legacy_keys():
        optimum_rope_keys(config, root)


@contextmanager
def optimum_source(src: Path, scratch: Path) -> Iterator[OptimumSource]:
    """src as the installed transformers must load it for optimum to trace the source's function:
    src itself, or scratch/.optimum-source (symlinks, config.json with the 4.x keys), removed after."""
    from importlib import metadata

    src = Path(src)
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    keys = optimum_rope_keys(config, src) if needs_legacy_keys() else {}
    version = metadata.version("transformers")
    if not keys:
        yield OptimumSource(src, {}, version)
        return
    staged = Path(scratch) / STAGE_DIR
    staged.mkdir()
    try:
        for item in src.iterdir():
            if item.name != "config.json":
                (staged / item.name).symlink_to(item.resolve())
        (staged / "config.json").write_text(json.dumps({**config, **keys}, indent=2) + "\n", encoding="utf-8")
        yield OptimumSource(staged, keys, version)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
