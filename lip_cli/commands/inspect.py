"""`lip inspect`: its options."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from lip_cli.exits import user_errors
from lip_cli.options import (
    INPUTS,
    OUTPUT,
    ChunkRowsOption,
    Device,
    DeviceOption,
    ForceOption,
    JsonOption,
    PlotOption,
    check_series_labels,
    usage_error,
)

EXAMPLES = [
    "lip inspect model.pt | grep fc",
    "lip inspect model.pt --layer fc -f train.npy --plot spectrum.png",
]
EXIT_CODES = "0 done, 1 bad input, 2 usage, 130/143 signal"
DETAILS = {
    "CHECKPOINTS...": "A torch file (.pt, .ckpt, .pth.tar...), safetensors, or a model folder. Several: "
    "one layer of each, side by side (e.g. trained at several noise levels).",
    "--layer": "With several checkpoints: the layer to show (default: the first one's likely classifier).",
    "--label": "In the table, the figure's legend and the JSON; repeat it, once per checkpoint.",
    "--normalize": "So that the shapes of the spectra compare.",
}


class FitTargets(StrEnum):
    paper = "paper"
    logit_scale = "logit-scale"


def inspect(
    checkpoints: Annotated[
        list[Path],
        typer.Argument(
            help="Torch files, safetensors or model folders; several: one layer of each.",
            readable=False,
        ),
    ],
    layer: Annotated[
        str | None,
        typer.Option(
            "--layer",
            metavar="NAME",
            help="This layer's full spectrum, not the table of every 2-D weight.",
            rich_help_panel=INPUTS,
        ),
    ] = None,
    top: Annotated[
        int,
        typer.Option(
            "--top", min=1, help="Singular values listed in the layer view.", rich_help_panel=OUTPUT
        ),
    ] = 20,
    features: Annotated[
        Path | None,
        typer.Option(
            "--features",
            "-f",
            help="Training features: adds the accuracy at each k after LAP.",
            readable=False,
            rich_help_panel=INPUTS,
        ),
    ] = None,
    labels: Annotated[
        Path | None,
        typer.Option(
            "--labels",
            "-l",
            help="Training labels (default: found as by lip repair).",
            readable=False,
            rich_help_panel=INPUTS,
        ),
    ] = None,
    targets: Annotated[
        FitTargets | None,
        typer.Option(
            "--targets",
            help="With --features: what LAP fits the tail to: 'logit-scale' (the labels centred and scaled "
            "to the head's own logit margin) or 'paper' (the paper's formula). Default: lip repair's.",
        ),
    ] = None,
    names: Annotated[
        list[str] | None,
        typer.Option(
            "--label",
            metavar="NAME",
            help="A name per checkpoint, in order (default: the file stems).",
            rich_help_panel=OUTPUT,
        ),
    ] = None,
    normalize: Annotated[
        bool,
        typer.Option(
            "--normalize",
            help="With --plot: each spectrum over its largest value.",
            rich_help_panel=OUTPUT,
        ),
    ] = False,
    save_baseline: Annotated[
        Path | None,
        typer.Option(
            "--save-baseline",
            help="Also save what lip compare needs of the layer (--layer, else the likely classifier) to "
            "this small safetensors file: its singular values and vectors, the source's sha256.",
        ),
    ] = None,
    device: DeviceOption = Device.cpu,
    chunk_rows: ChunkRowsOption = 16384,
    plot: PlotOption = None,
    force: ForceOption = False,
    json_output: JsonOption = False,
) -> None:
    """Show singular-value spectra: every 2-D weight, one layer in full (and the accuracy for each k),
    or one layer across a series of checkpoints."""
    series = len(checkpoints) > 1 or bool(names)
    if targets is not None and features is None:
        raise usage_error("needs --features (the k curve is fitted to them)", "--targets")
    if series and (features is not None or labels is not None):
        raise usage_error(
            "takes one checkpoint and no --label; run lip inspect once per checkpoint", "--features"
        )
    if series and save_baseline is not None:
        raise usage_error(
            "saves the baseline of one checkpoint; run lip inspect once per checkpoint", "--save-baseline"
        )
    check_series_labels(names, len(checkpoints))
    with user_errors(json_output):
        from lip_cli import files, plots
        from lip_cli.jobs import inspect as job
        from lip_cli.jobs.common import input_files
        from lip_cli.render import console
        from lip_cli.render import inspect as view

        inputs = input_files(checkpoints, features, labels)
        baseline_output = files.Output(save_baseline) if save_baseline else None
        files.check_paths(inputs, [files.Output(plot) if plot else None, baseline_output], force)
        if series:
            with console.progress_bar(enabled=not json_output) as progress:
                spectra = job.inspect_series(checkpoints, layer, names or (), progress)
            if plot is not None:
                plots.plot_series(spectra, plot, normalize)
            if json_output:
                console.print_json(view.series_document(spectra))
            else:
                view.render_series(spectra)
            return
        checkpoint = checkpoints[0]
        if save_baseline is not None:
            job.save_baseline(checkpoint, layer, save_baseline)
            if not json_output:
                console.stdout().print(f"wrote the baseline {save_baseline}", soft_wrap=True, markup=False)
        with console.progress_bar(enabled=not json_output) as progress:
            if layer is None and features is None and labels is None:
                table = job.inspect_checkpoint(checkpoint, progress)
                if json_output:
                    console.print_json(view.inspect_document(table))
                else:
                    view.render_inspect(table)
                if plot is not None:  # the classifier's spectrum, already computed for the table
                    classifier = next(layer for layer in table.layers if layer.is_classifier)
                    plots.plot_layer(job.LayerReport(table.checkpoint, classifier), plot, normalize)
                return
            result = job.inspect_layer(
                checkpoint,
                layer,
                features,
                labels,
                device.value,
                chunk_rows,
                progress,
                *([targets.value] if targets else []),
            )
        if plot is not None:
            plots.plot_layer(result, plot, normalize)
        if json_output:
            console.print_json(view.layer_document(result))
        else:
            view.render_layer(result, top)
