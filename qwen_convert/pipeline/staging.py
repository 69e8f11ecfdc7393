"""Where a run writes, so that `kill -9` at any instant leaves OUT's last good run whole.

A directory holding a finished run (its manifest.json) is what consumers load and `run --check`
trusts, so a new run over it never writes there: it works in a staging sibling `.OUT.qconv-staging`,
seeded with hard links of OUT's files (no copy of the weights; every step replaces files through a
temporary sibling, never writes into an existing one, so the links never change OUT's files). Once
its manifest is written the staging directory is swapped with OUT in one atomic rename
(fsutil.replace_dir) and the old run removed. A killed run resumes in its staging directory.

A directory without a finished run (a first run, or one interrupted before its manifest) has nothing a
consumer trusts: the run works in it directly, each step's outputs still appearing atomically.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from qwen_convert.fsutil import TMP_MARKER, replace_dir, restore_old

from .manifest import MANIFEST

STAGING = ".qconv-staging"


def staging_dir(out: Path) -> Path:
    return out.parent / f".{out.name}{STAGING}"


def work_dir(out: Path) -> Path:
    """The directory this run writes into: an interrupted run's staging directory (resumed), a fresh
    one seeded from OUT when OUT holds a finished run, else OUT itself."""
    out = Path(out)
    restore_old(out)
    staging = staging_dir(out)
    if staging.is_dir():
        if not (staging / MANIFEST).is_file():
            return staging  # an interrupted run: its finished steps are there
        # A finished run killed before its swap, or the old run swapped out and not yet removed:
        # OUT is complete either way.
        shutil.rmtree(staging)
    if not (out / MANIFEST).is_file():
        return out
    seed = out.parent / f".{out.name}{TMP_MARKER}seed"
    shutil.rmtree(seed, ignore_errors=True)
    link_tree(out, seed)
    os.rename(seed, staging)  # a kill while linking leaves a stale tmp sibling, never a partial staging dir
    return staging


def link_tree(src: Path, dst: Path) -> None:
    """dst mirrors src: directories made, files hard-linked (copied where the filesystem cannot link)."""
    for root, dirs, files in os.walk(src):
        rel = Path(root).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        dirs[:] = [d for d in dirs if TMP_MARKER not in d]  # a killed step's half-written sibling
        for name in files:
            if TMP_MARKER in name:
                continue
            try:
                os.link(Path(root) / name, dst / rel / name)
            except OSError:
                shutil.copy2(Path(root) / name, dst / rel / name)


def publish(work: Path, out: Path) -> None:
    """The finished run in `work` becomes OUT (nothing to do when it ran in OUT itself). Temporary
    files and directories left in `work` go first: a finished run has none of its own, so they are a
    killed attempt's (a resumed staging directory holds them, e.g. a half-written score cache entry)."""
    for stale in sorted(Path(work).rglob(f"*{TMP_MARKER}*")):  # parents before their children
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    if Path(work) != Path(out):
        replace_dir(Path(work), Path(out))
