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


JsonOption = Annotated[
    bool, typer.Option("--json", help="Print one JSON document on stdout and nothing else there.")
]


DeviceOption = Annotated[Device, typer.Option("--device", help="Where the statistics pass runs.")]


ChunkRowsOption = Annotated[
    int, typer.Option("--chunk-rows", min=1, help="Feature rows read at a time (bounds memory).")
]


LayerOption = Annotated[
    str | None,
    typer.Option(
        "--layer",
        help="Module path of the classifier layer (fc -> fc.weight, fc.bias). "
        "Found from the shapes when left out.",
    ),
]


PlotOption = Annotated[
    Path | None,
    typer.Option(
        "--plot", help="Also save a PNG figure here (needs matplotlib: pip install 'lip-cli\\[plot]')."
    ),
]


ForceOption = Annotated[
    bool,
    typer.Option(
        "--force", help="Replace existing outputs: files, or folders that are empty or that lip wrote."
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
