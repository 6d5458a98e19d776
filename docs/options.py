"""Write each command's option table into its page, from the real command.

Every page under docs/ may hold `<!-- options: NAME -->` ... `<!-- /options -->`; this script
replaces what lies between the markers with the table of `lip NAME`'s arguments and options, read
from the typer app through click (names, flags, type or choices, default, help text), so that the
pages cannot drift from `lip NAME --help`.

    python docs/options.py           rewrite the tables
    python docs/options.py --check   exit 1, naming each stale page, when a table differs
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))  # document the checkout this file sits in

import typer  # noqa: E402

from lip_cli.app import app, help_parts  # noqa: E402
from lip_cli.options import DETAILS  # noqa: E402

MARKERS = re.compile(r"(<!-- options: ([a-z-]+) -->\n)(.*?)(<!-- /options -->)", re.DOTALL)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|").replace("<", "&lt;")


def option_table(name: str) -> str:
    """The markdown table of `lip NAME`'s arguments and options: what `lip NAME --help` lists (the
    same `help_parts`), with every default and range."""
    group = typer.main.get_command(app)
    command = group if name == "lip" else group.commands[name]  # type: ignore[attr-defined]
    context = command.context_class(command, info_name=name)
    details = {**DETAILS, **getattr(sys.modules.get(command.callback.__module__), "DETAILS", {})}
    rows = ["| argument / option | value | what it does | default, range |", "| --- | --- | --- | --- |"]
    for param in command.get_params(context):
        if param.hidden or "--help" in param.opts:
            continue
        names, value, help_text, extra = help_parts(param, context)
        more = details.get(max(param.opts, key=len) if param.param_type_name == "option" else names)
        help_text = f"{help_text} {more}" if more else help_text
        cells = [
            f"`{names}`",
            f"`{value or 'flag'}`" if param.param_type_name == "option" else "",
            help_text,
            extra,
        ]
        rows.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return "\n".join(rows) + "\n"


def regenerate(text: str) -> str:
    """`text` with every marked table replaced by the current one."""
    return MARKERS.sub(lambda m: m.group(1) + option_table(m.group(2)) + m.group(4), text)


def pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for page in pages():
        text = page.read_text()
        new = regenerate(text)
        if new != text:
            stale.append(page)
            if not check:
                page.write_text(new)
    for page in stale:
        verb = "is stale (run python docs/options.py)" if check else "rewritten"
        print(f"{page.relative_to(DOCS.parent)}: option table {verb}", file=sys.stderr)
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
