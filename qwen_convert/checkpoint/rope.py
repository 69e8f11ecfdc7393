"""A checkpoint's RoPE settings as the installed transformers must be given them.

transformers 5 saves RoPE as `rope_parameters` {rope_type, rope_theta, <scaling keys>} with no top-level
`rope_theta` / `rope_scaling`; transformers 4.x reads only the top-level keys, so it silently runs
rope_theta = 10000 (Qwen3: 1e6), another function than the checkpoint's. Whatever builds a transformers
config from a model directory (the torch scorers, the streamed engine, the causal LM's reference, the
optimum trace in onnx/optimum_compat.py) adds the 4.x keys here first. Under transformers >= 5 nothing changes.
"""

from __future__ import annotations

from pathlib import Path

from qwen_convert.errors import SourceError

from .files import load_config

# transformers 4.57's ROPE_INIT_FUNCTIONS (optimum-onnx 0.1's pin): the rope types a 4.x `rope_scaling` expresses.
LEGACY_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
TRANSFORMERS_5_HINT = "load it with transformers >= 5 (qconv's main install), which reads rope_parameters"


def legacy_rope_keys(config: dict, root: Path | str = "") -> dict:
    """The top-level transformers-4.x RoPE keys that `config` lacks but its `rope_parameters` holds
    ({} when none); SourceError where a 4.x config cannot express its rope type."""
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
            raise SourceError(f"{root}/config.json: rope_type {rope_type!r} (rope_parameters, transformers 5) has no "
                              "transformers 4.x form", TRANSFORMERS_5_HINT)
        keys["rope_scaling"] = scaling
    return keys


def needs_legacy_keys() -> bool:
    """transformers < 5 is installed (it reads RoPE from the top-level keys only)."""
    from importlib import metadata

    return int(metadata.version("transformers").split(".")[0]) < 5


def missing_rope_keys(path: Path | str) -> dict:
    """The keys the installed transformers needs added to PATH's config.json ({} under transformers >= 5)."""
    return legacy_rope_keys(load_config(path), path) if needs_legacy_keys() else {}


def transformers_config(path: Path | str):
    """AutoConfig.from_pretrained(PATH), with the RoPE of PATH's config.json under any transformers.

    The 4.x keys go through the config class's constructor, so its rope validation (and the
    rope_scaling `type` -> `rope_type` alias) runs on them as on a 4.x-saved config."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path))
    keys = missing_rope_keys(path)
    return type(config).from_dict({**config.to_dict(), **keys}) if keys else config


def pretrained_kwargs(path: Path | str) -> dict:
    """Extra `from_pretrained` arguments for a model at PATH: {"config": the adapted config} where the
    installed transformers would misread its RoPE, else {} (a transformers-5 load is left as it was)."""
    return {"config": transformers_config(path)} if missing_rope_keys(path) else {}
