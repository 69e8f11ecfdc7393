"""Shared by the benchmark scripts: each owns one marked section of BENCHMARKS.md."""

from __future__ import annotations

from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def write_section(text: str, start: str, end: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace the text between `start` and `end` (markers included in `text`), or append it."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in old and end in old:
        new = old[: old.index(start)] + text + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(new)
