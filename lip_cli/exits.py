"""How a run ends: every failure as one line on stderr and an exit code of `lip_cli.errors` (and,
under --json, one error document on stdout), Ctrl-C and SIGTERM included.

Every command runs inside `user_errors`; `cli.main` installs the signal handling around the app.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator

import typer

from lip_cli.errors import (
    EXIT_BAD_INPUT,
    EXIT_TERMINATED,
    LipError,
    Terminated,
    first_line,
    interrupt_exit_code,
)


@contextlib.contextmanager
def user_errors(as_json: bool = False) -> Iterator[None]:
    """Map user-facing failures to one line on stderr and the exit code of `lip_cli.errors`; under
    --json also to one error document on stdout."""
    from lip_cli import writes

    writes.placed.clear()
    _interrupt_reported.clear()
    json_run[:] = [as_json]
    if "lip_cli.render.console" in sys.modules:  # a new run in the same process (tests): no document yet
        sys.modules["lip_cli.render.console"].printed.clear()
    try:
        import_heavy_modules()
        yield
    except LipError as failure:
        _fail(str(failure), failure.exit_code)
        raise typer.Exit(failure.exit_code) from None
    except KeyboardInterrupt as interrupt:
        report_interrupt(interrupt_exit_code(interrupt))
        raise typer.Exit(interrupt_exit_code(interrupt)) from None
    except Exception as failure:
        if _is_out_of_memory(failure):
            _report_out_of_memory(failure)
        elif isinstance(failure, OSError | RecursionError):
            _report_failure(failure)
        else:
            raise
        raise typer.Exit(EXIT_BAD_INPUT) from None


def _fail(message: str, code: int) -> None:
    from lip_cli.render import console

    console.fail(message, code, as_json=any(json_run))


def _is_out_of_memory(failure: Exception) -> bool:
    """A MemoryError, or torch's OutOfMemoryError (CUDA's, a RuntimeError) or its CPU allocator's
    failure (a plain RuntimeError) once torch is loaded."""
    torch = sys.modules.get("torch")
    return (
        isinstance(failure, MemoryError)
        or (torch is not None and isinstance(failure, torch.OutOfMemoryError))
        or (isinstance(failure, RuntimeError) and "DefaultCPUAllocator: can't allocate" in str(failure))
    )


def _report_failure(failure: OSError | RecursionError) -> None:
    """One line for an operating-system error no check foresaw (the file it names and why), or for
    data nested deeper than Python's recursion limit, with what was already put in place."""
    if isinstance(failure, RecursionError):
        what = "an input is nested too deeply to read (past Python's recursion limit)"
    else:
        what = f"{failure.filename}: {failure.strerror}" if failure.filename else first_line(failure)
    _fail(f"{what}; {_so_far()}", EXIT_BAD_INPUT)


def _so_far() -> str:
    """What the run has put in place, for the end of its last line (`writes.so_far`)."""
    from lip_cli import writes

    return writes.so_far()


def _placed_so_far() -> str:
    """The outputs this run has already renamed into place, for an interrupt's line ("" for none)."""
    from lip_cli import writes

    return ", ".join(map(str, writes.placed))


def _report_out_of_memory(failure: BaseException) -> None:
    """One line for a run that ran out of memory, with what it had already put in place, if any."""
    detail = f" ({first_line(failure)})" if str(failure).strip() else ""
    _fail(
        f"out of memory{detail}; {_so_far()}: a smaller --chunk-rows or --sample-rows "
        "(--batch-size for lip features) needs less",
        EXIT_BAD_INPUT,
    )


def report_interrupt(code: int) -> None:
    """The one line of an interrupted run, printed once: what it had already put in place, if any."""
    if not _interrupt_reported:
        _interrupt_reported.append(code)
        what = "terminated" if code == EXIT_TERMINATED else "interrupted"
        done = _placed_so_far()
        _fail(f"{what} after writing {done}" if done else f"{what}; nothing was written", code)


def import_heavy_modules() -> None:
    """Import torch, numpy, safetensors, rich and lip's own modules with Ctrl-C and SIGTERM held
    back until they are whole.

    An interrupt in the middle of an import can leave a half-initialised module behind, which
    later fails in ways that look like bad input (or, for `decimal` under rich, prints a C warning
    when the error line is reported); the interrupt is raised once the imports end.
    """
    held = (signal.SIGINT, signal.SIGTERM)
    received: list[int] = []
    previous = {}
    try:
        for number in held:
            previous[number] = signal.signal(number, lambda number, frame: received.append(number))
    except ValueError:  # not the main thread: signals cannot be held back here
        pass
    try:
        import numpy  # noqa: F401
        import safetensors.torch  # noqa: F401
        import torch  # noqa: F401

        import lip_cli.jobs.compare  # noqa: F401
        import lip_cli.jobs.features  # noqa: F401
        import lip_cli.jobs.inspect  # noqa: F401
        import lip_cli.jobs.repair  # noqa: F401
        import lip_cli.render.compare  # noqa: F401
        import lip_cli.render.demo  # noqa: F401
        import lip_cli.render.features  # noqa: F401
        import lip_cli.render.inspect  # noqa: F401
        import lip_cli.render.repair  # noqa: F401
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if signal.SIGTERM in received:
        raise Terminated
    if received:
        raise KeyboardInterrupt


def raise_terminated(number: int, frame: object) -> None:
    signals_received.append(number)
    raise Terminated


signals_received: list[int] = []


_interrupt_reported: list[int] = []


json_run: list[bool] = []  # whether the command running was given --json


def ignore_interrupts() -> None:
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, signal.SIG_IGN)


def exit_interrupted(code: int) -> None:
    """End an interrupted process with its one line (unless a command's handler printed it: typer
    exits silently on an interrupt outside it) and `code`, and nothing else.

    Its clean-ups have run (the interrupt unwound through them). A normal exit would still run
    Python's shut-down, where a second signal, or the first one having landed inside an `exec`
    (dataclasses and namedtuples are built that way during imports), ends the process with
    SIGINT instead of the code: the flaky -2 of tests/test_safety.py.
    """
    ignore_interrupts()
    report_interrupt(code)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
