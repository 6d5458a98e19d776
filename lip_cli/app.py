"""The typer app: the commands of `lip_cli.commands`, `--version`, a global `--json`, and help and
usage errors that read at 80 columns (plain text, no rich: `lip --help` stays instant).

`lip_cli.cli` is the process around it (signals, closed pipes, exit codes) and names this app
`lip_cli.cli.app`.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup

from lip_cli import exits
from lip_cli.commands import compare, demo, features, inspect, repair
from lip_cli.errors import EXIT_USAGE

# click's UsageError and MissingParameter, whichever click typer runs on (typer >= 0.23 carries its
# own copy)
UsageError = next(kind for kind in typer.BadParameter.__mro__ if kind.__name__ == "UsageError")
MissingParameter = sys.modules[UsageError.__module__].MissingParameter

COMMANDS = (repair, inspect, compare, features, demo)
DOCS = "docs/{name}.md in lip's repository"
HELP_COLUMN = 22  # the widest option column of --help before a row's text moves to its own line


def _print_usage_error_document(failure: Exception, asked: bool) -> None:
    """Under --json a bad command line prints its error document on stdout too."""
    if asked:
        from lip_cli.render import console

        message = " ".join(failure.format_message().split())
        console.print_json(console.error_document(message, getattr(failure, "exit_code", 0) or EXIT_USAGE))


def _metavar(param: Any, ctx: Any) -> str:
    """The value an option takes, in capitals (PATH, INT) or as its choices (cpu|cuda)."""
    if param.metavar:
        return param.metavar
    shown = (param.display_type_rich(ctx=ctx) or "").strip("<>")
    words = {"path": "PATH", "int range": "INT", "int": "INT", "float": "FLOAT", "str": "TEXT"}
    more = shown.endswith("...") and not shown.endswith(">...")
    shown = shown.removesuffix("...").strip("<>")
    return words.get(shown, shown) + ("..." if more else "")


def _range(param: Any) -> str:
    """A number's range as typer words it ("x>=1"), with 2**63 for the int64 bound."""
    if getattr(param, "max", None) == 2**63 - 1:
        return f"{param.min}<=x<2**63"
    describe = getattr(param, "_get_number_range_help_str", None)
    return (describe() or "") if describe else ""


def _shown_in_help(extra: str) -> bool:
    """What --help shows of a parameter's extras: its default and any range that says more than
    "a count" (the usage line names the required ones; docs/NAME.md's table has them all)."""
    return extra not in ("required", "x>=0", "x>=1") and not extra.endswith("<2**63")


def help_parts(param: Any, ctx: Any) -> tuple[str, str, str, str]:
    """(names, value, help, "default: ...; range; required") of an argument or option, as
    `lip NAME --help` shows it and docs/options.py tabulates it."""
    help_text = " ".join((param.help or "").split())
    extra = []
    if param.param_type_name == "argument":
        names = (param.metavar or param.name).upper() + ("..." if param.nargs != 1 else "")
        value = ""
    else:
        names = ", ".join(sorted(param.opts, key=len))
        value = "" if param.is_flag or param.count else _metavar(param, ctx)
    default = param._extract_default_help_str(ctx=ctx)
    show = param.show_default if param.show_default is not None else ctx.show_default
    flag_off = param.param_type_name == "option" and param.is_flag and not default
    if default is not None and show and not flag_off and not param.required:
        text = param._get_default_string(ctx=ctx, show_default_is_str=False, default_value=default)
        if text:
            extra.append(f"default: {text}")
    if _range(param):
        extra.append(_range(param))
    if param.required:
        extra.append("required")
    return names, value, help_text, "; ".join(extra)


