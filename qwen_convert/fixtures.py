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
