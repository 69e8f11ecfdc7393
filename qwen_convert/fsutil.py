"""Atomic outputs: build in a temporary sibling, rename into place only on success.

An interrupted (Ctrl-C, kill) or failed run therefore never leaves a half-written OUT. A hard kill
can leave a `.OUT.qconv-tmp-*` sibling behind; the next run on the same OUT removes it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputError, QconvError

TMP_MARKER = ".qconv-tmp-"


def _stale_siblings(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}{TMP_MARKER}*"))


# Kernel views that accept (or half accept) mkdir but never hold a file: writing a model there
# fails in confusing ways (ENOENT from /proc, EPERM from /sys), so they are refused by name.
PSEUDO_FILESYSTEMS = frozenset({
    "proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs",
    "pstore", "bpf", "configfs", "fusectl", "mqueue", "efivarfs", "binfmt_misc", "nsfs", "selinuxfs",
})
FULL_BELOW = 64 * 1024  # bytes free under which a failed write is reported as a full disk


def _unescape_mount(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def filesystem_type(path: Path) -> str | None:
    """The type (ext4, tmpfs, proc ...) of the mount holding `path`; None where /proc/self/mountinfo is absent."""
    try:
        lines = Path("/proc/self/mountinfo").read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    path = Path(os.path.realpath(path))
    best, best_type = -1, None
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or not tail:
            continue
        mount = Path(_unescape_mount(fields[4]))
        if (path == mount or mount in path.parents) and len(mount.parts) > best:
            best, best_type = len(mount.parts), tail[0]
    return best_type


def _existing_ancestor(out: Path) -> Path:
    probe = Path(os.path.abspath(out))
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def check_writable(out: Path) -> None:
    """Refuse an OUT that cannot be created: under a file, on a pseudo or read-only filesystem, or
    in a directory we may not write. Creates nothing."""
    out = Path(out)
    probe = out if out.is_dir() else _existing_ancestor(out.parent)
    if not probe.is_dir():
        raise OutputError(f"cannot write to {out}: {probe} is a file", "choose an OUT whose parent is a directory")
    fstype = filesystem_type(probe)
    if fstype in PSEUDO_FILESYSTEMS:
        raise OutputError(f"cannot write to {out}: it is on {fstype}, a kernel pseudo filesystem that holds no files", "choose an OUT on a disk")
    try:
        read_only = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only:
        raise OutputError(f"cannot write to {probe}: read-only file system", "choose an OUT on a writable disk")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to {probe}: permission denied", "choose an OUT in a writable directory")


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse a non-empty OUT unless force; refuse an OUT that cannot be written. Does not create anything."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a directory", "choose another OUT path")
    check_writable(out)
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputError(f"output directory {out} is not empty", "pass --force to replace it, or choose another OUT")


def _disk_full(path: Path) -> bool:
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < FULL_BELOW


def output_error(exc: BaseException, out: Path, written: Path | None = None) -> OutputError | None:
    """The OutputError a failed write into `out` stands for, or None when it was not the output's fault.

    ENOSPC/EDQUOT and EROFS can only come from writing. Other OSErrors count when they name a path
    under `written` (the temporary sibling). Any other failure counts as a full disk when the disk is
    full, since libraries (onnx's C++ writer, protobuf) report ENOSPC in their own exception types.
    """
    out = Path(out)
    code = getattr(exc, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT) or (not isinstance(exc, OSError) and written is not None and _disk_full(written)):
        return OutputError(f"cannot write to {out}: no space left on the disk holding {out.parent}", "free space there or choose an OUT on a bigger disk")
    if code == errno.EROFS:
        return OutputError(f"cannot write to {out.parent}: read-only file system", "choose an OUT on a writable disk")
    if isinstance(exc, OSError):
        names = [Path(n) for n in (exc.filename, getattr(exc, "filename2", None)) if n]
        if written is None or any(n == written or written in n.parents for n in names):
            return OutputError(f"cannot write to {out}: {exc.strerror or exc}", "choose an OUT in a writable directory")
    return None


def ensure_output_dir(out: Path | str) -> Path:
    """mkdir -p OUT, failing as one OutputError line (under a file, read-only, pseudo filesystem)."""
    out = Path(out)
    check_writable(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(exc, out) from exc
    return out


RENAME_EXCHANGE, AT_FDCWD = 2, -100  # linux/fs.h, fcntl.h


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE): a process killed
    at any instant leaves each name holding one complete tree. False where the kernel, libc or the
    filesystem cannot (the caller falls back to two renames)."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _old_sibling(out: Path) -> Path:
    return out.parent / f".{out.name}{TMP_MARKER}old"


def replace_dir(new: Path, out: Path) -> None:
    """Put the complete directory `new` at `out`, atomically where the system allows: swapped with the
    old `out` in one step, which is then removed. Elsewhere the old one is renamed aside first, and a
    process killed between the two renames leaves it there for `restore_old` to put back."""
    if not out.exists():
        os.rename(new, out)
    elif exchange(new, out):
        shutil.rmtree(new, ignore_errors=True)  # now the old output
    else:
        old = _old_sibling(out)
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out, old)
        os.rename(new, out)
        shutil.rmtree(old, ignore_errors=True)


def restore_old(out: Path) -> None:
    """Undo a swap that a kill cut between its two renames (replace_dir's fallback): OUT is back."""
    old = _old_sibling(Path(out))
    if old.is_dir() and not Path(out).exists():
        os.rename(old, out)


@contextlib.contextmanager
def atomic_output_dir(out: Path | str, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory next to `out`; on success it replaces `out`.

    On any exception (KeyboardInterrupt included) the temporary directory is removed and `out` is
    left exactly as it was.
    """
    out = Path(out)
    restore_old(out)
    check_output_dir(out, force)
    ensure_output_dir(out.parent)
    for stale in _stale_siblings(out):
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_MARKER}", dir=out.parent))
    except OSError as exc:
        raise OutputError(f"cannot write to {out.parent}: {exc.strerror}", "choose an OUT in a writable directory") from exc
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        replace_dir(tmp, out)
    except QconvError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as exc:
        # Judged before the cleanup frees the space a full disk would show.
        error = output_error(exc, out, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if error is not None:
            raise error from exc
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_output_file(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is renamed onto `path`."""
    path = Path(path)
    ensure_output_dir(path.parent)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARKER}", dir=path.parent)
    except OSError as exc:
        raise output_error(exc, path) from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    except QconvError:
        tmp.unlink(missing_ok=True)
        raise
    except Exception as exc:
        error = output_error(exc, path, tmp)
        tmp.unlink(missing_ok=True)
        if error is not None:
            raise error from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


HASH_CHUNK = 1 << 22


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()
