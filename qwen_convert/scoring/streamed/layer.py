"""The math of one Qwen3 decoder layer, and the per-batch inputs every layer shares.

Not a re-implementation: it is transformers' own Qwen3DecoderLayer (attention with q/k norms, RoPE,
GQA, SwiGLU MLP, RMSNorms), built once on the meta device and given each layer's fp32 tensors in
turn (`load_state_dict(assign=True)`: no second copy, strict names and shapes). The attention mask
and rotary embeddings come from the same transformers functions Qwen3Model.forward calls, with the
same attention implementation (sdpa), so a streamed pass is the full model's forward split by layer.
"""

from __future__ import annotations

from dataclasses import dataclass

ATTENTION = "sdpa"  # what from_pretrained picks on CPU; the streamed pass must run the same kernels


def prepare_config(config):
    """A copy of the model's config set up the way from_pretrained(dtype=float32) would run it."""
    import copy

    config = copy.deepcopy(config)
    config._attn_implementation = ATTENTION
    config.use_cache = False
    return config


def build_layer(config):
    """One Qwen3DecoderLayer with no storage: each layer's tensors are assigned by load_layer."""
    import torch
    from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer

    with torch.device("meta"):
        return Qwen3DecoderLayer(config, layer_idx=0).eval()


def layer_shapes(config) -> dict[str, tuple[int, ...]]:
    """Relative tensor name -> shape, for one decoder layer of this config."""
    return {name: tuple(t.shape) for name, t in build_layer(config).state_dict().items()}


def load_layer(layer, tensors: dict, index: int, config, sources: dict | None = None) -> None:
    """Give `layer` the tensors of decoder layer `index` (names relative to model.layers.N.); each
    linear whose weight is in `sources` (weights.FileMatrix, its tensor a meta one) reads it from
    there as it runs (Widening) and in linear_weight."""
    from qwen_convert.errors import WeightsError

    try:
        layer.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise WeightsError(f"decoder layer {index} does not match config.json ({first})",
                           "the config disagrees with the tensors; re-download or re-convert the model") from exc
    layer.attention_type = config.layer_types[index]
    layer.self_attn.layer_idx = index
    for name, source in (sources or {}).items():
        layer.get_submodule(name.removesuffix(".weight")).source = source


def linear_weight(module, rows=None, columns=None):
    """A linear's weight in fp32, wherever it is: its own tensor (any dtype), or its file source,
    read a chunk of rows at a time so that only the result is ever whole. `rows`: a slice or index
    tensor; `columns`: an index tensor (taken from each chunk as it is read). The same values either
    way: a stored bf16 widens exactly."""
    import torch

    source = getattr(module, "source", None)
    w = module.weight
    if source is None or w.device.type != "meta":
        w = w.detach()
        w = w if rows is None else w[rows]
        return (w if columns is None else w[:, columns]).float()
    if columns is None:
        return source.pick(rows if rows is not None else slice(None))
    if rows is not None:
        return source.pick(rows)[:, columns]
    return torch.cat([source.rows(a, b)[:, columns] for a, b in row_chunks(*source.shape)])


# fp32 bytes of the rows of a weight that one matmul takes at a time, wherever its rows come from (the
# checkpoint file, 4-bit codes, a held bf16 copy): a 0.6B matrix (at most 12 MiB) is one chunk, the same
# single matmul as nn.Linear's; an 8B MLP matrix (192 MiB in fp32) twelve.
ROW_CHUNK_BYTES = 16 << 20


def stored_weight(module):
    """A linear's weight as the checkpoint stores it (bf16: half of fp32): its own tensor, or read
    whole from its file source. Run through the module (Widening), it gives linear_weight's numbers."""
    source = getattr(module, "source", None)
    return source.stored() if source is not None and module.weight.is_meta else module.weight.detach()


