"""Atomic outputs: build in a temporary sibling, rename into place only on success.

An interrupted (Ctrl-C, kill) or failed run therefore never leaves a half-written OUT. A hard kill
can leave a `.OUT.qconv-tmp-*` sibling behind; the next run on the same OUT removes it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputError

TMP_MARKER = ".qconv-tmp-"


def _stale_siblings(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}{TMP_MARKER}*"))


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse a non-empty OUT unless force; refuse an unwritable parent. Does not create anything."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a directory", "choose another OUT path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputError(f"output directory {out} is not empty", "pass --force to replace it, or choose another OUT")
    parent = out.resolve().parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to {probe}", "choose an OUT in a writable directory")


@contextlib.contextmanager
def atomic_output_dir(out: Path | str, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory next to `out`; on success it replaces `out`.

    On any exception (KeyboardInterrupt included) the temporary directory is removed and `out` is
    left exactly as it was.
    """
    out = Path(out)
    check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in _stale_siblings(out):
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_MARKER}", dir=out.parent))
    except OSError as exc:
        raise OutputError(f"cannot write to {out.parent}: {exc.strerror}", "choose an OUT in a writable directory") from exc
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if out.exists():
            # Move the old output aside first so the swap is never half done.
            old = out.parent / f".{out.name}{TMP_MARKER}old-{os.getpid()}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_output_file(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARKER}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

