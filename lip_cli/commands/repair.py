"""`lip repair`: its options."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from lip_cli.exits import user_errors
from lip_cli.options import (
    ChunkRowsOption,
    Device,
    DeviceOption,
    ForceOption,
    JsonOption,
    LayerOption,
    PlotOption,
    usage_error,
)


class Targets(StrEnum):
    paper = "paper"
    logit_scale = "logit-scale"
    auto = "auto"


class ComputeDtype(StrEnum):
    float32 = "float32"
    float64 = "float64"


def parse_k(value: str) -> str:
    """--k: a non-negative whole number, or 'auto'."""
    if value == "auto" or (value.isdigit() and int(value) >= 0):
        return value
    raise typer.BadParameter(f"{value!r} is neither a non-negative whole number nor 'auto'")


def parse_alpha(value: str) -> float:
    """--alpha: a level strictly between 0 and 1."""
    try:
        alpha = float(value)
    except ValueError:
        alpha = float("nan")
    if not 0.0 < alpha < 1.0:
        raise typer.BadParameter(f"{value!r} is not a level strictly between 0 and 1 (e.g. 0.05)")
    return alpha


def repair(
    checkpoint: Annotated[
        Path,
        typer.Argument(
            help="Checkpoint: a torch file (.pt, .ckpt, .pth.tar, .bin...), safetensors, or a model folder.",
            readable=False,
        ),
    ],
    features: Annotated[
        Path,
        typer.Option(
            "--features",
            "-f",
            help="Training features at the input of the layer (n x q): .npy, .npz, .pt, .safetensors.",
            readable=False,
        ),
    ],
    k: Annotated[
        str,
        typer.Option(
            "--k",
            "-k",
            parser=parse_k,
            help="Singular components kept as they are (PSP); the rest are re-fitted (LAP). "
            "'auto' chooses k on half of the validation (or held-out) rows and applies it only when "
            "it beats the unrepaired layer on the other half (exact McNemar test at --alpha).",
        ),
    ],
    labels: Annotated[
        Path | None,
        typer.Option(
            "--labels",
            "-l",
            help="Training labels: class ids (n) or an (n x classes) matrix. Default: the features "
            "file's own labels array, else the labels beside it (train.npy: train.labels.npy).",
            readable=False,
        ),
    ] = None,
    layer: LayerOption = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Where to write the repaired checkpoint. Default: <name>.lip<ext> beside it.",
        ),
    ] = None,
    val_features: Annotated[
        Path | None,
        typer.Option(
            "--val-features",
            help="Validation features, rows the network never trained on: --k auto chooses k on one "
            "part and confirms it on the other; a given k is refused when they show it lower by any amount.",
            readable=False,
        ),
    ] = None,
    val_labels: Annotated[
        Path | None,
        typer.Option(
            "--val-labels",
            help="Validation labels (default: found as for --features, e.g. val.labels.npy).",
            readable=False,
        ),
    ] = None,
    device: DeviceOption = Device.cpu,
    compute_dtype: Annotated[
        ComputeDtype,
        typer.Option(
            "--compute-dtype",
            help="Precision of the products over the features; their sums are accumulated in float64.",
        ),
    ] = ComputeDtype.float32,
    chunk_rows: ChunkRowsOption = 16384,
    targets: Annotated[
        Targets | None,
        typer.Option(
            "--targets",
            help="What LAP fits the tail to: 'paper' (the labels, the paper's formula), 'logit-scale' "
            "(the labels centred and scaled to the head's own logit margin; see docs/repair.md), or, with "
            "--k auto, 'auto' (both tried, chosen with k on the selection rows). Default: logit-scale "
            "with --k auto (it confirmed the most real repairs on the benchmark), paper with a given k.",
        ),
    ] = None,
    sample_rows: Annotated[
        int | None,
        typer.Option(
            "--sample-rows",
            min=1,
            help="Rows each accuracy curve is measured on: training rows, and held-out rows apart "
            "(default: 16384, a seeded random sample when there are more; standard error <= 0.4 points).",
        ),
    ] = None,
    holdout: Annotated[
        float,
        typer.Option(
            "--holdout", help="With --k auto and no validation set: share of training samples held out."
        ),
    ] = 0.1,
    seed: Annotated[
        int,
        typer.Option(
            "--seed",
            min=0,
            max=2**63 - 1,
            help="Seed of the held-out rows and of the selection / confirmation split.",
        ),
    ] = 0,
    alpha: Annotated[
        float,
        typer.Option(
            "--alpha",
            parser=parse_alpha,
            help="Level of the one-sided exact McNemar test that confirms a k (--k auto); the "
            "intervals shown are two-sided at 1 - 2 alpha, each end a one-sided bound at 1 - alpha.",
        ),
    ] = 0.05,
    force_write: Annotated[
        bool,
        typer.Option(
            "--force-write",
            help="Write what the evidence withholds, and exit 0: with --k auto an unchanged copy when no "
            "k is confirmed; a given k that the validation set shows lower by any amount.",
        ),
    ] = False,
    plot: PlotOption = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Compute and report, write nothing; exit as the run would (0, 3 or 4)."
        ),
    ] = False,
    force: ForceOption = False,
    json_output: JsonOption = False,
) -> None:
    """Repair a checkpoint's classifier layer: keep the top-k singular components, re-fit the tail.

    Under `torchrun --nproc-per-node N -m lip_cli repair ...` the ranks share the pass; rank 0 reports.
    """
    if dry_run and plot is not None:
        raise usage_error("--dry-run writes nothing, no figure either; drop --plot or --dry-run", "--plot")
    with user_errors(json_output):
        from lip_cli import distributed, plots
        from lip_cli.jobs import repair as job
        from lip_cli.render import console
        from lip_cli.render import repair as view

        request = job.RepairRequest(
            checkpoint=checkpoint,
            features=features,
            k=k if k == "auto" else int(k),
            labels=labels,
            layer=layer,
            output=output,
            val_features=val_features,
            val_labels=val_labels,
            device=device.value,
            compute_dtype=compute_dtype.value,
            chunk_rows=chunk_rows,
            force=force,
            dry_run=dry_run,
            holdout=holdout,
            seed=seed,
            sample_rows=sample_rows,
            targets=None if targets is None else targets.value,
            force_write=force_write,
            alpha=alpha,
            plot=plot,
        )
        leader = distributed.is_leader()
        for path in job.outputs_in_the_way(request) if leader else []:
            console.warning(
                f"{path}: already exists; without --force the run stops there if "
                + ("it confirms a k" if k == "auto" else "validation does not refuse the k")
            )
        with console.progress_bar(enabled=not json_output and distributed.is_leader()) as progress:
            note = console.warning if leader and console.stderr().is_terminal else None  # as progress
            result = job.repair_checkpoint(request, progress, note)
        if distributed.is_leader():
            if plot is not None:
                plots.plot_k_curve(
                    result.k_curve, plot, title=f"{result.layer.name}: accuracy after PSP + LAP"
                )
            if json_output:
                for message in result.warnings:
                    console.warning(message)
                console.print_json(view.repair_document(result))
            else:
                view.render_repair(result)
    raise typer.Exit(result.exit_code)
