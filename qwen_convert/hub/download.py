"""download_model(id) -> a verified local directory. ModelScope first, then Hugging Face.

Why this order: many users are in China, where ModelScope is fast and huggingface.co is slow or
blocked; `HF_ENDPOINT` (a mirror such as hf-mirror.com) covers the rest. `--source` or the
QCONV_SOURCE environment variable picks one hub or changes nothing (`auto`).

What happens for each source, in order, until one succeeds:
1. list the repository (sizes, and sha256 where the hub gives them) at the requested revision;
2. choose only what conversion needs (config, safetensors + index, tokenizer, templates, README):
   pickle weights are never requested, and a repository that only has them is refused;
3. fetch those files with the hub's own client (its cache, resume and atomic writes), holding a
   per-model file lock so concurrent runs do not trip over each other;
4. verify: sizes, sha256 where known, every safetensors header against its file size, every shard
   the index names. A bad file is deleted from the cache and reported by name, so a re-run
   re-fetches exactly that file.
A source that fails (not found, server error, refused connection, timeout, integrity) is recorded
and the next one is tried; if none succeeds the error lists what each one said.

Offline (`--offline`, HF_HUB_OFFLINE=1 or TRANSFORMERS_OFFLINE=1): only the caches are consulted,
never the network; files are still checked (headers, index, and against the sha256 recorded when
they were downloaded).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from qwen_convert.checkpoint.files import INDEX_FILE, PICKLE_SUFFIXES, open_checkpoint
from qwen_convert.errors import DownloadError, QconvError
from qwen_convert.fsutil import sha256_file
from qwen_convert.progress import NULL, Reporter

from .hubs import HUBS, WANTED, Hub, RemoteFile

# `org/name`: what resolve_model sends to the hubs.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SOURCES = ("modelscope", "huggingface")
SOURCE_ENV = "QCONV_SOURCE"
# ModelScope calls its default branch `master`, Hugging Face `main`.
DEFAULT_REVISION = {"modelscope": "master", "huggingface": "main"}
STATE_DIR = ".qconv"  # inside each hub cache: per-model locks and verification stamps


@dataclass(frozen=True)
class DownloadOptions:
    source: str | None = None  # auto | modelscope | huggingface; None -> $QCONV_SOURCE, else auto
    revision: str | None = None  # branch, tag or commit; main/master are mapped per hub
    local_dir: Path | None = None  # also place a copy of the verified files here
    offline: bool = False  # caches only (also HF_HUB_OFFLINE=1)


@dataclass(frozen=True)
class SourceAttempt:
    source: str
    error: str
    hint: str | None = None  # set when the source answered and qconv refused what it had


@dataclass(frozen=True)
class DownloadResult:
    model_id: str
    path: Path
    source: str
    revision: str
    commit: str | None
    endpoint: str | None
    files: tuple[str, ...]
    total_bytes: int
    offline: bool = False
    failed: tuple[SourceAttempt, ...] = ()  # sources tried before the one that served it
    cache_path: Path | None = None

    def to_dict(self) -> dict:
        return {
            "model_id": self.model_id, "path": str(self.path), "source": self.source,
            "revision": self.revision, "commit": self.commit, "endpoint": self.endpoint,
            "files": list(self.files), "total_bytes": self.total_bytes, "offline": self.offline,
            "failed_sources": [{"source": a.source, "error": a.error} for a in self.failed],
            "cache_path": str(self.cache_path) if self.cache_path else None,
        }

    def render(self) -> str:
        rev = self.revision + (f" ({self.commit})" if self.commit and self.commit != self.revision else "")
        how = "from cache (offline)" if self.offline else f"from {self.endpoint or self.source}"
        lines = [
            f"{self.model_id}: {len(self.files)} files, {self.total_bytes / 1e6:.1f} MB, verified",
            f"  source:   {self.source} {how}",
            f"  revision: {rev}",
            f"  path:     {self.path}",
        ]
        lines += [f"  skipped:  {a.source}: {a.error}" for a in self.failed]
        return "\n".join(lines)


@dataclass
class _Fetched:
    path: Path
    revision: str
    commit: str | None
    files: list[RemoteFile] = field(default_factory=list)


# --- public entry points ------------------------------------------------------------------------

def source_order(source: str | None) -> tuple[str, ...]:
    choice = (source or os.environ.get(SOURCE_ENV) or "auto").strip().lower()
    aliases = {"ms": "modelscope", "hf": "huggingface", "hub": "huggingface"}
    choice = aliases.get(choice, choice)
    if choice == "auto":
        return SOURCES
    if choice in SOURCES:
        return (choice,)
    raise DownloadError(f"unknown source {choice!r}", f"use one of auto, {', '.join(SOURCES)} (--source or {SOURCE_ENV})")


def map_revision(source: str, revision: str | None) -> str:
    """The other hub's default branch name means this hub's default branch."""
    if revision in (None, "", "main", "master"):
        return DEFAULT_REVISION[source]
    return revision


def is_offline(options: DownloadOptions) -> bool:
    # huggingface_hub itself goes offline on either variable; agreeing with it keeps messages true.
    return options.offline or _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")


def download_model(model_id: str, options: DownloadOptions = DownloadOptions(), reporter: Reporter = NULL) -> DownloadResult:
    """Fetch `model_id` from the first source that has it, verify it, and return where it is."""

    if not HUB_ID.match(model_id):
        raise DownloadError(f"{model_id!r} is not a hub id", "use the form org/name, e.g. Qwen/Qwen3-Reranker-0.6B")
    order = source_order(options.source)
    offline = is_offline(options)
    failed: list[SourceAttempt] = []
    for position, name in enumerate(order):
        hub = HUBS[name]()
        revision = map_revision(name, options.revision)
        try:
            fetched = _from_hub(hub, model_id, revision, offline, reporter)
        except QconvError as exc:
            failed.append(SourceAttempt(name, exc.message, exc.hint))
        except Exception as exc:  # noqa: BLE001 - any client failure means "try the next hub"; all are reported
            failed.append(SourceAttempt(name, hub.describe(exc)))
        else:
            path = fetched.path
            if options.local_dir is not None:
                path = _place(fetched, Path(options.local_dir))
            return DownloadResult(
                model_id=model_id, path=path, source=name, revision=fetched.revision, commit=fetched.commit,
                endpoint=None if offline else hub.endpoint(), files=tuple(f.name for f in fetched.files),
                total_bytes=sum((fetched.path / f.name).stat().st_size for f in fetched.files),
                offline=offline, failed=tuple(failed), cache_path=fetched.path,
            )
        if position + 1 < len(order):
            reporter.log(f"{name}: {failed[-1].error}; trying {order[position + 1]}")
    said = "; ".join(f"{a.source}: {a.error}" for a in failed)
    if offline:
        raise DownloadError(
            f"{model_id} is not usable from the local caches (offline mode) - {said}",
            "run once without --offline / HF_HUB_OFFLINE=1 to download it",
        )
    # A hub that answered but was refused (pickle-only, corrupt file) knows the better next step.
    hints = list(dict.fromkeys(a.hint for a in failed if a.hint))
    hint = "; ".join(hints) or "check the model id and revision, your network, or set HF_ENDPOINT to a mirror; --source picks one hub"
    raise DownloadError(f"could not download {model_id} - {said}", hint)


# --- the per-hub steps ----------------------------------------------------------------------------

def _from_hub(hub: "Hub", model_id: str, revision: str, offline: bool, reporter: Reporter) -> _Fetched:
    state = hub.cache_dir() / STATE_DIR
    with _model_lock(state, model_id, reporter):
        if offline:
            path = hub.cached(model_id, revision)
            files = [RemoteFile(p.name) for p in sorted(path.iterdir()) if p.is_file() and _wanted(p.name)]
            _verify(hub, path, files, state, model_id, offline=True)
            return _Fetched(path, revision, hub.cached_commit(path), files)
        listing = hub.list(model_id, revision)
        files = select_files(listing.files)
        reporter.log(f"{hub.name}: fetching {len(files)} files of {model_id}@{revision} from {hub.endpoint()}")
        path = hub.fetch(model_id, revision, listing.commit, files, reporter)
        commit = hub.cached_commit(path) or listing.commit
        if listing.commit and commit != listing.commit:
            # huggingface_hub falls back to an older cached snapshot when its own call fails.
            raise DownloadError(
                f"the hub lists commit {listing.commit} but the client returned snapshot {commit}",
                "run again; if it persists, pass --revision with the commit you want",
            )
        _verify(hub, path, files, state, model_id, offline=False)
        return _Fetched(path, revision, commit, files)


def _wanted(name: str) -> bool:
    return "/" not in name and any(fnmatch.fnmatchcase(name, p) for p in WANTED) and not name.endswith(PICKLE_SUFFIXES)


def select_files(files: tuple[RemoteFile, ...] | list[RemoteFile]) -> list[RemoteFile]:
    """What conversion needs; refuses repositories without safetensors weights."""
    chosen = [f for f in files if _wanted(f.name)]
    names = {f.name for f in chosen}
    if not any(n.endswith(".safetensors") for n in names):
        pickles = sorted(f.name for f in files if f.name.endswith(PICKLE_SUFFIXES))
        if pickles:
            raise DownloadError(
                f"the repository has only pickle weights ({', '.join(pickles)}); qconv never downloads pickle files",
                "use a revision or repository that ships model.safetensors",
            )
        raise DownloadError("the repository has no safetensors weights", "check the model id")
    if "config.json" not in names:
        raise DownloadError("the repository has no config.json", "check the model id; qconv needs a Transformers-format repository")
    return chosen


def _verify(hub: "Hub", root: Path, files: list[RemoteFile], state: Path, model_id: str, offline: bool) -> None:
    """Sizes, hashes, safetensors headers, index shards. A bad file is deleted, then reported."""
    from qwen_convert.checkpoint.safetensors_io import read_header

    stamps = _Stamps(state / f"{_safe(model_id)}.{hub.name}.json")
    try:
        for f in files:
            path = root / f.name
            if not path.is_file():
                raise _Bad(f.name, "missing after the download")
            size = path.stat().st_size
            if f.size is not None and size != f.size:
                raise _Bad(f.name, f"size is {size} bytes, the hub lists {f.size}")
            known = stamps.get(path)
            if f.sha256:
                digest = known if known is not None else sha256_file(path)
                if digest != f.sha256.lower():
                    raise _Bad(f.name, f"sha256 {digest[:12]}... does not match the hub's {f.sha256[:12]}...")
                stamps.put(path, digest)
            elif offline and stamps.recorded(path) and known is None:
                # Verified when it was downloaded; a different size/mtime now means it changed on disk.
                raise _Bad(f.name, "changed on disk since it was downloaded and verified")
            if f.name.endswith(".safetensors"):
                try:
                    read_header(path)
                except QconvError as exc:
                    raise _Bad(f.name, exc.message.replace(str(path), "").lstrip(": ")) from exc
        index = root / INDEX_FILE
        if index.is_file():
            try:
                shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise _Bad(INDEX_FILE, f"not a valid index ({exc})") from exc
            missing = sorted(s for s in shards if not (root / s).is_file())
            if missing:
                raise DownloadError(f"{INDEX_FILE} names shards that are not there: {', '.join(missing)}", "the repository is incomplete; try another revision or source")
        try:
            open_checkpoint(root)
        except QconvError as exc:
            raise DownloadError(f"the downloaded model does not open: {exc.message}", exc.hint) from exc
    except _Bad as bad:
        hub.forget(root / bad.name)
        stamps.drop(root / bad.name)
        raise DownloadError(
            f"{bad.name} failed the integrity check: {bad.why}; removed it from the {hub.name} cache",
            "run the same command again to re-download it" + (" (online)" if offline else ""),
        ) from bad
    finally:
        stamps.save()


class _Bad(Exception):
    def __init__(self, name: str, why: str):
        super().__init__(f"{name} {why}")
        self.name = name
        self.why = why


def _place(fetched: _Fetched, local_dir: Path) -> Path:
    """Copy the verified files into `local_dir` (atomically per file); the hub cache keeps its copy."""
    local_dir.mkdir(parents=True, exist_ok=True)
    for f in fetched.files:
        src = (fetched.path / f.name).resolve()
        dst = local_dir / f.name
        if dst.is_file() and dst.stat().st_size == src.stat().st_size:
            # _verify just checked src against the hub's sha256 where the hub gives one: no need to hash src again.
            if sha256_file(dst) == ((f.sha256 or "").lower() or sha256_file(src)):
                continue
        tmp = dst.with_name(f".{dst.name}.qconv-tmp-{os.getpid()}-{threading.get_ident()}")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    return local_dir


# --- locks and verification stamps ----------------------------------------------------------------

@contextlib.contextmanager
def _model_lock(state: Path, model_id: str, reporter: Reporter) -> Iterator[None]:
    """An exclusive flock per model and cache: concurrent runs wait instead of interleaving.

    flock locks belong to the open file description, so two threads of one process exclude each
    other as two processes do.
    """
    state.mkdir(parents=True, exist_ok=True)
    lock_path = state / f"{_safe(model_id)}.lock"
    try:
        import fcntl
    except ImportError:  # not POSIX: filelock (a huggingface_hub dependency) does the same job
        from filelock import FileLock

        with FileLock(str(lock_path)):
            yield
        return
    with open(lock_path, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            reporter.log(f"waiting for another download of {model_id} to finish")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class _Stamps:
    """sha256 of files already verified, keyed by real path + size + mtime, so re-runs skip hashing."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.data: dict[str, list] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.data = {}
        self.dirty = False

    @staticmethod
    def _key(path: Path) -> tuple[str, list]:
        real = path.resolve()
        st = real.stat()
        return str(real), [st.st_size, st.st_mtime_ns]

    def recorded(self, path: Path) -> bool:
        return str(path.resolve()) in self.data

    def get(self, path: Path) -> str | None:
        key, meta = self._key(path)
        entry = self.data.get(key)
        return entry[2] if entry and entry[:2] == meta else None

    def put(self, path: Path, digest: str) -> None:
        key, meta = self._key(path)
        if self.data.get(key) != meta + [digest]:
            self.data[key] = meta + [digest]
            self.dirty = True

    def drop(self, path: Path) -> None:
        self.dirty |= self.data.pop(str(path.resolve()), None) is not None

    def save(self) -> None:
        if not self.dirty:
            return
        tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.data, indent=1), encoding="utf-8")
        os.replace(tmp, self.path)
        self.dirty = False


def _safe(model_id: str) -> str:
    return model_id.replace("/", "--")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


# --- the hubs ---------------------------------------------------------------------------------------
