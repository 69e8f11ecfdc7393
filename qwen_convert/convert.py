"""`qconv seqcls`: a causal Qwen3-Reranker -> one-logit Qwen3ForSequenceClassification, streamed.

No torch model is built. Tensors are copied byte for byte from the source safetensors into the output
(in the kernel where possible), `lm_head.weight` is dropped, and `score.weight` [1, hidden] =
W[yes] - W[no] is computed in float32 from the two rows read by seeking. Peak memory is the tokenizer
plus two rows of the head, whatever the model size.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .checkpoint import INDEX_FILE, SINGLE_FILE, Checkpoint, open_checkpoint
from .errors import SourceError, WeightsError
from .fsutil import atomic_output_dir, check_output_dir
from .progress import NULL, Reporter
from .reranker import RerankerTokens, open_tokenizer, reranker_tokens
from .resolve import resolve_model
from .safetensors_io import DTYPE_CODES, OutTensor, SafetensorsFile, TensorInfo, encode, read_rows, write_safetensors
from .scoring import check_qwen3
from .sidecars import Provenance, seqcls_card, seqcls_config, write_sidecars
from .validate import check_checkpoint

LM_HEAD = "lm_head.weight"
EMBED = "model.embed_tokens.weight"
SCORE = "score.weight"
SCORE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ConvertOptions:
    score_dtype: str = "float32"  # storage dtype of score.weight; bf16 costs ~1e-3 of parity
    force: bool = False  # replace a non-empty OUT


@dataclass(frozen=True)
class ConversionResult:
    out: Path
    provenance: Provenance
    hidden_size: int
    shards: tuple[str, ...]
    tensors: int  # tensors written, score.weight included
    weight_bytes: int  # bytes of tensor data written
    files: tuple[str, ...] = field(default=())
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "out": str(self.out),
            **self.provenance.to_dict(),
            "hidden_size": self.hidden_size,
            "shards": list(self.shards),
            "tensors": self.tensors,
            "weight_bytes": self.weight_bytes,
            "files": list(self.files),
            "seconds": round(self.seconds, 3),
        }

    def render(self) -> str:
        p = self.provenance
        head = "embed_tokens (tied)" if p.tied else "lm_head"
        return "\n".join([
            f"wrote {self.out}",
            f"  source      {p.source} ({p.source_kind})",
            f"  score head  W[yes={p.yes_id}] - W[no={p.no_id}] from {head}, stored {p.score_dtype}, shape [1, {self.hidden_size}]",
            f"  pad id      {p.pad_id}",
            f"  weights     {self.tensors} tensors, {self.weight_bytes / 2**20:.1f} MiB in {len(self.shards)} file(s)",
            f"  time        {self.seconds:.2f} s",
        ])


# --- checks ------------------------------------------------------------------------------------

def check_causal_qwen3(ckpt: Checkpoint) -> None:
    """Refuse anything that is not an unconverted Qwen3 causal LM, naming what it is instead."""
    check_qwen3(ckpt.config, ckpt.root)
    archs = ckpt.architectures
    if any(a.endswith("ForSequenceClassification") for a in archs) or SCORE in ckpt.tensors:
        raise SourceError(
            f"{ckpt.root} is already a sequence-classification model (it has a score head)",
            "use it as is, or pass the original causal Qwen3-Reranker",
        )
    if archs and not any(a.endswith("ForCausalLM") for a in archs):
        raise SourceError(f"{ckpt.root} has architectures {archs}", "expected Qwen3ForCausalLM")


def read_reranker_tokens(root: Path) -> RerankerTokens:
    """yes/no/pad ids of a model directory, validated as single real tokens (from tokenizer.json
    alone where there is one: transformers' AutoTokenizer imports torch, ~400 MB resident, which
    would break the conversion's memory bound)."""
    return reranker_tokens(open_tokenizer(root))


def head_tensor(ckpt: Checkpoint) -> tuple[TensorInfo, bool]:
    """The matrix whose rows are the output token vectors, and whether it is the tied embedding."""
    tensors = ckpt.tensors
    if LM_HEAD in tensors:
        return tensors[LM_HEAD], False
    if EMBED not in tensors:
        raise WeightsError(f"{ckpt.root} has neither {LM_HEAD} nor {EMBED}", "this is not a complete Qwen3 checkpoint")
    if ckpt.config.get("tie_word_embeddings") is False:
        raise WeightsError(
            f"{ckpt.root} has untied embeddings but no {LM_HEAD}",
            "the checkpoint is incomplete; re-download it",
        )
    return tensors[EMBED], True


def score_row(head: TensorInfo, tokens: RerankerTokens, dtype: str) -> bytes:
    rows = read_rows(head, [tokens.yes_id, tokens.no_id])  # float32, exact for bf16/fp16/fp32 sources
    diff = rows[0].astype(np.float32) - rows[1].astype(np.float32)
    return encode(diff, DTYPE_CODES[dtype])


# --- conversion --------------------------------------------------------------------------------

def _out_name(ckpt: Checkpoint, f: SafetensorsFile) -> str:
    """Shards keep their names; a lone weights file (whatever it was called) becomes model.safetensors."""
    return f.path.name if ckpt.sharded else SINGLE_FILE


def _layout(ckpt: Checkpoint, head: TensorInfo, score: OutTensor) -> dict[str, list[OutTensor]]:
    """Output file name -> tensors in source byte order; score.weight joins the head's file."""
    out: dict[str, list[OutTensor]] = {}
    for f in ckpt.files:
        name = _out_name(ckpt, f)
        tensors = sorted(f.tensors.values(), key=lambda t: t.start)
        out[name] = [OutTensor(t.name, t.dtype, t.shape, source=t) for t in tensors if t.name != LM_HEAD]
        if f.path == head.file:
            out[name].append(score)
    return out


def convert_to_seqcls(src: str | Path, out: str | Path, options: ConvertOptions = ConvertOptions(), reporter: Reporter = NULL) -> ConversionResult:
    """Convert the causal reranker at SRC into a seq-cls directory at OUT (atomically)."""
    started = time.perf_counter()
    if options.score_dtype not in SCORE_DTYPES:
        raise SourceError(f"unknown score dtype {options.score_dtype}", f"choose one of {', '.join(SCORE_DTYPES)}")
    out = Path(out)
    check_output_dir(out, options.force)  # fail before any download or read
    resolved = resolve_model(src, reporter=reporter)
    if out.resolve() == Path(resolved.path).resolve():
        raise SourceError(f"OUT {out} is the source directory", "choose a new OUT; the original is needed for `qconv verify`")
    ckpt = open_checkpoint(resolved.path)
    check_causal_qwen3(ckpt)
    tokens = read_reranker_tokens(ckpt.root)
    check_checkpoint(ckpt, tokens)  # config vs tensor shapes, from headers, before OUT exists
    head, tied = head_tensor(ckpt)
    if len(head.shape) != 2 or max(tokens.yes_id, tokens.no_id) >= head.shape[0]:
        raise WeightsError(
            f"{head.name} has shape {list(head.shape)}, too small for token ids yes={tokens.yes_id}, no={tokens.no_id}",
            "the tokenizer does not belong to these weights",
        )
    hidden = head.shape[1]
    code = DTYPE_CODES[options.score_dtype]
    score = OutTensor(SCORE, code, (1, hidden), data=score_row(head, tokens, options.score_dtype))
    layout = _layout(ckpt, head, score)
    source_metadata = {_out_name(ckpt, f): f.metadata for f in ckpt.files}

    provenance = Provenance(
        source=str(src), source_kind=resolved.source, revision=resolved.revision,
        yes_id=tokens.yes_id, no_id=tokens.no_id, pad_id=tokens.pad_id, tied=tied,
        score_dtype=options.score_dtype, qconv_version=__version__,
    )
    total = sum(t.nbytes for tensors in layout.values() for t in tensors)
    reporter.log(f"converting {resolved.path} -> {out} ({total / 2**20:.1f} MiB, head from {'embed_tokens (tied)' if tied else 'lm_head'})")
    task = reporter.task("seqcls", total=total)
    with atomic_output_dir(out, options.force) as tmp:
        weight_map: dict[str, str] = {}
        for name, tensors in layout.items():
            metadata = dict(source_metadata[name])
            metadata.setdefault("format", "pt")  # transformers refuses safetensors without it
            write_safetensors(tmp / name, tensors, metadata, on_bytes=task.advance)
            weight_map.update({t.name: name for t in tensors})
        if ckpt.sharded:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        config = seqcls_config(ckpt.config, tokens)
        files = write_sidecars(tmp, ckpt.root, config, provenance, card=seqcls_card(provenance, out.name))
    return ConversionResult(
        out=out, provenance=provenance, hidden_size=hidden, shards=tuple(layout),
        tensors=len(weight_map), weight_bytes=total,
        files=tuple(sorted(set(files) | set(layout) | ({INDEX_FILE} if ckpt.sharded else set()))),
        seconds=time.perf_counter() - started,
    )
