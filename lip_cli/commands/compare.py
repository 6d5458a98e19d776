"""`lip compare`: its options."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lip_cli.exits import user_errors
from lip_cli.options import INPUTS, OUTPUT, ForceOption, JsonOption, PlotOption, check_series_labels

EXAMPLES = [
    "lip compare clean.pt noisy.pt",
    "lip compare clean.pt noisy.pt --json | jq .largest_principal_angle_degrees",
]
EXIT_CODES = "0 done, 1 bad input, 2 usage, 130/143 signal"
DETAILS = {
    "CHECKPOINTS...": "Each one against the reference, in order.",
    "--label": "In the tables, the figure and the JSON; repeat it: the reference, then each checkpoint.",
}


def compare(
    reference: Annotated[
        Path,
        typer.Argument(help="The reference (A), e.g. trained on clean labels.", readable=False),
    ],
    checkpoints: Annotated[
        list[Path],
        typer.Argument(
            help="Compared with the reference (B, ...), e.g. noisy or repaired.",
            readable=False,
        ),
    ],
    layer: Annotated[
        str | None,
        typer.Option(
            "--layer",
            metavar="NAME",
            help="Layer to compare (default: the reference's classifier).",
            rich_help_panel=INPUTS,
        ),
    ] = None,
    names: Annotated[
        list[str] | None,
        typer.Option(
            "--label",
            metavar="NAME",
            help="A name per checkpoint, reference first (default: stems).",
            rich_help_panel=OUTPUT,
        ),
    ] = None,
    plot: PlotOption = None,
    force: ForceOption = False,
    json_output: JsonOption = False,
) -> None:
    """Compare one layer against a reference: spectra, subspace similarity phi(i, j), principal angles."""
    check_series_labels(names, len(checkpoints) + 1)
    with user_errors(json_output):
        from lip_cli import files, plots
        from lip_cli.jobs import compare as job
        from lip_cli.jobs.common import input_files
        from lip_cli.jobs.inspect import series_labels
        from lip_cli.render import compare as view
        from lip_cli.render import console

        inputs = input_files([reference, *checkpoints])
        files.check_paths(inputs, [files.Output(plot) if plot else None], force)
        if len(checkpoints) == 1 and not names:
            result = job.compare_checkpoints(reference, checkpoints[0], layer)
            if plot is not None:
                plots.plot_comparison(result, plot)
            if json_output:
                console.print_json(view.compare_document(result))
            else:
                view.render_compare(result)
            return
        with console.progress_bar(enabled=not json_output) as progress:
            results = job.compare_series(reference, checkpoints, layer, progress)
        names = series_labels([reference, *checkpoints], names or ())
        if plot is not None:
            plots.plot_comparison_series(results, names, plot)
        if json_output:
            console.print_json(view.compare_series_document(results, names))
        else:
            view.render_compare_series(results, names)
