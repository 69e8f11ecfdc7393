"""Does config.json describe the tensors? Checked from safetensors headers alone, before anything is written.

A checkpoint whose config disagrees with its weights (vocab_size smaller than the embedding,
hidden_size different from the weights, a layer's tensor missing, an extra layer) would convert
"successfully" into a directory that transformers, vLLM or onnxruntime then refuse or, worse, run
wrong. Every expected tensor of a Qwen3 decoder is derived from the config here and compared with
what the headers say; no weight is read.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from qwen_convert.errors import SourceError, WeightsError
from qwen_convert.reranker import RerankerTokens

from .files import Checkpoint
from .heads import EMBED, LM_HEAD, SCORE

LAYER = re.compile(r"^model\.layers\.(\d+)\.")
HINT = "config.json and the weights disagree; use the config that came with these weights, or re-download the model"


@dataclass(frozen=True)
class Qwen3Dims:
    """The numbers of config.json that fix every tensor's shape."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    attention_bias: bool
    tied: bool

    @classmethod
    def from_config(cls, config: dict) -> Qwen3Dims:
        try:
            hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
            return cls(
                vocab=int(config["vocab_size"]), hidden=hidden, layers=int(config["num_hidden_layers"]), heads=heads,
                kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                intermediate=int(config["intermediate_size"]), attention_bias=bool(config.get("attention_bias", False)),
                tied=bool(config.get("tie_word_embeddings", False)),
            )
        except KeyError as exc:
            raise SourceError(f"config.json has no {exc.args[0]}", "pass a complete Qwen3 config.json") from exc
        except (TypeError, ValueError, ZeroDivisionError) as exc:
            raise SourceError(f"config.json has a non-numeric or zero size ({exc})", "pass a complete Qwen3 config.json") from exc


# Each tensor: (its shape from the dims, the config values that fix it, quoted in errors).
_VOCAB = "vocab_size {vocab}, hidden_size {hidden}"
_Q = "num_attention_heads {heads} x head_dim {head_dim}, hidden_size {hidden}"
_KV = "num_key_value_heads {kv_heads} x head_dim {head_dim}, hidden_size {hidden}"
_MLP = "intermediate_size {intermediate}, hidden_size {hidden}"
LAYER_TENSORS: dict[str, tuple] = {
    "input_layernorm.weight": (lambda d: (d.hidden,), "hidden_size {hidden}"),
    "self_attn.q_proj.weight": (lambda d: (d.heads * d.head_dim, d.hidden), _Q),
    "self_attn.k_proj.weight": (lambda d: (d.kv_heads * d.head_dim, d.hidden), _KV),
    "self_attn.v_proj.weight": (lambda d: (d.kv_heads * d.head_dim, d.hidden), _KV),
    "self_attn.o_proj.weight": (lambda d: (d.hidden, d.heads * d.head_dim), _Q),
    "self_attn.q_norm.weight": (lambda d: (d.head_dim,), "head_dim {head_dim}"),
    "self_attn.k_norm.weight": (lambda d: (d.head_dim,), "head_dim {head_dim}"),
    "post_attention_layernorm.weight": (lambda d: (d.hidden,), "hidden_size {hidden}"),
    "mlp.gate_proj.weight": (lambda d: (d.intermediate, d.hidden), _MLP),
    "mlp.up_proj.weight": (lambda d: (d.intermediate, d.hidden), _MLP),
    "mlp.down_proj.weight": (lambda d: (d.hidden, d.intermediate), _MLP),
}
BIAS_TENSORS: dict[str, tuple] = {  # attention_bias=true only (valid Qwen3, not the reranker's layout)
    "self_attn.q_proj.bias": (lambda d: (d.heads * d.head_dim,), _Q),
    "self_attn.k_proj.bias": (lambda d: (d.kv_heads * d.head_dim,), _KV),
    "self_attn.v_proj.bias": (lambda d: (d.kv_heads * d.head_dim,), _KV),
    "self_attn.o_proj.bias": (lambda d: (d.hidden,), "hidden_size {hidden}"),
}


