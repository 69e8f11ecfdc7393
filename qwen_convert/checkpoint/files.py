"""A local model directory: its config and its safetensors weights (single file or sharded).

Opening a checkpoint validates everything cheaply (headers only), so conversion never starts on a
directory that would fail half way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qwen_convert.errors import SourceError, WeightsError

from .safetensors_io import SafetensorsFile, TensorInfo, read_header

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


@dataclass(frozen=True)
class Checkpoint:
    root: Path
    config: dict
    files: tuple[SafetensorsFile, ...]
    index: dict | None  # parsed model.safetensors.index.json when sharded

    @property
    def sharded(self) -> bool:
        return self.index is not None

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        out: dict[str, TensorInfo] = {}
        for f in self.files:
            out.update(f.tensors)
        return out

    @property
    def architectures(self) -> list[str]:
        return list(self.config.get("architectures") or [])


def load_config(root: Path | str) -> dict:
    root = Path(root)
    if not root.exists():
        raise SourceError(f"{root} does not exist", "pass a local model directory or a hub id")
    if not root.is_dir():
        raise SourceError(f"{root} is not a directory", "pass the model directory, not a file in it")
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise SourceError(f"{root} has no config.json", "pass a Hugging Face-format model directory")
    try:
        return json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"{cfg_path} is not valid JSON ({exc})", "re-download the model") from exc


def pickle_files(root: Path) -> list[Path]:
    return sorted(p for p in Path(root).iterdir() if p.suffix in PICKLE_SUFFIXES)


def open_checkpoint(root: Path | str) -> Checkpoint:
    """Config + validated safetensors headers. Refuses pickle-only checkpoints outright."""
    root = Path(root)
    config = load_config(root)
    index_path = root / INDEX_FILE
    single = root / SINGLE_FILE
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            weight_map: dict[str, str] = index["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise WeightsError(f"{index_path} is malformed ({exc})", "re-download the model") from exc
        files = []
        for shard in sorted(set(weight_map.values())):
            shard_path = root / shard
            if not shard_path.is_file():
                raise WeightsError(f"{index_path.name} names shard {shard}, which is missing", "re-download the model")
            files.append(read_header(shard_path))
        by_name = {f.path.name: f for f in files}
        for tensor, shard in weight_map.items():
            if tensor not in by_name[shard].tensors:
                raise WeightsError(f"{index_path.name} places {tensor} in {shard}, which does not hold it", "re-download the model")
        return Checkpoint(root, config, tuple(files), index)
    if single.is_file():
        return Checkpoint(root, config, (read_header(single),), None)
    others = sorted(root.glob("*.safetensors"))
    if len(others) == 1:
        return Checkpoint(root, config, (read_header(others[0]),), None)
    pickles = pickle_files(root)
    if pickles:
        raise WeightsError(
            f"{root} has only pickle weights ({', '.join(p.name for p in pickles)}); qconv never loads pickle files",
            "convert them to safetensors with a trusted tool first, or download the safetensors release",
        )
    raise WeightsError(f"{root} has no safetensors weights", "download the model's model.safetensors files")
