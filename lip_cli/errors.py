"""The one exception type for user-facing failures, and the exit codes of `lip`."""

from __future__ import annotations

EXIT_OK = 0  # done: a repair confirmed and written, a given k written as asked, or --force-write
EXIT_BAD_INPUT = 1  # a LipError, or out of memory
EXIT_USAGE = 2  # a bad command line (click's code)
EXIT_UNCONFIRMED = 3  # --k auto confirmed nothing (or had no validation set): no changed head written;
# lip compare: an accuracy gate whose rows are too few to tell
EXIT_REFUSED = 4  # a given k that the validation set shows lower by any amount: not written
EXIT_GATE_FAILED = 5  # lip compare: a --fail-below / --fail-above threshold was crossed
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT)
EXIT_TERMINATED = 143  # SIGTERM: 128 + 15, what shells and supervisors expect
OUTCOME_EXIT_CODES = {
    "repaired": EXIT_OK,
    "given": EXIT_OK,
    "unchecked": EXIT_OK,
    "unconfirmed": EXIT_UNCONFIRMED,
    "refused": EXIT_REFUSED,
}


GATE_EXIT_CODES = {"passed": EXIT_OK, "too few rows": EXIT_UNCONFIRMED, "failed": EXIT_GATE_FAILED}


def outcome_exit_code(outcome: str, forced: bool = False) -> int:
    """The exit code of a repair's outcome (`selection.outcome`); 0 whenever --force-write wrote it.

    --dry-run changes nothing here: it exits with the code the same run would have without it.
    """
    return EXIT_OK if forced else OUTCOME_EXIT_CODES[outcome]


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
