"""resolve_model(SRC) -> a local directory. The one place every command turns SRC into files.

Order: an existing local path is used as is (never touching the network); `qconv:NAME` is a model
shipped inside the package; anything shaped like a hub id (`org/name`) goes to the downloader
(ModelScope first, then Hugging Face).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from qwen_convert.errors import SourceError
from qwen_convert.progress import NULL, Reporter

from .download import HUB_ID

BUILTIN_PREFIX = "qconv:"
BUILTINS = {"tiny-reranker": "data/tiny-reranker", "tiny-chat-lm": "data/tiny-chat-lm"}


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    source: str  # local | builtin | modelscope | huggingface
    model_id: str | None = None
    revision: str | None = None  # branch/tag asked for (per hub: master on ModelScope, main on Hugging Face)
    commit: str | None = None  # resolved commit, where the hub gives one (Hugging Face)

    def to_dict(self) -> dict:
        return {"path": str(self.path), "source": self.source, "model_id": self.model_id,
                "revision": self.revision, "commit": self.commit}


def builtin_path(name: str) -> Path:
    if name not in BUILTINS:
        known = ", ".join(BUILTIN_PREFIX + k for k in BUILTINS)
        raise SourceError(f"unknown built-in model {BUILTIN_PREFIX}{name}", f"built-in models: {known}")
    path = Path(str(resources.files("qwen_convert").joinpath(BUILTINS[name])))
    if not (path / "config.json").is_file():
        raise SourceError(f"built-in model {BUILTIN_PREFIX}{name} is missing from this install", "reinstall qconv")
    return path


def resolve_model(src: str | Path, *, source: str | None = None, revision: str | None = None,
                  offline: bool = False, reporter: Reporter = NULL) -> ResolvedModel:
    text = str(src)
    path = Path(text).expanduser()
    if path.exists():
        return ResolvedModel(path, "local")
    if text.startswith(BUILTIN_PREFIX):
        return ResolvedModel(builtin_path(text[len(BUILTIN_PREFIX):]), "builtin", text)
    if isinstance(src, str) and HUB_ID.match(text):  # HUB_ID's first character already excludes ./ and ~/
        from .download import DownloadOptions, download_model

        result = download_model(text, DownloadOptions(source=source, revision=revision, offline=offline), reporter=reporter)
        return ResolvedModel(result.path, result.source, text, result.revision, result.commit)
    raise SourceError(f"{text} does not exist", "pass an existing model directory, a hub id like Qwen/Qwen3-Reranker-0.6B, or qconv:tiny-reranker")
