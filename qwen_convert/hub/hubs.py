"""The hubs qconv downloads from, behind one interface: list a revision's files, fetch them into the
client's own cache, find them there offline, and describe a client's failure in one line.
ModelScope (modelscope-hub) and Hugging Face (huggingface_hub); `HUBS` registers them by name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from qwen_convert.progress import Reporter

# Top-level files conversion needs; everything else in a repository is left on the hub.
WANTED = (
    "config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "tokenizer.model", "chat_template.json", "*.jinja", "README.md",
)


LIST_TIMEOUT_S = 30  # Hugging Face listing call; HF_HUB_ETAG_TIMEOUT overrides it


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class Listing:
    files: tuple[RemoteFile, ...]
    commit: str | None = None


_quiet_lock = threading.Lock()


_quiet_depth = 0


_saved_bars: dict = {}


@contextlib.contextmanager
def _progress_to_reporter() -> Iterator[None]:
    """Keep the clients' own tqdm bars off the terminal while the reporter draws (restored after).

    Reference-counted so overlapping downloads in threads restore the original state exactly once.
    """
    global _quiet_depth
    with _quiet_lock:
        if _quiet_depth == 0:
            _silence_client_bars()
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0:
                _restore_client_bars()


def _silence_client_bars() -> None:
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars
    from tqdm.auto import tqdm

    class Silent(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    _saved_bars["hf_disabled"] = are_progress_bars_disabled()
    disable_progress_bars()
    # modelscope-hub logs every step and failure on stderr; qconv reports the same facts once, in its
    # own error (QCONV_DEBUG=1 keeps the client's log).
    ms_logger = logging.getLogger("modelscope_hub")
    _saved_bars["ms_level"] = ms_logger.level
    if not os.environ.get("QCONV_DEBUG"):
        ms_logger.setLevel(logging.CRITICAL)
    try:
        # modelscope-hub draws a bar per file with a module-level tqdm and offers no switch for it.
        import modelscope_hub._download as ms_download

        _saved_bars["ms"] = (ms_download, ms_download.tqdm)
        ms_download.tqdm = Silent
    except (ImportError, AttributeError):
        pass


def _restore_client_bars() -> None:
    from huggingface_hub.utils import enable_progress_bars

    logging.getLogger("modelscope_hub").setLevel(_saved_bars.pop("ms_level", logging.NOTSET))
    module, original = _saved_bars.pop("ms", (None, None))
    if module is not None:
        module.tqdm = original
    if not _saved_bars.pop("hf_disabled", True):
        enable_progress_bars()


class Hub:
    """What download_model needs from a hub; one subclass per hub, registered in HUBS."""

    name: str

    def endpoint(self) -> str: ...
    def cache_dir(self) -> Path: ...
    def list(self, model_id: str, revision: str) -> Listing: ...
    def fetch(self, model_id: str, revision: str, commit: str | None, files: list[RemoteFile], reporter: Reporter) -> Path: ...
    def cached(self, model_id: str, revision: str) -> Path: ...
    def cached_commit(self, path: Path) -> str | None: ...

    def forget(self, path: Path) -> None:
        path.unlink(missing_ok=True)

    def describe(self, exc: Exception) -> str:
        return _describe(exc, self.endpoint(), self.cache_dir())


def _describe(exc: BaseException, endpoint: str, cache: Path) -> str:
    """One short line for an exception from a hub client: what went wrong, and where."""
    import requests

    response = getattr(exc, "response", None)
    status = getattr(exc, "status_code", None) or getattr(response, "status_code", None)
    kind = type(exc).__name__
    text = " ".join(str(exc).split())
    if kind in ("LocalEntryNotFoundError", "CacheNotFound", "OfflineModeIsEnabled"):
        return f"not in the local cache ({cache})"
    if status == 404:
        return f"not found at {endpoint} (HTTP 404)"
    if status:
        return f"HTTP {status} from {endpoint}"
    # requests (modelscope, huggingface_hub < 1.0) and httpx (huggingface_hub >= 1.0) name a body
    # that stopped half way differently.
    if (isinstance(exc, requests.exceptions.ChunkedEncodingError) or kind == "RemoteProtocolError"
            or "IncompleteRead" in text):
        return f"transfer from {endpoint} was cut off ({text[:120]}); run again to resume it"
    if isinstance(exc, requests.Timeout) or kind == "RequestTimeoutError" or "timed out" in text.lower():
        return f"timed out talking to {endpoint}"
    if isinstance(exc, requests.ConnectionError) or kind in ("NetworkError", "ConnectError"):
        return f"cannot connect to {endpoint}"
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{kind}: {text}" if text else kind


class ModelScopeHub(Hub):
    name = "modelscope"

    def endpoint(self) -> str:
        from modelscope_hub.config import HubConfig
        from modelscope_hub.constants import DEFAULT_ENDPOINT

        configured = self._configured_endpoint()
        return HubConfig.normalize_endpoint(configured) if configured else DEFAULT_ENDPOINT

    @staticmethod
    def _configured_endpoint() -> str | None:
        # Read at call time: modelscope's own default config is a process-wide singleton.
        return os.environ.get("MODELSCOPE_ENDPOINT") or os.environ.get("MODELSCOPE_DOMAIN") or None

    def cache_dir(self) -> Path:
        configured = os.environ.get("MODELSCOPE_CACHE")
        if configured:
            return Path(configured).expanduser()
        from modelscope_hub.config import HubConfig

        return HubConfig().cache_dir

    def _api(self):
        from modelscope_hub import HubApi

        configured = self._configured_endpoint()
        return HubApi(endpoint=self.endpoint() if configured else None)

    def list(self, model_id: str, revision: str) -> Listing:
        entries = self._api().list_repo_files(model_id, "model", revision=revision, recursive=True)
        files = tuple(RemoteFile(e.path, e.size, e.sha256) for e in entries if not e.is_dir and e.path)
        return Listing(files, None)

    def fetch(self, model_id: str, revision: str, commit: str | None, files: list[RemoteFile], reporter: Reporter) -> Path:
        from modelscope.hub.snapshot_download import snapshot_download
        from modelscope_hub import ProgressCallback

        class ToReporter(ProgressCallback):
            def __init__(self, filename: str, file_size: int):
                super().__init__(filename, file_size)
                self.task = reporter.task(f"modelscope {filename}", total=file_size or None)

            def update(self, size: int) -> None:
                self.task.advance(size)

        configured = self._configured_endpoint()
        with _progress_to_reporter():
            path = snapshot_download(
                model_id, revision=revision, cache_dir=str(self.cache_dir()),
                allow_patterns=[_literal(f.name) for f in files],
                endpoint=self.endpoint() if configured else None,
                progress_callbacks=[ToReporter], max_workers=4,
            )
        return Path(path)

    def cached(self, model_id: str, revision: str) -> Path:
        from modelscope.hub.snapshot_download import snapshot_download

        return Path(snapshot_download(model_id, revision=revision, cache_dir=str(self.cache_dir()), local_files_only=True))

    def cached_commit(self, path: Path) -> str | None:
        return None  # ModelScope's cache is keyed by branch name; it records no commit

    def describe(self, exc: Exception) -> str:
        failed = getattr(exc, "failed_files", None)
        if failed:  # FileDownloadError: the client tried every file; name the ones that failed
            return "; ".join(f"{name}: {super(ModelScopeHub, self).describe(cause)}" for name, cause in sorted(failed.items()))
        return super().describe(exc)


class HuggingFaceHub(Hub):
    name = "huggingface"

    def endpoint(self) -> str:
        # HF_ENDPOINT is read now, not at huggingface_hub's import, so a mirror set later still counts.
        configured = os.environ.get("HF_ENDPOINT")
        if configured:
            return configured.rstrip("/")
        from huggingface_hub import constants

        return constants.ENDPOINT

    def cache_dir(self) -> Path:
        if os.environ.get("HF_HUB_CACHE"):
            return Path(os.environ["HF_HUB_CACHE"]).expanduser()
        if os.environ.get("HF_HOME"):
            return Path(os.environ["HF_HOME"]).expanduser() / "hub"
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE)

    def list(self, model_id: str, revision: str) -> Listing:
        from huggingface_hub import HfApi

        # huggingface_hub sends API calls without a timeout; a black-holed endpoint would hang forever.
        timeout = float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or LIST_TIMEOUT_S)
        info = HfApi(endpoint=self.endpoint()).model_info(model_id, revision=revision, files_metadata=True, timeout=timeout)
        files = tuple(
            RemoteFile(s.rfilename, s.size, s.lfs.sha256 if s.lfs is not None else None)
            for s in (info.siblings or [])
        )
        return Listing(files, info.sha)

    def fetch(self, model_id: str, revision: str, commit: str | None, files: list[RemoteFile], reporter: Reporter) -> Path:
        from huggingface_hub import snapshot_download
        from huggingface_hub.file_download import repo_folder_name
        from tqdm.auto import tqdm

        # huggingface_hub reports only "one more file done" to the tqdm class it accepts; turn that
        # into bytes by looking at which files have landed in the snapshot folder.
        snapshot = self.cache_dir() / repo_folder_name(repo_id=model_id, repo_type="model") / "snapshots" / (commit or "")
        sizes = {f.name: f.size or 0 for f in files}
        task = reporter.task(f"huggingface {model_id}", total=sum(sizes.values()) or None)
        done = 0

        class ToReporter(tqdm):
            def __init__(self, *args, **kwargs):
                kwargs["disable"] = True
                super().__init__(*args, **kwargs)

            def update(self, n=1):
                nonlocal done
                landed = sum(size for name, size in sizes.items() if commit and (snapshot / name).exists())
                task.advance(landed - done)
                done = landed

        with _progress_to_reporter():
            path = snapshot_download(
                model_id, revision=revision, cache_dir=str(self.cache_dir()), endpoint=self.endpoint(),
                allow_patterns=[_literal(f.name) for f in files], tqdm_class=ToReporter, max_workers=4,
            )
        return Path(path)

    def cached(self, model_id: str, revision: str) -> Path:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(
            model_id, revision=revision, cache_dir=str(self.cache_dir()), local_files_only=True,
            allow_patterns=list(WANTED),
        ))

    def cached_commit(self, path: Path) -> str | None:
        return path.name if path.parent.name == "snapshots" else None

    def forget(self, path: Path) -> None:
        # A snapshot entry is a symlink into blobs/: drop the blob too, or the re-run reuses it.
        if path.is_symlink():
            path.resolve().unlink(missing_ok=True)
        path.unlink(missing_ok=True)


def _literal(name: str) -> str:
    """A file name as an fnmatch pattern that matches only itself."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


HUBS: dict[str, type[Hub]] = {"modelscope": ModelScopeHub, "huggingface": HuggingFaceHub}
