"""Option types that several commands share, and their checks; each command's own options live in
its module under `lip_cli.commands`.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer


class Device(StrEnum):
    cpu = "cpu"
    cuda = "cuda"


# The panels that `lip NAME --help` groups its options in (lip_cli.app.LipCommand).
INPUTS = "Inputs"
OUTPUT = "Output"
COMPUTE = "Compute"


# What docs/NAME.md's option tables say beyond an option's --help line (docs/options.py), for the
# options several commands share; each command module has its own DETAILS for the rest.
DETAILS = {
    "--layer": "A module path: fc stands for fc.weight and fc.bias.",
    "--plot": "matplotlib comes with pip install 'lip-cli[plot]'.",
    "--force": "Files, or folders that are empty or that lip wrote.",
    "--chunk-rows": "Bounds the memory of the pass.",
    "--json": "Also for a bad command line and on every failure: see exit-codes.md.",
}


JsonOption = Annotated[
    bool,
    typer.Option("--json", help="One JSON document on stdout, nothing else there.", rich_help_panel=OUTPUT),
]


DeviceOption = Annotated[
    Device, typer.Option("--device", help="Where the statistics pass runs.", rich_help_panel=COMPUTE)
]


ChunkRowsOption = Annotated[
    int,
    typer.Option("--chunk-rows", min=1, help="Feature rows read at a time.", rich_help_panel=COMPUTE),
]


LayerOption = Annotated[
    str | None,
    typer.Option(
        "--layer",
        metavar="NAME",
        help="The classifier layer (fc); default: from the shapes.",
        rich_help_panel=INPUTS,
    ),
]


PlotOption = Annotated[
    Path | None,
    typer.Option(
        "--plot",
        help="Also save a PNG figure (needs matplotlib).",
        rich_help_panel=OUTPUT,
    ),
]


JunitOption = Annotated[
    Path | None,
    typer.Option("--junit", metavar="PATH", help="Also write a JUnit XML report.", rich_help_panel=OUTPUT),
]


ForceOption = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Replace outputs that exist (see docs/safety.md).",
        rich_help_panel=OUTPUT,
    ),
]


def usage_error(message: str, option: str) -> typer.BadParameter:
    """A misuse of the command line: exit 2 with the usage, before any work starts."""
    return typer.BadParameter(message, param_hint=option)


def check_series_labels(names: list[str] | None, checkpoints: int) -> None:
    """--label: one per checkpoint, each a name, no two the same (they head columns and legends)."""
    if not names:
        return
    if len(names) != checkpoints:
        message = f"{len(names)} given for {checkpoints} checkpoints; give one per checkpoint"
        raise usage_error(message, "--label")
    if any(not name.strip() for name in names):
        raise usage_error("an empty label names nothing; give each checkpoint a name", "--label")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise usage_error(f"{repeated[0]!r} given twice; give each checkpoint its own name", "--label")
