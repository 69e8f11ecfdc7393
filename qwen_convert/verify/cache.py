"""Scores computed once, kept on disk, reused while nothing they depend on has changed.

Two kinds of entry share one directory: the causal reference's scores, and each candidate's (a
seq-cls checkpoint, or one variant of an ONNX export), so re-verifying unchanged artifacts scores
nothing again; the gates are always re-applied to the numbers. The key is a sha256 over everything
the numbers depend on:
  * the checkpoint: sha256 of config.json and of every tokenizer file (small), and for each
    safetensors file its name, size, mtime and the sha256 of its header (tensor names, dtypes,
    shapes, offsets). Hashing 16 GB of weights on every `verify` would cost minutes, so the weight
    bytes themselves are trusted by size + mtime + header, as make and rsync trust them: a download,
    re-conversion or copy changes the mtime; an in-place edit that keeps size, header and mtime is
    the one change it misses (delete the cache directory, or pass --no-cache, after one);
  * the exact inputs: the token ids and attention masks of every padded batch on every padding side,
    which covers the pairs, the instruction, the template, the max length, the tokenizer, the batch
    size and the batch order; plus those settings in readable form;
  * what computes: the engine (transformers, streamed or onnxruntime) and the versions of qconv,
    torch, transformers, numpy and onnxruntime, plus onnxruntime's thread count.
A candidate's key holds its artifact the same way: a seq-cls checkpoint as above, an ONNX variant as
the sha256 of its export's small files (config, tokenizer, quantize_config.json) and the name, size
and mtime of the .onnx file and of every external data file it names, plus the variant's name.
An entry is a JSON file named by the key, holding the key material and a checksum of its scores. An
entry whose name, key material or checksum does not match, or that cannot be read, is never used:
`lookup` says why in one line and the caller recomputes and overwrites it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qwen_convert.checkpoint.rope import missing_rope_keys
from qwen_convert.reranker import EncodedBatch

FORMAT = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "added_tokens.json", "chat_template.jinja", "generation_config.json")
CACHE_ENV = "QCONV_CACHE_DIR"


def default_cache_dir() -> Path:
    """$QCONV_CACHE_DIR, else $XDG_CACHE_HOME/qconv/reference, else ~/.cache/qconv/reference."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "qconv" / "reference"


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def checkpoint_identity(path: Path | str) -> dict:
    """What identifies a checkpoint cheaply and safely (see the module docstring)."""
    import struct

    from qwen_convert.checkpoint.files import open_checkpoint

    root = Path(path)
    checkpoint = open_checkpoint(root)
    small = {}
    for name in ("config.json", *TOKENIZER_FILES):
        f = root / name
        if f.is_file():
            small[name] = _sha256_bytes(f.read_bytes())
    files = []
    for sf in checkpoint.files:
        st = sf.path.stat()
        with open(sf.path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = fh.read(n)
        files.append({"name": sf.path.name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "header_sha256": _sha256_bytes(header)})
    return {"files": small, "weights": files}


def inputs_digest(batches: Mapping[str, Sequence[EncodedBatch]]) -> str:
    h = hashlib.sha256()
    for side, side_batches in batches.items():
        h.update(side.encode() + b"\0")
        for b in side_batches:
            h.update(np.asarray(b.input_ids.shape, dtype=np.int64).tobytes())
            h.update(np.ascontiguousarray(b.input_ids, dtype=np.int64).tobytes())
            h.update(np.ascontiguousarray(b.attention_mask, dtype=np.int64).tobytes())
    return h.hexdigest()


def _versions(libraries: Sequence[str] = ("torch", "transformers", "numpy")) -> dict:
    from qwen_convert.versions import library_versions

    from .. import __version__

    libs = library_versions()
    return {"qconv": __version__, **{k: libs.get(k) for k in libraries}}


def _file_stat(f: Path) -> dict:
    st = f.stat()
    return {"name": f.name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def onnx_identity(onnx_path: Path | str) -> dict:
    """An ONNX variant's identity (see the module docstring): the export's small files by content, the
    graph and its external data by name, size and mtime."""
    from qwen_convert.scoring.onnx_scorers import external_data_files

    onnx_path = Path(onnx_path)
    root = onnx_path.parent.parent  # OUT/onnx/model_*.onnx -> OUT
    small = {}
    for name in ("config.json", "quantize_config.json", *TOKENIZER_FILES):
        for f in (root / name, onnx_path.parent / name):
            if f.is_file():
                small[str(f.relative_to(root))] = _sha256_bytes(f.read_bytes())
    return {"files": small, "graph": _file_stat(onnx_path),
            "data": [_file_stat(f) for f in external_data_files(onnx_path)]}


def reference_key(path: Path | str, batches: Mapping[str, Sequence[EncodedBatch]], engine: str, settings: Mapping) -> dict:
    """The key material of a reference computation; `settings`: instruction, max length ... (readable)."""
    return {"format": FORMAT, "checkpoint": checkpoint_identity(path), "inputs": inputs_digest(batches),
            "engine": engine, "settings": dict(settings), "versions": _versions(), **_rope_adapted(path)}


def candidate_key(path: Path | str, name: str, precision: str, onnx_path: Path | None, threads: int | None,
                  batches: Mapping[str, Sequence[EncodedBatch]], engine: str, settings: Mapping) -> dict:
    """The key material of one candidate's scores: an ONNX variant (`onnx_path`) or a torch checkpoint."""
    if onnx_path is not None:
        artifact = onnx_identity(onnx_path)
        libraries: tuple[str, ...] = ("numpy", "onnxruntime")
    else:
        artifact = checkpoint_identity(path)
        libraries = ("torch", "transformers", "numpy")
    return {"format": FORMAT, "role": "candidate", "artifact": artifact, "name": name, "precision": precision,
            "inputs": inputs_digest(batches), "engine": engine, "threads": threads, "settings": dict(settings),
            "versions": _versions(libraries), **({} if onnx_path is not None else _rope_adapted(path))}


def _rope_adapted(path: Path | str) -> dict:
    """The RoPE keys a torch load under transformers 4.x adds to a transformers-5 config (checkpoint/rope.py),
    in the key only when there are any: scores cached before qconv added them were computed with
    rope_theta 10000 and must not be reused; every other key stays as it was."""
    keys = missing_rope_keys(path)
    return {"rope_adapted": keys} if keys else {}


def _digest(material: Mapping) -> str:
    return _sha256_bytes(json.dumps(material, sort_keys=True, default=str).encode())


def _scores_checksum(scores: Mapping[str, list]) -> str:
    return _sha256_bytes(json.dumps(scores, sort_keys=True).encode())


@dataclass(frozen=True)
class Lookup:
    scores: dict[str, np.ndarray] | None  # None: compute (miss, or an entry that cannot be trusted)
    status: str  # hit | miss | stale | corrupt
    path: Path
    reason: str = ""  # for stale/corrupt: one line


@dataclass(frozen=True)
class ScoreCache:
    root: Path

    def entry(self, material: Mapping) -> Path:
        return self.root / f"{_digest(material)[:40]}.json"

    def lookup(self, material: Mapping, sizes: Mapping[str, int]) -> Lookup:
        """The cached scores for `material`, if an intact entry with exactly this key exists."""
        path = self.entry(material)
        if not path.is_file():
            return Lookup(None, "miss", path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            stored = data["scores"]
            if data.get("checksum") != _scores_checksum(stored):
                return Lookup(None, "corrupt", path, "its checksum does not match its scores")
            if data.get("key") != _digest(material) or data.get("material") != json.loads(json.dumps(material, default=str)):
                return Lookup(None, "stale", path, "its key does not match this checkpoint and these inputs")
            scores = {side: np.array([np.nan if v is None else v for v in stored[side]], dtype=np.float64) for side in sizes}
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            return Lookup(None, "corrupt", path, f"it cannot be read ({type(exc).__name__})")
        if any(scores[side].shape != (n,) for side, n in sizes.items()):
            return Lookup(None, "corrupt", path, "it holds the wrong number of scores")
        return Lookup(scores, "hit", path)

    def store(self, material: Mapping, scores: Mapping[str, np.ndarray], extra: Mapping | None = None) -> Path:
        from qwen_convert.fsutil import atomic_output_file

        path = self.entry(material)
        # null: a pair that side did not score (verify's padding probe); strict JSON has no NaN
        stored = {side: [float(v) if np.isfinite(v) else None for v in values] for side, values in scores.items()}
        data = {"key": _digest(material), "material": material, "checksum": _scores_checksum(stored),
                "scores": stored, **dict(extra or {})}
        with atomic_output_file(path) as tmp:
            tmp.write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")
        return path
