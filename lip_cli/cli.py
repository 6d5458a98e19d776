"""The `lip` process: `main` handles Ctrl-C, SIGTERM and closed pipes from its first line, then runs
the typer app (`lip_cli.app`, also reachable as `lip_cli.cli.app`).

Light at import: the app, typer and the commands are imported inside `main`, after the signal
handling is in place, and library modules (and so torch) inside the commands, so that `lip --help`
and shell completion stay instant.
"""

from __future__ import annotations

import signal
import sys
from typing import Any


def main() -> None:
    """The `lip` process: SIGINT and SIGTERM end a run with 130 / 143 and one line from the start,
    a reader that closes the pipe early changes nothing, and the exit code is the run's whatever
    lands during the interpreter's shut-down."""
    from lip_cli import exits

    exits.start_process(sys.argv[1:])
    from lip_cli.errors import EXIT_INTERRUPTED, EXIT_TERMINATED, interrupt_exit_code

    try:
        from lip_cli.app import app

        app()
    except (KeyboardInterrupt, SystemExit) as ending:
        code = interrupt_exit_code(ending) if isinstance(ending, KeyboardInterrupt) else ending.code
        if code in (EXIT_INTERRUPTED, EXIT_TERMINATED):
            exits.exit_interrupted(EXIT_TERMINATED if signal.SIGTERM in exits.signals_received else code)
        exits.end_process()
        raise
    exits.end_process()


def __getattr__(name: str) -> Any:
    if name == "app":
        from lip_cli.app import app

        return app
    raise AttributeError(f"module 'lip_cli.cli' has no attribute {name!r}")
