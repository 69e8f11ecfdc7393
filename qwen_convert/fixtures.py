"""Tiny Qwen3 rerankers built locally from a Qwen3Config: no hub, no download.

Used by the tests (tied/untied heads, single-file/sharded, fp32/bf16) and by anyone who wants to try
qconv offline. The tokenizer is the small Qwen-style one shipped in qwen_convert/data/tokenizer.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

TOKENIZER_DIR = "data/tokenizer"


def tokenizer_path() -> Path:
    return Path(str(resources.files("qwen_convert").joinpath(TOKENIZER_DIR)))


def copy_tokenizer(out: Path | str) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for f in tokenizer_path().iterdir():
        if f.is_file():
            shutil.copy2(f, out / f.name)


@dataclass(frozen=True)
class TinySpec:
    tied: bool = True
    sharded: bool = False
    dtype: str = "float32"  # storage dtype: float32 | bfloat16 | float16
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 128
    seed: int = 0
    max_shard_size: str = "200KB"


def tiny_config(spec: TinySpec, vocab_size: int, pad_id: int, eos_id: int):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=8192,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=spec.tied,
        bos_token_id=pad_id,
        eos_token_id=eos_id,
        architectures=["Qwen3ForCausalLM"],
        dtype=spec.dtype,
    )


def build_tiny_reranker(out: Path | str, spec: TinySpec = TinySpec()) -> Path:
    """Write a random tiny Qwen3ForCausalLM reranker (weights, config, tokenizer) to `out`."""
    import torch
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    out = Path(out)
    copy_tokenizer(out)
    tok = AutoTokenizer.from_pretrained(str(out))
    config = tiny_config(spec, len(tok), tok.pad_token_id, tok.eos_token_id)
    torch.manual_seed(spec.seed)
    model = Qwen3ForCausalLM(config)
    # Larger-than-init weights so the yes/no logits spread out and parity checks are meaningful.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    model = model.to(getattr(torch, spec.dtype))
    model.save_pretrained(str(out), safe_serialization=True, max_shard_size=spec.max_shard_size if spec.sharded else "10GB")
    if spec.sharded and not (out / "model.safetensors.index.json").exists():
        raise RuntimeError("tiny model did not shard; lower max_shard_size")
    cfg = json.loads((out / "config.json").read_text())
    cfg["architectures"] = ["Qwen3ForCausalLM"]
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


@dataclass(frozen=True)
class OutlierSpec:
    """An exact rescaling that gives a checkpoint the activation outliers real LLMs have (issue #19).

    For `channels` input channels of every RMSNorm that feeds linear layers, norm.weight[c] *= scale
    and the consumers' columns W[:, c] /= scale; for `channels` intermediate channels of every MLP,
    up_proj rows *= scale and down_proj columns /= scale. The function is unchanged in exact
    arithmetic (fp32: the logits move by rounding only), but those channels of the linear layers'
    inputs run `scale` times larger on every token: what breaks per-tensor activation ranges (int8)
    and round-to-nearest 4-bit blocks."""

    scale: float = 50.0
    channels: int = 3
    seed: int = 0


# norm (or producer) -> the linear layers whose input it scales, per decoder layer
_OUTLIER_GROUPS = (
    ("input_layernorm.weight", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm.weight", ("mlp.gate_proj", "mlp.up_proj")),
)


def inject_outliers(src: Path | str, out: Path | str, spec: OutlierSpec = OutlierSpec()) -> Path:
    """Copy the reranker at SRC to OUT with `spec`'s outlier channels (weights written as float32,
    so the rescaling itself adds no storage rounding). Loads the whole state dict: for the tiny and
    few-layer fixtures this is meant for, not for real checkpoints."""
    import numpy as np
    from safetensors.numpy import save_file
    from safetensors.torch import load_file

    src, out = Path(src), Path(out)
    config = json.loads((src / "config.json").read_text())
    # (torch reads bf16 shards, which numpy cannot; a fixture module stays below qwen_convert.checkpoint)
    tensors = {name: t.float().numpy() for f in sorted(src.glob("*.safetensors")) for name, t in load_file(str(f)).items()}
    rng = np.random.default_rng(spec.seed)
    hidden, inter = int(config["hidden_size"]), int(config["intermediate_size"])
    for i in range(int(config["num_hidden_layers"])):
        p = f"model.layers.{i}."
        for norm, consumers in _OUTLIER_GROUPS:
            c = rng.choice(hidden, spec.channels, replace=False)
            tensors[p + norm][c] *= spec.scale
            for linear in consumers:
                tensors[p + linear + ".weight"][:, c] /= spec.scale
        c = rng.choice(inter, spec.channels, replace=False)
        tensors[p + "mlp.up_proj.weight"][c, :] *= spec.scale
        tensors[p + "mlp.down_proj.weight"][:, c] /= spec.scale
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():  # config, tokenizer, template: everything but the weights
        if f.is_file() and not f.name.startswith("model") and f.suffix != ".safetensors":
            shutil.copy2(f, out / f.name)
    config["dtype"] = "float32"
    config.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