def _expected(config: dict, tensors: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape config.json implies, the config values that imply it), in forward order."""
    d = Qwen3Dims.from_config(config)
    values = asdict(d)
    out = {EMBED: ((d.vocab, d.hidden), _VOCAB.format(**values))}
    per_layer = {**LAYER_TENSORS, **(BIAS_TENSORS if d.attention_bias else {})}
    for i in range(d.layers):
        for suffix, (shape, why) in per_layer.items():
            out[f"model.layers.{i}.{suffix}"] = (shape(d), why.format(**values))
    out["model.norm.weight"] = ((d.hidden,), f"hidden_size {d.hidden}")
    # The head follows the checkpoint: score [num_labels, hidden] for seq-cls, lm_head for an
    # untied causal model, nothing more for a tied one.
    if SCORE in tensors:
        labels = int(config.get("num_labels") or len(config.get("id2label") or {}) or 1)
        out[SCORE] = ((labels, d.hidden), f"num_labels {labels}, hidden_size {d.hidden}")
    elif LM_HEAD in tensors or not d.tied:
        out[LM_HEAD] = ((d.vocab, d.hidden), _VOCAB.format(**values))
    return out


def expected_tensors(config: dict, tensors: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor a Qwen3 checkpoint with this config must hold, and its shape, in forward order."""
    return {name: shape for name, (shape, _) in _expected(config, tensors).items()}


def _shape(shape) -> str:
    return "[" + ", ".join(str(n) for n in shape) + "]"


def checkpoint_problems(ckpt: Checkpoint, tokens: RerankerTokens | None = None) -> list[str]:
    """Every disagreement between config.json, the tensors' shapes and the token ids, one line each."""
    config, tensors = ckpt.config, ckpt.tensors
    dims = Qwen3Dims.from_config(config)
    problems = []
    for name, (want, why) in _expected(config, tensors).items():
        info = tensors.get(name)
        if info is None:
            problems.append(f"{name} is missing; config.json ({why}) expects shape {_shape(want)}")
        elif tuple(info.shape) != want:
            problems.append(f"{name} has shape {_shape(info.shape)} but config.json ({why}) expects {_shape(want)}")
    layer_of = {name: int(m.group(1)) for name in tensors if (m := LAYER.match(name))}
    extra = sorted({i for i in layer_of.values() if i >= dims.layers})
    if extra:
        first = min(name for name, i in layer_of.items() if i == extra[0])
        problems.append(f"{first} belongs to layer {extra[0]}, but config.json has num_hidden_layers {dims.layers} "
                        f"(extra layers: {', '.join(map(str, extra))})")
    ids = {} if tokens is None else {"yes": tokens.yes_id, "no": tokens.no_id, "pad": tokens.pad_id}
    if isinstance(config.get("pad_token_id"), int):
        ids["config pad_token_id"] = config["pad_token_id"]
    rows = tensors[EMBED].shape[0] if EMBED in tensors and tensors[EMBED].shape else dims.vocab
    for what, tok in ids.items():
        if not 0 <= tok < min(dims.vocab, rows):
            problems.append(f"{what} token id {tok} is outside the vocabulary ({EMBED} {_shape(tensors[EMBED].shape) if EMBED in tensors else '-'}, "
                            f"vocab_size {dims.vocab})")
    return problems


def check_checkpoint(ckpt: Checkpoint, tokens: RerankerTokens | None = None) -> None:
    """Raise WeightsError (one line: the first disagreement, and how many more) unless config and tensors agree."""
    problems = checkpoint_problems(ckpt, tokens)
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise WeightsError(f"{ckpt.root}: {problems[0]}{more}", HINT)


def check_model_dir(path) -> None:
    """check_checkpoint for a causal or seq-cls model directory, with its tokenizer's yes/no/pad ids."""
    from .files import open_checkpoint
    from .heads import read_reranker_tokens  # convert imports this module

    check_checkpoint(open_checkpoint(path), read_reranker_tokens(path))