def row_chunks(n: int, k: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of an [n, k] weight's rows, each at most ROW_CHUNK_BYTES in fp32."""
    step = max(1, ROW_CHUNK_BYTES // (4 * k))
    return [(a, min(n, a + step)) for a in range(0, n, step)]


class Widening:
    """Lets a layer's linears keep their weights compact, or not at all, and widen them to fp32 only
    while they run, a chunk of rows (output features) at a time (row_chunks): each chunk's outputs
    are F.linear on the same fp32 values as nn.Linear's own forward, and a weight of one chunk is that
    very call, bit for bit.

    Where a linear's rows come from, first match:
      * `widen_rows(start, stop, out)` (mixed.py: a rounded weight kept as its 4-bit codes);
      * its own weight when it is fp32 (a search's replaced weight, an fp32 checkpoint): used as is;
      * `source` (weights.FileMatrix) when its weight is on the meta device: read from the checkpoint;
      * its own weight as the checkpoint stores it (bf16: half of fp32), widened.
    A widened chunk goes into one scratch buffer (a fresh allocation per call cost twice the copy
    itself in page faults); close() drops it."""

    def __init__(self, layer):
        import types

        import torch

        self.linears = [m for m in layer.modules() if type(m) is torch.nn.Linear]
        self.scratch = None
        for module in self.linears:
            module.forward = types.MethodType(lambda m, x: self.forward(m, x), module)
            module.widening = self  # what runs it: smoothing.attention_forward hands such a linear its rows

    def forward(self, module, x):
        import torch
        from torch.nn.functional import linear

        fill, w = getattr(module, "widen_rows", None), module.weight
        bias = None if module.bias is None else module.bias.float()
        if fill is None and w.dtype == torch.float32 and not w.is_meta:
            return linear(x, w, bias)
        n, k = w.shape
        if fill is not None:
            rows = lambda a, b: fill(a, b, self._scratch(b - a, k))  # noqa: E731
        elif w.is_meta:
            rows = module.source.rows
        else:
            rows = lambda a, b: self._scratch(b - a, k).copy_(w[a:b])  # noqa: E731
        chunks = row_chunks(n, k)
        if len(chunks) == 1:
            return linear(x, rows(0, n), bias)
        out = torch.empty((*x.shape[:-1], n), dtype=x.dtype)
        for a, b in chunks:
            out[..., a:b] = linear(x, rows(a, b), None if bias is None else bias[a:b])
        return out

    def _scratch(self, rows: int, k: int):
        import torch

        if self.scratch is None or self.scratch.numel() < rows * k:
            self.scratch = torch.empty(rows * k)
        return self.scratch[:rows * k].view(rows, k)

    def close(self) -> None:
        self.scratch = None


@dataclass
class BatchInputs:
    """What every layer needs for one padded batch besides its hidden states."""

    masks: dict  # attention type -> mask (as Qwen3Model builds it)
    position_ids: object
    position_embeddings: tuple  # (cos, sin)


def batch_inputs(config, rotary, hidden, attention_mask, position_ids) -> BatchInputs:
    """Masks and rotary embeddings for one batch, built exactly as Qwen3Model.forward builds them."""
    import torch
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    kwargs = _mask_kwargs(create_causal_mask, config=config, embeds=hidden, attention_mask=attention_mask,
                          cache_position=torch.arange(hidden.shape[1]), position_ids=position_ids)
    masks = {"full_attention": create_causal_mask(**kwargs)}
    if "sliding_attention" in config.layer_types:
        masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
    return BatchInputs(masks, position_ids, rotary(hidden, position_ids))


def _mask_kwargs(create_mask, *, config, embeds, attention_mask, cache_position, position_ids) -> dict:
    """The mask builder's arguments under the names this transformers uses: 4.5x takes `input_embeds`,
    `cache_position` and `past_key_values`; 5.x `inputs_embeds` and `cache` (a required argument,
    with `past_key_values` a deprecated alias of it) and no `cache_position`."""
    import inspect

    params = inspect.signature(create_mask).parameters
    cache = "cache" if "cache" in params else "past_key_values"
    given = {"config": config, "input_embeds": embeds, "inputs_embeds": embeds, "attention_mask": attention_mask,
             "cache_position": cache_position, cache: None, "position_ids": position_ids}
    return {name: value for name, value in given.items() if name in params}


def run_layer(layer, hidden, inputs: BatchInputs):
    """hidden [batch, seq, hidden] through one decoder layer (fp32, no cache)."""
    return layer(hidden, attention_mask=inputs.masks[layer.attention_type], position_ids=inputs.position_ids,
                 position_embeddings=inputs.position_embeddings, use_cache=False)


def build_rotary(config):
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    return Qwen3RotaryEmbedding(config)


def build_norm(config, weight):
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    norm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
    norm.weight.data = weight
    return norm
