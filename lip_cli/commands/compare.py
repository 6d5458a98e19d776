"""`lip compare`: its options."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lip_cli.exits import user_errors
from lip_cli.options import ForceOption, JsonOption, PlotOption, check_series_labels


def compare(
    reference: Annotated[
        Path,
        typer.Argument(help="The reference checkpoint (A), e.g. trained on clean labels.", readable=False),
    ],
    checkpoints: Annotated[
        list[Path],
        typer.Argument(
            help="Checkpoint(s) compared with the reference (B, ...), e.g. noisy or repaired; each one "
            "against the reference, in order.",
            readable=False,
        ),
    ],
    layer: Annotated[
        str | None,
        typer.Option("--layer", help="Layer to compare (default: the last 2-D weight of the reference)."),
    ] = None,
    names: Annotated[
        list[str] | None,
        typer.Option(
            "--label",
            help="Name of the reference, then of each checkpoint, in the tables, the figure and the JSON; "
            "repeat it, in order (default: the file stems).",
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
