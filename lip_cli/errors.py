"""The one exception type for user-facing failures, and the exit codes of `lip`."""

from __future__ import annotations

EXIT_OK = 0
EXIT_BAD_INPUT = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT)
EXIT_TERMINATED = 143  # SIGTERM: 128 + 15, what shells and supervisors expect


class LipError(Exception):
    """A failure the user can fix: bad input, a missing file, an impossible request.

    The message is one line that names the file or option and what is wrong.
    """

    exit_code: int = EXIT_BAD_INPUT

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every clean-up that an interrupt runs also runs for it."""


def interrupt_exit_code(interrupt: KeyboardInterrupt) -> int:
    """143 for SIGTERM, 130 for Ctrl-C."""
    return EXIT_TERMINATED if isinstance(interrupt, Terminated) else EXIT_INTERRUPTED


def first_line(error: BaseException, limit: int = 160) -> str:
    """A library's error message cut to one short line, for the end of a LipError message."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if len(text) > limit and ". " in text[:limit]:
        text = text[: text.index(". ") + 1]
    return text if len(text) <= limit else text[: limit - 1] + "…"
