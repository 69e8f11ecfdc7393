"""A transformers-5 checkpoint, as optimum-onnx's transformers 4.x must see it.

optimum-onnx pins transformers < 4.58. transformers 5 saves RoPE as `rope_parameters` {rope_type,
rope_theta, <scaling keys>} with no top-level `rope_theta` / `rope_scaling`; transformers 4.x reads
only the top-level keys, so it would silently trace rope_theta = 10000 (Qwen3: 1e6) and the graph
would compute another function than the source. Both optimum call sites (the reranker's trace in
export.py, the causal LM's main_export in causal_lm.py) trace from `optimum_source(...)`: the source
itself, or a staged copy (symlinks to every file, config.json rewritten with the 4.x keys).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from qwen_convert.errors import ExportError

# transformers 4.57's ROPE_INIT_FUNCTIONS (optimum-onnx 0.1's pin): the rope types a 4.x `rope_scaling` expresses.
LEGACY_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
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


def legacy_rope_keys(config: dict, root: Path | str = "") -> dict:
    """The top-level transformers-4.x RoPE keys that `config` lacks but its `rope_parameters` holds
    ({} when none); raises where a 4.x config cannot express its rope type."""
    params = config.get("rope_parameters")
    if not isinstance(params, dict):
        return {}
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    keys = {}
    if "rope_theta" not in config and "rope_theta" in params:
        keys["rope_theta"] = params["rope_theta"]
    if rope_type != "default" and not config.get("rope_scaling"):
        if rope_type not in LEGACY_ROPE_TYPES:
            raise ExportError(f"{root}/config.json: rope_type {rope_type!r} (rope_parameters, transformers 5) has no "
                              "transformers 4.x form, and optimum-onnx traces with transformers 4.x",
                              "use --exporter builder, which reads rope_parameters itself")
        keys["rope_scaling"] = scaling
    return keys


def needs_legacy_keys() -> bool:
    """transformers < 5 is installed (it reads RoPE from the top-level keys only)."""
    from importlib import metadata

    return int(metadata.version("transformers").split(".")[0]) < 5


def check_optimum_source(config: dict, root: Path | str) -> None:
    """Refuse, before any work, a config the installed transformers cannot be given for optimum's trace."""
    if needs_legacy_keys():
        legacy_rope_keys(config, root)


@contextmanager
def optimum_source(src: Path, scratch: Path) -> Iterator[OptimumSource]:
    """src as the installed transformers must load it for optimum to trace the source's function:
    src itself, or scratch/.optimum-source (symlinks, config.json with the 4.x keys), removed after."""
    from importlib import metadata

    src = Path(src)
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    keys = legacy_rope_keys(config, src) if needs_legacy_keys() else {}
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
