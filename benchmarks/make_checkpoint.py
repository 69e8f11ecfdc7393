"""Write real-shaped random Qwen3-Reranker checkpoints without building a torch model.

Tensors are streamed to disk from a small pool of random bf16 values (numpy only), so a 2 GB
checkpoint costs a few seconds and ~50 MB of memory. The tokenizer is the package's small one: the
yes/no ids come from it and sit well inside the real 151669-row vocabulary, which is all a
conversion needs.

    python benchmarks/make_checkpoint.py 0.6b benchmarks/.work/qwen3-reranker-0.6b
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qwen_convert.fixtures import copy_tokenizer  # noqa: E402
from qwen_convert.reranker import load_tokenizer  # noqa: E402


@dataclass(frozen=True)
class Shape:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    tied: bool
    max_shard_bytes: int  # 0: one model.safetensors


SHAPES = {
    # Qwen/Qwen3-Reranker-0.6B, exactly (single 1.19 GB file, tied head).
    "0.6b": Shape(151669, 1024, 28, 16, 8, 128, 3072, tied=True, max_shard_bytes=0),
    # Qwen/Qwen3-0.6B (the query-expansion chat model): the reranker's shape with its 151936-row vocabulary.
    "0.6b-chat": Shape(151936, 1024, 28, 16, 8, 128, 3072, tied=True, max_shard_bytes=0),
    # Qwen3-Reranker-4B widths (hidden 2560, 32/8 heads, intermediate 9728) with 4 of its 36 layers
    # and an untied head, sharded like the hub release: the big-vocabulary, wide case in 2.4 GB.
    "4b-wide-untied": Shape(151669, 2560, 4, 32, 8, 128, 9728, tied=False, max_shard_bytes=1 << 30),
    # Qwen3-Reranker-8B widths (hidden 4096, 32/8 heads, head_dim 128, intermediate 12288, untied)
    # with 4 of its 36 layers: 2.0B parameters, 4.1 GB in bf16. The wide case of issues #8/#9.
    "8b-wide": Shape(151669, 4096, 4, 32, 8, 128, 12288, tied=False, max_shard_bytes=4 << 30),
    # Qwen3-Reranker-8B, every layer: 8.2B parameters, 16.4 GB in bf16, sharded like the release.
    "8b": Shape(151669, 4096, 36, 32, 8, 128, 12288, tied=False, max_shard_bytes=4 << 30),
}
POOL_VALUES = 1 << 23  # 16 MiB of random bf16 reused at shifting offsets


def tensor_specs(s: Shape) -> list[tuple[str, tuple[int, ...]]]:
    q, kv = s.num_attention_heads * s.head_dim, s.num_key_value_heads * s.head_dim
    specs = [("model.embed_tokens.weight", (s.vocab_size, s.hidden_size))]
    for i in range(s.num_hidden_layers):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (s.hidden_size,)),
            (p + "self_attn.q_proj.weight", (q, s.hidden_size)),
            (p + "self_attn.k_proj.weight", (kv, s.hidden_size)),
            (p + "self_attn.v_proj.weight", (kv, s.hidden_size)),
            (p + "self_attn.o_proj.weight", (s.hidden_size, q)),
            (p + "self_attn.q_norm.weight", (s.head_dim,)),
            (p + "self_attn.k_norm.weight", (s.head_dim,)),
            (p + "post_attention_layernorm.weight", (s.hidden_size,)),
            (p + "mlp.gate_proj.weight", (s.intermediate_size, s.hidden_size)),
            (p + "mlp.up_proj.weight", (s.intermediate_size, s.hidden_size)),
            (p + "mlp.down_proj.weight", (s.hidden_size, s.intermediate_size)),
        ]
    specs.append(("model.norm.weight", (s.hidden_size,)))
    if not s.tied:
        specs.append(("lm_head.weight", (s.vocab_size, s.hidden_size)))
    return specs


def _pool(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    values = (rng.standard_normal(POOL_VALUES, dtype=np.float32) * 0.02).view(np.uint32)
    return ((values >> 16).astype("<u2")).tobytes()  # truncate to bf16: fine for random data


def _write_file(path: Path, specs: list[tuple[str, tuple[int, ...]]], pool: bytes, offset: int) -> int:
    header, cursor = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in specs:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [cursor, cursor + n]}
        cursor += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape in specs:
            remaining = int(np.prod(shape)) * 2
            if name.endswith("norm.weight"):
                f.write(np.full(shape, 0x3F80, dtype="<u2").tobytes())  # bf16 1.0, as initialised
                continue
            while remaining:
                start = (offset % len(pool)) & ~1  # even: a bf16 value never straddles two pool values (odd starts made NaN/inf)
                chunk = pool[start: start + remaining]
                f.write(chunk)
                remaining -= len(chunk)
                offset += len(chunk) + 4098  # shift so tensors do not repeat each other exactly
    return cursor


def make_checkpoint(shape_name: str, out: Path, seed: int = 0) -> Path:
    s = SHAPES[shape_name]
    out.mkdir(parents=True, exist_ok=True)
    copy_tokenizer(out)
    tok = load_tokenizer(out)
    specs = tensor_specs(s)
    pool = _pool(seed)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for spec in specs:
        n = int(np.prod(spec[1])) * 2
        if s.max_shard_bytes and groups[-1] and size + n > s.max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += n
    if s.max_shard_bytes:
        weight_map, total = {}, 0
        for i, group in enumerate(groups, 1):
            name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
            total += _write_file(out / name, group, pool, offset=i * 7919)
            weight_map.update({t: name for t, _ in group})
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    else:
        _write_file(out / "model.safetensors", specs, pool, offset=0)
    config = {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
        "vocab_size": s.vocab_size, "hidden_size": s.hidden_size, "intermediate_size": s.intermediate_size,
        "num_hidden_layers": s.num_hidden_layers, "num_attention_heads": s.num_attention_heads,
        "num_key_value_heads": s.num_key_value_heads, "head_dim": s.head_dim,
        "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0,
        "max_position_embeddings": 40960, "max_window_layers": s.num_hidden_layers,
        "rms_norm_eps": 1e-6, "rope_scaling": None, "rope_theta": 1000000, "initializer_range": 0.02,
        "sliding_window": None, "use_sliding_window": False, "use_cache": True,
        "tie_word_embeddings": s.tied, "torch_dtype": "bfloat16",
        "bos_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    path = make_checkpoint(args.shape, args.out)
    size = sum(p.stat().st_size for p in path.iterdir())
    print(f"{path}: {size / 2**30:.2f} GiB", file=sys.stderr)


if __name__ == "__main__":
    main()
