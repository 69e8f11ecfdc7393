"""Progress reporting without printing from library code.

Library functions accept a `Reporter`; the default does nothing. The CLI passes a rich-backed one
that draws on stderr, so stdout stays clean for results.
"""

from __future__ import annotations

from typing import Protocol


class Task(Protocol):
    def advance(self, n: float = 1) -> None: ...


class Reporter(Protocol):
    def task(self, description: str, total: float | None = None) -> Task: ...

    def log(self, message: str) -> None: ...


class _NullTask:
    def advance(self, n: float = 1) -> None:
        pass


class NullReporter:
    def task(self, description: str, total: float | None = None) -> Task:
        return _NullTask()

    def log(self, message: str) -> None:
        pass


NULL = NullReporter()


class RichReporter:
    """Progress bars and log lines on stderr (never stdout: results go there)."""

    def __init__(self, quiet: bool = False):
        from rich.console import Console

        self.console = Console(stderr=True)
        self.quiet = quiet
        self._progress = None

    def __enter__(self) -> "RichReporter":
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

        if not self.quiet:
            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                TimeElapsedColumn(), console=self.console, transient=True,
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None

    def task(self, description: str, total: float | None = None) -> Task:
        if self._progress is None:
            return _NullTask()
        progress = self._progress
        task_id = progress.add_task(description, total=total)

        class _Task:
            def advance(self, n: float = 1) -> None:
                progress.advance(task_id, n)

        return _Task()

    def log(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, markup=False, highlight=False)
