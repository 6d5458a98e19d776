"""How a long pass tells whoever runs it how far it is: a callback, so the core never draws."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, int, int], None]
"""Called as progress(task, rows done, rows in all) while a pass streams over a file."""


def no_progress(task: str, done: int, total: int) -> None:
    return None
