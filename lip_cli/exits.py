"""How a run ends: every failure as one line on stderr and an exit code of `lip_cli.errors` (and,
under --json, one error document on stdout), Ctrl-C, SIGTERM and a closed pipe included.

Every command runs inside `user_errors`; `cli.main` calls `start_process` first thing, before any
heavy import. Light at import (no typer, no rich): it runs before them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any, TextIO

from lip_cli.errors import (
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
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
    import typer

    from lip_cli import writes

    writes.placed.clear()
    _interrupt_reported.clear()
    json_run[:] = [as_json]
    if "lip_cli.render.console" in sys.modules:  # a new run in the same process (tests): no document yet
        sys.modules["lip_cli.render.console"].printed.clear()
    _phase[:] = ["running"]
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
    finally:
        _phase[:] = ["ended"]


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


JSON_FLAG = "--json"


def asks_for_json(args: list[str]) -> bool:
    """Whether a command line (before any `--`) has --json (also as `--json=VALUE`, which is a
    usage error but still asks for a JSON document)."""
    words = args[: args.index("--")] if "--" in args else args
    return any(word == JSON_FLAG or word.startswith(JSON_FLAG + "=") for word in words)


def start_process(args: list[str]) -> None:
    """The `lip` process, first thing: Ctrl-C and SIGTERM handled from here on (exit 130 / 143 with
    one line, and the error document under --json), and stdout / stderr made safe to close."""
    json_run[:] = [asks_for_json(args)]
    _phase[:] = ["starting"]
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, _on_signal)
    sys.stdout = PipeSafe(sys.stdout)  # type: ignore[assignment]
    sys.stderr = PipeSafe(sys.stderr)  # type: ignore[assignment]


def _on_signal(number: int, frame: object) -> None:
    """SIGINT or SIGTERM. Before a command runs there is nothing to clean up: the process ends at
    once. While it runs, the signal unwinds it like Ctrl-C, through every clean-up. Once it has
    run, its result stands: the signal is recorded and the run ends with its own code."""
    signals_received.append(number)
    code = EXIT_TERMINATED if number == signal.SIGTERM else EXIT_INTERRUPTED
    phase = _phase[0] if _phase else "running"
    if phase == "starting":
        ignore_interrupts()
        what = "terminated" if code == EXIT_TERMINATED else "interrupted"
        _write_now(sys.stderr, f"error: {what}; nothing was written\n")
        console = sys.modules.get("lip_cli.render.console")
        if any(json_run) and not (console is not None and console.printed):
            _write_now(sys.stdout, document_text(error_document(f"{what}; nothing was written", code)))
        os._exit(code)
    if phase == "running":
        raise Terminated if code == EXIT_TERMINATED else KeyboardInterrupt


def _write_now(stream: Any, text: str) -> None:
    """Write straight to the stream's file descriptor: a signal handler must not re-enter the
    buffered stream it may have interrupted."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        os.write(stream.fileno(), text.encode("utf-8", "replace"))


def error_document(message: str, exit_code: int) -> dict[str, Any]:
    """What --json prints for a failure: the one line of stderr and the exit code."""
    return {"error": {"message": message, "exit_code": exit_code}}


def document_text(document: dict[str, Any]) -> str:
    """A JSON document as lip prints it: the version of lip first, indented, one line feed."""
    from lip_cli import __version__

    return json.dumps({"lip_version": __version__, **document}, indent=2, allow_nan=False) + "\n"


class PipeSafe:
    """stdout or stderr such that a reader that has gone (`lip ... | head -1`) is not an error:
    on the first EPIPE the stream's descriptor is pointed at /dev/null (as Python's documentation
    on SIGPIPE recommends), so the run finishes as it would have, with its own exit code, and the
    interpreter's last flush has nothing left to fail on."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._reader_gone()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._reader_gone()

    def _reader_gone(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())
        finally:
            os.close(devnull)
        with contextlib.suppress(OSError):
            self._stream.flush()  # what was buffered goes to /dev/null

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


signals_received: list[int] = []


_phase: list[str] = []  # "starting", "running" (a command's body), "ended"; empty: no process set up


_interrupt_reported: list[int] = []


json_run: list[bool] = []  # whether the command running was given --json


def end_process() -> None:
    """The run is over: a late Ctrl-C would only turn its code into -SIGINT, and what is still
    buffered for a reader that has gone goes nowhere instead of failing at shut-down."""
    ignore_interrupts()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


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
