"""`qconv inspect`: what a model directory is, read from its config, tokenizer and safetensors headers.

Nothing is loaded into memory beyond headers and the tokenizer, so inspecting an 8B checkpoint is
instant. Works on causal rerankers, seq-cls conversions and ONNX export directories.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qwen_convert.checkpoint.files import INDEX_FILE, load_config, open_checkpoint
from qwen_convert.checkpoint.validate import checkpoint_problems
from qwen_convert.hub.resolve import resolve_model

from .errors import QconvError
from .formats import ONNX_DIR

ONNX_SUFFIXES = (".onnx", ".onnx_data", ".onnx.data", ".data")


@dataclass(frozen=True)
class FileInfo:
    name: str  # relative to the model directory
    bytes: int


@dataclass(frozen=True)
class ModelInfo:
    path: str
    source: str  # local | builtin | modelscope | huggingface
    kind: str  # causal | seqcls | onnx
    architecture: str
    model_type: str | None
    already_seqcls: bool
    hidden_size: int | None
    num_hidden_layers: int | None
    vocab_size: int | None
    num_labels: int | None  # seq-cls only
    parameters: int | None  # from safetensors headers; None when there are none (ONNX only)
    dtypes: dict[str, int]  # storage dtype -> parameters in it
    head: str  # lm_head (untied) | embed_tokens (tied) | score [1, H] | none
    tied: bool | None
    sharded: bool
    yes_id: int | None
    no_id: int | None
    pad_id: int | None  # the tokenizer's
    config_pad_id: int | None  # what the model pools by (seq-cls)
    files: tuple[FileInfo, ...]
    total_bytes: int
    onnx_files: tuple[FileInfo, ...] = ()
    problems: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["files"] = [asdict(f) for f in self.files]
        d["onnx_files"] = [asdict(f) for f in self.onnx_files]
        d["problems"] = list(self.problems)
        return d

    def render(self) -> str:
        def ids(v):
            return "-" if v is None else str(v)

        dtypes = ", ".join(f"{k} ({v:,} params)" for k, v in self.dtypes.items()) or "-"
        rows = [
            ("path", self.path),
            ("kind", f"{self.kind}" + (" (already a seq-cls conversion)" if self.already_seqcls else "")),
            ("architecture", f"{self.architecture} ({self.model_type or '?'})"),
            ("shape", f"hidden {ids(self.hidden_size)}, layers {ids(self.num_hidden_layers)}, vocab {ids(self.vocab_size)}"
             + (f", labels {self.num_labels}" if self.num_labels is not None else "")),
            ("parameters", "-" if self.parameters is None else f"{self.parameters:,} ({_human(self.parameters, 1000)})"),
            ("dtype", dtypes),
            ("head", self.head),
            ("tokens", f"yes {ids(self.yes_id)}, no {ids(self.no_id)}, pad {ids(self.pad_id)}"
             + (f" (config pad {self.config_pad_id})" if self.config_pad_id is not None else "")),
            ("size", f"{_human(self.total_bytes, 1024)}B in {len(self.files)} files" + (" (sharded)" if self.sharded else "")),
        ]
        width = max(len(k) for k, _ in rows)
        lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
        if self.onnx_files:
            lines.append("onnx:")
            lines += [f"  {f.name}  {_human(f.bytes, 1024)}B" for f in self.onnx_files]
        lines.append("files:")
        lines += [f"  {f.name}  {_human(f.bytes, 1024)}B" for f in self.files]
        lines += [f"problem: {p}" for p in self.problems]
        return "\n".join(lines)


def _human(n: int, base: int) -> str:
    units = ["", "K", "M", "G", "T"]
    i = 0
    value = float(n)
    while value >= base and i < len(units) - 1:
        value /= base
        i += 1
    return f"{value:.0f}{units[i]}" if i == 0 else f"{value:.2f}{units[i]}"


def _files(root: Path) -> tuple[FileInfo, ...]:
    return tuple(
        FileInfo(str(p.relative_to(root)), p.stat().st_size)
        for p in sorted(root.rglob("*")) if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def inspect_model(src: str | Path) -> ModelInfo:
    """Describe a model directory (or hub id / qconv:NAME, resolved first)."""
    from qwen_convert.checkpoint.heads import EMBED, LM_HEAD, SCORE, read_reranker_tokens

    resolved = resolve_model(src)
    root = Path(resolved.path)
    config = load_config(root)
    files = _files(root)
    onnx_files = tuple(f for f in files if f.name.startswith(ONNX_DIR + "/") and f.name.endswith(ONNX_SUFFIXES))
    has_weights = (root / INDEX_FILE).is_file() or any(root.glob("*.safetensors"))
    problems: list[str] = []

    archs = list(config.get("architectures") or [])
    seqcls = any(a.endswith("ForSequenceClassification") for a in archs)
    parameters, dtypes, head, tied, sharded = None, {}, "none", None, False
    ckpt = None
    if has_weights or not onnx_files:
        ckpt = open_checkpoint(root)  # refuses pickle-only, truncated or corrupt weights
        tensors = ckpt.tensors
        sharded = ckpt.sharded
        parameters = sum(math.prod(t.shape) for t in tensors.values())
        for t in tensors.values():
            dtypes[t.dtype] = dtypes.get(t.dtype, 0) + math.prod(t.shape)
        seqcls = seqcls or SCORE in tensors
        if SCORE in tensors:
            head = f"score {list(tensors[SCORE].shape)} ({tensors[SCORE].dtype})"
        elif LM_HEAD in tensors:
            head, tied = "lm_head (untied)", False
        elif EMBED in tensors:
            head, tied = "embed_tokens (tied)", True
    tokens = None
    try:
        tokens = read_reranker_tokens(root)
        yes_id, no_id, pad_id = tokens.yes_id, tokens.no_id, tokens.pad_id
    except QconvError as exc:
        yes_id = no_id = pad_id = None
        problems.append(str(exc))
    if ckpt is not None:
        # inspect reports what seqcls/export-onnx would refuse (validate.check_checkpoint), every
        # disagreement on its own `problem:` line, instead of failing: it is the tool to look at a
        # broken checkpoint with.
        try:
            problems += checkpoint_problems(ckpt, tokens)
        except QconvError as exc:
            problems.append(str(exc))

    kind = "onnx" if onnx_files else ("seqcls" if seqcls else "causal")
    num_labels = None
    if seqcls:
        num_labels = config.get("num_labels") or len(config.get("id2label") or {}) or None
    return ModelInfo(
        path=str(root), source=resolved.source, kind=kind,
        architecture=", ".join(archs) or "unknown", model_type=config.get("model_type"),
        already_seqcls=seqcls, hidden_size=config.get("hidden_size"), num_hidden_layers=config.get("num_hidden_layers"),
        vocab_size=config.get("vocab_size"), num_labels=num_labels, parameters=parameters,
        dtypes=dict(sorted(dtypes.items(), key=lambda kv: -kv[1])), head=head, tied=tied, sharded=sharded,
        yes_id=yes_id, no_id=no_id, pad_id=pad_id, config_pad_id=config.get("pad_token_id") if seqcls else None,
        files=files, total_bytes=sum(f.bytes for f in files), onnx_files=onnx_files, problems=tuple(problems),
    )
