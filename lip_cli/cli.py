"""The `lip` command: the typer app assembled from `lip_cli.commands`, `--version`, and the process
around it (signals, exit codes).

Library modules (and so torch) are imported inside the commands so that `lip --help` and shell
completion stay instant.
"""

from __future__ import annotations

import signal
import sys
from typing import Annotated

import typer
from typer.core import TyperGroup

from lip_cli import exits
from lip_cli.commands import compare, demo, features, inspect, repair
from lip_cli.errors import EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_USAGE, interrupt_exit_code

JSON_FLAG = "--json"


# click's UsageError, whichever click typer runs on (typer >= 0.23 carries its own copy)
UsageError = next(kind for kind in typer.BadParameter.__mro__ if kind.__name__ == "UsageError")


def _asks_for_json(args: list[str]) -> bool:
    """Whether a command line (before any `--`) has --json."""
    return JSON_FLAG in (args[: args.index("--")] if "--" in args else args)


class LipGroup(TyperGroup):
    """The commands; a bad command line under --json also prints its error document on stdout."""

    def invoke(self, ctx: typer.Context) -> object:
        protected = vars(ctx).get("_protected_args", vars(ctx).get("protected_args", []))
        args = [*protected, *ctx.args]
        try:
            return super().invoke(ctx)
        except UsageError as failure:
            if _asks_for_json(args):
                from lip_cli.render import console

                message = " ".join(failure.format_message().split())
                console.print_json(console.error_document(message, failure.exit_code or EXIT_USAGE))
            raise


app = typer.Typer(
    cls=LipGroup,
    name="lip",
    help=(
        "Repair the classifier layer of a model trained on noisy labels, with no backprop "
        "(PSP + LAP, Si et al., arXiv 2505.16159)."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        from lip_cli import __version__

        typer.echo(f"lip {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option("--version", "-V", is_eager=True, callback=_print_version, help="Print lip's version."),
    ] = False,
) -> None:
    pass


for command in (repair.repair, inspect.inspect, compare.compare, features.features, demo.demo):
    app.command()(command)


def main() -> None:
    """The `lip` process: SIGTERM ends a run like Ctrl-C (exit 143), and the exit code is the
    run's whatever lands during the interpreter's shut-down."""
    signal.signal(signal.SIGTERM, exits.raise_terminated)
    exits.json_run[:] = [_asks_for_json(sys.argv[1:])]
    try:
        app()
    except (KeyboardInterrupt, SystemExit) as ending:
        code = interrupt_exit_code(ending) if isinstance(ending, KeyboardInterrupt) else ending.code
        if code in (EXIT_INTERRUPTED, EXIT_TERMINATED):
            exits.exit_interrupted(EXIT_TERMINATED if signal.SIGTERM in exits.signals_received else code)
        exits.ignore_interrupts()  # the run is over: a late Ctrl-C would only turn its code into -SIGINT
        raise
    exits.ignore_interrupts()
