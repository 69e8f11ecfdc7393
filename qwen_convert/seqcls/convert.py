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

from qwen_convert.checkpoint.files import INDEX_FILE, SINGLE_FILE, Checkpoint, open_checkpoint
from qwen_convert.checkpoint.heads import LM_HEAD, SCORE, head_tensor, read_reranker_tokens, score_row
from qwen_convert.checkpoint.kind import check_causal_qwen3
from qwen_convert.checkpoint.safetensors_io import DTYPE_CODES, OutTensor, SafetensorsFile, TensorInfo, write_safetensors
from qwen_convert.checkpoint.validate import check_checkpoint
from qwen_convert.errors import SourceError, WeightsError
from qwen_convert.formats import SCORE_DTYPES
from qwen_convert.fsutil import atomic_output_dir, check_output_dir
from qwen_convert.hub.resolve import resolve_model
from qwen_convert.progress import NULL, Reporter

from .. import __version__
from .sidecars import Provenance, seqcls_card, seqcls_config, write_sidecars


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
