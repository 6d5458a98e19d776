"""The terminal: the report a command was asked for on stdout (its tables and summaries, or under
--json its one JSON document), and on stderr what is said along the way (progress, warnings and
one-line errors), so that `lip inspect model.pt | grep fc` and `2>/dev/null` do what a shell user
expects.

Both consoles follow sys.stdout / sys.stderr as they are when used (tests swap them). Where a
stream is not a terminal rich writes no escape codes, and the width is the terminal's, else
$COLUMNS, else 80.
"""

from __future__ import annotations

import contextlib
import math
import re
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.text import Text

from lip_cli.exits import document_text, error_document

if TYPE_CHECKING:
    from lip_cli.progress import Progress


_BLOCKS = " ▏▎▍▌▋▊▉█"


_consoles: dict[str, Console] = {}


class _Lines(Console):
    """A console whose lines carry no trailing spaces (a table's title is padded to its width) when
    it is not a terminal."""

    def _render_buffer(self, buffer: Any) -> str:
        text = super()._render_buffer(buffer)
        return text if self.is_terminal else _TRAILING_SPACES.sub("\n", text)


_TRAILING_SPACES = re.compile(r"[ \t]+\n")


def stdout() -> Console:
    """The console for the report the user asked for: tables, summaries, what was written."""
    return _console("stdout")


def stderr() -> Console:
    """The console for what is said along the way: progress, warnings, one-line errors."""
    return _console("stderr")


def _console(name: str) -> Console:
    stream = getattr(sys, name)
    console = _consoles.get(name)
    if console is None or console.file is not stream:
        console = _consoles[name] = _Lines(file=stream, highlight=False)
    return console


def command(text: str) -> None:
    """A command for the user to copy, in the report: one line whatever the width, never wrapped."""
    stdout().print(Text(text), soft_wrap=True)


def error(message: str) -> None:
    """One line on stderr; under torchrun only rank 0 says it (every rank fails with the same one)."""
    from lip_cli.distributed import is_leader

    if is_leader():
        stderr().print(Text("error: ", style="bold red") + Text(message), soft_wrap=True)


def warning(message: str) -> None:
    """Wrapped at word boundaries on a terminal, one line otherwise (for logs and grep)."""
    console = stderr()
    console.print(Text("warning: ", style="bold yellow") + Text(message), soft_wrap=not console.is_terminal)


printed: list[bool] = []  # whether this run has printed its JSON document


def print_json(document: dict[str, Any]) -> None:
    """One JSON document alone on stdout, with the version of lip that wrote it; a value that is not
    a finite number is null (JSON has no NaN or Infinity)."""
    printed.append(True)
    sys.stdout.write(document_text(_finite_only(document)))
    sys.stdout.flush()


def _finite_only(value: Any) -> Any:
    """`value` with every NaN or infinite float, at any depth, replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_only(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_only(item) for item in value]
    return value


def fail(message: str, exit_code: int, as_json: bool) -> None:
    """A failure's one line on stderr and, under --json, its error document on stdout unless this
    run has printed its document already (stdout carries exactly one)."""
    from lip_cli.distributed import is_leader

    error(message)
    if as_json and not printed and is_leader():
        print_json(error_document(message, exit_code))


def bar(value: float, maximum: float, width: int = 24) -> str:
    """A horizontal bar of `width` cells for value / maximum, in eighths of a cell."""
    if maximum <= 0 or value <= 0:
        return ""
    eighths = round(min(value / maximum, 1.0) * width * 8)
    return _BLOCKS[-1] * (eighths // 8) + (_BLOCKS[eighths % 8] if eighths % 8 else "")


@contextlib.contextmanager
def progress_bar(enabled: bool = True, delay: float = 0.5) -> Iterator[Progress]:
    """A progress callback that shows a bar only on a terminal and once a pass takes a moment."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = stderr()
    started = time.monotonic()
    live: dict[str, Any] = {}

    def update(task: str, done: int, total: int) -> None:
        if not enabled or not console.is_terminal or time.monotonic() - started < delay:
            return
        if "bar" not in live:
            live["bar"] = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=console,
                transient=True,
            )
            live["bar"].start()
        tasks = live.setdefault("tasks", {})
        if task not in tasks:
            tasks[task] = live["bar"].add_task(task, total=total)
        live["bar"].update(tasks[task], completed=done)

    try:
        yield update
    finally:
        if "bar" in live:
            live["bar"].stop()
