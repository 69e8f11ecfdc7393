"""manifest.json: what a `qconv run` built, from what, with which tools, and how well it scored.

The schema is documented in docs/manifest.md and versioned by `schema_version` (an integer bumped
on any incompatible change). `check_manifest(DIR)` re-hashes every file the manifest lists and names
each one that is missing or changed, and any file that appeared in an artifact directory since.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from qwen_convert import __version__
from qwen_convert.errors import InputFileError
from qwen_convert.fsutil import atomic_output_file, sha256_file
from qwen_convert.versions import tool_info

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
REPORT = "REPORT.md"
STATE = ".qconv-run.json"  # the pipeline's step-state file (not an artifact)
# Where a run puts each artifact inside OUT.
SEQCLS_DIR = "seqcls"
ONNX_OUT = "onnx"
VERIFY_FILE = "verify.json"


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the run directory (or to the source directory for source files), '/'-separated
    bytes: int
    sha256: str

    def to_dict(self) -> dict:
        return {"path": self.path, "bytes": self.bytes, "sha256": self.sha256}

    @classmethod
    def of(cls, root: Path, path: Path) -> "FileEntry":
        return cls(path.relative_to(root).as_posix(), path.stat().st_size, sha256_file(path))


def file_entries(root: Path, rel: str) -> list[FileEntry]:
    """Entries for a file, or for every file under a directory (sorted), relative to root."""
    target = root / rel
    if target.is_file():
        return [FileEntry.of(root, target)]
    return [FileEntry.of(root, p) for p in sorted(target.rglob("*")) if p.is_file()]


@dataclass(frozen=True)
class Artifact:
    name: str  # seqcls | onnx/fp32 | onnx/q4f16 | onnx/support | verify ...
    kind: str  # seqcls | onnx | onnx-support | causal-lm-onnx | report
    mode: str | None  # precision of the artifact: fp32, fp16, int8, q4, q4f16 (None for support files)
    path: str  # the main file or directory, relative to the run directory
    files: tuple[FileEntry, ...]

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.files)

    @property
    def sha256(self) -> str | None:
        """sha256 of the main file; for a directory, of its sorted (path, sha256) list."""
        if len(self.files) == 1 and self.files[0].path == self.path:
            return self.files[0].sha256
        listing = "".join(f"{f.path}\0{f.sha256}\n" for f in self.files)
        return hashlib.sha256(listing.encode()).hexdigest()

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "mode": self.mode, "path": self.path, "bytes": self.bytes,
                "sha256": self.sha256, "files": [f.to_dict() for f in self.files]}


@dataclass(frozen=True)
class Metric:
    """One measured number of one artifact, with the gate it is held to (None: reported only)."""

    artifact: str
    name: str  # max_abs_logit | max_abs_prob | ndcg | retention | greedy_match | token_agreement ...
    value: float | None
    gate: str | None  # "<= 1e-4", ">= 0.97"
    passed: bool | None  # None when not gated

    def to_dict(self) -> dict:
        return {"artifact": self.artifact, "name": self.name, "value": self.value, "gate": self.gate, "passed": self.passed}


@dataclass
class Manifest:
    recipe: dict
    source: dict  # hub, id, revision, path, files [FileEntry]
    artifacts: list[Artifact]
    metrics: list[Metric]
    failures: list[str]  # one line per failed gate, naming artifact and check
    timings: dict[str, dict]  # step -> {"seconds", "skipped"}
    tool: dict = field(default_factory=tool_info)
    schema_version: int = SCHEMA_VERSION

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "recipe": self.recipe,
            "source": self.source,
            "tool": self.tool,
            "artifacts": [a.to_dict() for a in self.artifacts],
            "metrics": [m.to_dict() for m in self.metrics],
            "passed": self.passed,
            "failures": self.failures,
            "timings": self.timings,
        }

    def write(self, root: Path) -> None:
        with atomic_output_file(root / MANIFEST) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --- reading and checking -------------------------------------------------------------------------

REQUIRED = {"schema_version": int, "recipe": dict, "source": dict, "tool": dict, "artifacts": list,
            "metrics": list, "passed": bool, "failures": list, "timings": dict}


def read_manifest(root: Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise InputFileError(f"{root} has no {MANIFEST}", "pass the --out directory of a finished `qconv run`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputFileError(f"{path} is not valid JSON: {exc}", "re-run `qconv run` to rewrite it") from exc
    if not isinstance(data, dict):
        raise InputFileError(f"{path} is not a JSON object", "re-run `qconv run` to rewrite it")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise InputFileError(f"{path} has schema_version {version!r}; this qconv reads {SCHEMA_VERSION}",
                             "check it with the qconv version that wrote it, or re-run the recipe")
    for key, kind in REQUIRED.items():
        if not isinstance(data.get(key), kind):
            raise InputFileError(f"{path}: {key} is missing or not a {kind.__name__}", "the manifest was edited or truncated; re-run the recipe")
    for i, art in enumerate(data["artifacts"]):
        files = art.get("files") if isinstance(art, dict) else None
        if not isinstance(files, list) or not all(isinstance(f, dict) and {"path", "bytes", "sha256"} <= f.keys() for f in files):
            raise InputFileError(f"{path}: artifacts[{i}] has no valid files list", "the manifest was edited; re-run the recipe")
    return data


@dataclass
class CheckResult:
    root: Path
    checked: int
    missing: list[str]
    changed: list[str]  # "path (size 10 -> 12)" / "path (sha256 differs)"
    unexpected: list[str]  # files inside an artifact directory the manifest does not list
    gates_passed: bool

    @property
    def passed(self) -> bool:
        return not (self.missing or self.changed or self.unexpected)

    def to_dict(self) -> dict:
        return {"dir": str(self.root), "passed": self.passed, "files_checked": self.checked, "missing": self.missing,
                "changed": self.changed, "unexpected": self.unexpected, "gates_passed": self.gates_passed}

    def render(self) -> str:
        lines = [f"{self.root}/{MANIFEST}: {self.checked} files checked"]
        lines += [f"  missing     {p}" for p in self.missing]
        lines += [f"  changed     {p}" for p in self.changed]
        lines += [f"  unexpected  {p}" for p in self.unexpected]
        if not self.gates_passed:
            lines.append("  note: the run recorded failed gates (see REPORT.md)")
        lines.append("OK: every file matches the manifest" if self.passed else "FAILED: the files on disk differ from the manifest")
        return "\n".join(lines)


def check_manifest(root: Path | str) -> CheckResult:
    """Re-hash every listed file; name the missing, the changed and the unlisted ones."""
    root = Path(root)
    data = read_manifest(root)
    missing, changed, unexpected = [], [], []
    listed: set[str] = set()
    checked = 0
    for art in data["artifacts"]:
        for f in art["files"]:
            rel = f["path"]
            listed.add(rel)
            checked += 1
            path = root / rel
            if not path.is_file():
                missing.append(rel)
                continue
            size = path.stat().st_size
            if size != f["bytes"]:
                changed.append(f"{rel} (size {f['bytes']} -> {size})")
            elif sha256_file(path) != f["sha256"]:
                changed.append(f"{rel} (sha256 differs)")
    for art in data["artifacts"]:
        top = root / art["path"]
        if top.is_dir():
            unexpected += [p.relative_to(root).as_posix() for p in sorted(top.rglob("*"))
                           if p.is_file() and p.relative_to(root).as_posix() not in listed]
    return CheckResult(root, checked, missing, changed, unexpected, bool(data["passed"]))


@dataclass
class RunState:
    path: Path
    recipe: str
    steps: dict[str, dict] = field(default_factory=dict)

    def save(self) -> None:
        with atomic_output_file(self.path) as tmp:
            tmp.write_text(json.dumps({"recipe": self.recipe, "qconv": __version__, "steps": self.steps}, indent=2) + "\n", encoding="utf-8")