class LipCommand(TyperCommand):
    """A command whose help fits 80 columns (options in panels, examples, exit codes, its docs
    page) and whose usage error names every missing required option at once."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        """`[OPTIONS] CHECKPOINT -f PATH -k K|auto`: the arguments, then the required options."""
        pieces = [self.options_metavar] if self.options_metavar else []
        required = []
        for param in self.get_params(ctx):
            names, value, _, _ = help_parts(param, ctx)
            if param.param_type_name == "argument":
                pieces.append(names if param.required else f"[{names}]")
            elif param.required:
                required.append(f"{min(param.opts, key=len)} {value}")
        return pieces + required

    def format_options(self, ctx: Any, formatter: Any) -> None:
        """The arguments, then the options in their panels (the help option in the last one), in one
        column width."""
        panels: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            if getattr(param, "hidden", False):
                continue
            names, value, help_text, extra = help_parts(param, ctx)
            if param.param_type_name == "argument":
                panel = "Arguments"
            elif "--help" in param.opts:
                panel = next(reversed(panels), "Options")
            else:
                panel = param.rich_help_panel or "Options"
            extra = "; ".join(part for part in extra.split("; ") if _shown_in_help(part))
            row = f"{names} {value}".strip()
            panels.setdefault(panel, []).append((row, f"{help_text}  [{extra}]" if extra else help_text))
        width = min(max(len(row) for rows in panels.values() for row, _ in rows), HELP_COLUMN)
        for panel, rows in panels.items():
            with formatter.section(panel):
                formatter.write_dl([(row.ljust(width), text) for row, text in rows], col_max=width)

    def format_epilog(self, ctx: Any, formatter: Any) -> None:
        """Examples, exit codes and the docs page: each command module's EXAMPLES and EXIT_CODES."""
        module = sys.modules[self.callback.__module__]
        formatter.write_paragraph()
        formatter.write_text("Examples:")
        for example in getattr(module, "EXAMPLES", []):
            formatter.write(f"  {example}\n")
        formatter.write_paragraph()
        formatter.write_text(f"Exit codes: {getattr(module, 'EXIT_CODES', 'see docs/exit-codes.md')}.")
        formatter.write_text(f"More: {DOCS.format(name=self.name)}, docs/exit-codes.md.")

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        given = list(args)
        try:
            return super().parse_args(ctx, args)
        except MissingParameter as failure:
            missing = self._missing(ctx, given)
            if len(missing) < 2:
                raise
            raise UsageError("Missing " + _and(missing) + ".", ctx) from failure

    def _missing(self, ctx: Any, args: list[str]) -> list[str]:
        """Every required argument and option that the command line leaves out, in help order."""
        opts, _, _ = self.make_parser(ctx).parse_args(args=list(args))
        missing = []
        for param in self.get_params(ctx):
            if param.required and param.value_is_missing(param.consume_value(ctx, opts)[0]):
                hint = f"'{help_parts(param, ctx)[0]}'" if param.param_type_name == "argument" else None
                missing.append(f"{param.param_type_name} {hint or param.get_error_hint()}")
        return missing


def _and(items: list[str]) -> str:
    return ", ".join(items[:-1]) + " and " + items[-1]


class LipGroup(TyperGroup):
    """The commands. A global --json (`lip --json repair ...`) means the command's own --json; a bad
    command line under --json also prints its error document on stdout."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        ctx.meta["lip_json"] = exits.asks_for_json(args)
        try:
            return super().parse_args(ctx, _json_after_the_command(args))
        except UsageError as failure:
            _print_usage_error_document(failure, exits.asks_for_json(args))
            raise

    def invoke(self, ctx: Any) -> object:
        protected = vars(ctx).get("_protected_args", vars(ctx).get("protected_args", []))
        args = [*protected, *ctx.args]
        try:
            return super().invoke(ctx)
        except UsageError as failure:
            _print_usage_error_document(failure, ctx.meta.get("lip_json") or exits.asks_for_json(args))
            raise


def _json_after_the_command(args: list[str]) -> list[str]:
    """`--json` (or `--json=...`) given before the command's name moved just after it."""
    command = next((index for index, word in enumerate(args) if not word.startswith("-")), None)
    if command is None:
        return args
    before = [word for word in args[:command] if exits.asks_for_json([word])]
    if not before:
        return args
    rest = [word for word in args[:command] if word not in before]
    return [*rest, args[command], *before, *args[command + 1 :]]


app = typer.Typer(
    cls=LipGroup,
    name="lip",
    help=(
        "Repair the classifier layer of a model trained on noisy labels, with no backprop "
        "(PSP + LAP, Si et al., arXiv 2505.16159)."
    ),
    epilog="Run lip COMMAND --help for a command's options, examples and exit codes; docs/ in lip's "
    "repository has a page per command.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(ctx: typer.Context, value: bool) -> None:
    if value:
        from lip_cli import __version__

        if ctx.meta.get("lip_json"):
            from lip_cli.render import console

            console.print_json({})
        else:
            typer.echo(f"lip {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option("--version", "-V", is_eager=True, callback=_print_version, help="Print lip's version."),
    ] = False,
    json_output: Annotated[
        bool,
        typer.Option("--json", help="The same as the command's --json: one JSON document on stdout."),
    ] = False,
) -> None:
    pass


for command in COMMANDS:
    app.command(cls=LipCommand)(getattr(command, command.__name__.rsplit(".", 1)[-1]))
