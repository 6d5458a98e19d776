"""`lip repair`: its options."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from lip_cli.exits import user_errors
from lip_cli.options import (
    COMPUTE,
    INPUTS,
    OUTPUT,
    ChunkRowsOption,
    Device,
    DeviceOption,
    ForceOption,
    JsonOption,
    JunitOption,
    LayerOption,
    PlotOption,
    usage_error,
)

T = TypeVar("T")


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


EXAMPLES = [
    "lip repair model.pt -f train.npy --val-features val.npy --k auto",
    "lip repair model.pt -f train.npy --k 50 -o model.k50.pt --json",
]
EXIT_CODES = "0 done, 3 no k confirmed, 4 k refused, 1 bad input, 2 usage, 130/143 signal"
K_CHOICE = "Choosing k"
DETAILS = {
    "--features": ".npy, .npz, .pt or .safetensors, a glob or a folder of shards.",
    "--k": "'auto' chooses k on half of the validation (or held-out) rows and applies it only when it "
    "beats the unrepaired layer on the other half (exact one-sided McNemar test at --alpha).",
    "--labels": "Class ids (n) or an (n x classes) matrix. Default: the features file's own labels "
    "array, else the labels beside it (train.npy: train.labels.npy).",
    "--output": "NAME.lip.EXT beside the input by default (model.pt: model.lip.pt).",
    "--val-features": "Rows the network never trained on: --k auto chooses k on one part and confirms "
    "it on the other; a given k is refused when they show it lower by any amount.",
    "--val-labels": "Found as for --features, e.g. val.labels.npy.",
    "--compute-dtype": "The products over the features; their sums are accumulated in float64 either way.",
    "--targets": "'paper': the labels, the paper's formula; 'logit-scale': the labels centred and scaled "
    "to the head's own logit margin (see docs/repair.md); 'auto' (with --k auto): both tried, chosen "
    "with k on the selection rows. Default: logit-scale, with a given k and with --k auto alike "
    "(see benchmarks/DEFAULTS.md).",
    "--sample-rows": "Training rows, and held-out rows apart; a seeded random sample when there are "
    "more (standard error <= 0.4 points).",
    "--holdout": "With --k auto and no validation set.",
    "--alpha": "Level of the one-sided test that confirms a k (--k auto); the intervals shown are "
    "two-sided at 1 - 2 alpha, each end a one-sided bound at 1 - alpha.",
    "--force-write": "With --k auto an unchanged copy when no k is confirmed; a given k that the "
    "validation set shows lower by any amount.",
    "--dry-run": "Exits 0, 3 or 4 as the same run would.",
}


def repair(
    checkpoint: Annotated[
        Path,
        typer.Argument(
            help="A torch file, safetensors, or a model folder.",
            readable=False,
        ),
    ],
    features: Annotated[
        Path,
        typer.Option(
            "--features",
            "-f",
            help="Training features at the layer's input (n x q).",
            readable=False,
            rich_help_panel=INPUTS,
        ),
    ],
    k: Annotated[
        str,
        typer.Option(
            "--k",
            "-k",
            parser=parse_k,
            metavar="K|auto",
            help="Top components kept (PSP), the tail re-fitted (LAP).",
            rich_help_panel=K_CHOICE,
        ),
    ],
    labels: Annotated[
        Path | None,
        typer.Option(
            "--labels",
            "-l",
            help="Training labels; default: in or beside the features.",
            readable=False,
            rich_help_panel=INPUTS,
        ),
    ] = None,
    layer: LayerOption = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="The repaired checkpoint (default: NAME.lip.EXT).",
            rich_help_panel=OUTPUT,
        ),
    ] = None,
    val_features: Annotated[
        Path | None,
        typer.Option(
            "--val-features",
            help="Validation features, rows never trained on: the test.",
            readable=False,
            rich_help_panel=INPUTS,
        ),
    ] = None,
    val_labels: Annotated[
        Path | None,
        typer.Option(
            "--val-labels",
            help="Validation labels; default: found as for --features.",
            readable=False,
            rich_help_panel=INPUTS,
        ),
    ] = None,
    device: DeviceOption = Device.cpu,
    compute_dtype: Annotated[
        ComputeDtype,
        typer.Option(
            "--compute-dtype",
            metavar="DTYPE",
            help="float32 or float64 products.",
            rich_help_panel=COMPUTE,
        ),
    ] = ComputeDtype.float32,
    chunk_rows: ChunkRowsOption = 16384,
    targets: Annotated[
        Targets | None,
        typer.Option(
            "--targets",
            metavar="NAME",
            help="What LAP fits: logit-scale (default), paper, auto.",
            rich_help_panel=K_CHOICE,
        ),
    ] = None,
    sample_rows: Annotated[
        int | None,
        typer.Option(
            "--sample-rows",
            min=1,
            help="Rows per accuracy curve (default: 16384).",
            rich_help_panel=K_CHOICE,
        ),
    ] = None,
    holdout: Annotated[
        float,
        typer.Option(
            "--holdout",
            help="Share held out if no --val-features.",
            rich_help_panel=K_CHOICE,
        ),
    ] = 0.1,
    seed: Annotated[
        int,
        typer.Option(
            "--seed",
            min=0,
            max=2**63 - 1,
            help="Seed of the held-out rows, the split.",
            rich_help_panel=K_CHOICE,
        ),
    ] = 0,
    alpha: Annotated[
        float,
        typer.Option(
            "--alpha",
            parser=parse_alpha,
            help="Level of the exact McNemar test.",
            rich_help_panel=K_CHOICE,
        ),
    ] = 0.05,
    force_write: Annotated[
        bool,
        typer.Option(
            "--force-write",
            help="Write what the evidence withholds, and exit 0.",
            rich_help_panel=OUTPUT,
        ),
    ] = False,
    plot: PlotOption = None,
    junit: JunitOption = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Report, write nothing; exit as the run would.",
            rich_help_panel=OUTPUT,
        ),
    ] = False,
    force: ForceOption = False,
    json_output: JsonOption = False,
) -> None:
    """Repair a checkpoint's classifier layer: keep the top-k singular components, re-fit the tail."""
    if dry_run and plot is not None:
        raise usage_error("--dry-run writes nothing, no figure either; drop --plot or --dry-run", "--plot")
    with user_errors(json_output):
        from lip_cli import distributed, plots
        from lip_cli.jobs import repair as job
        from lip_cli.render import ci, console
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
            junit=junit,
        )
        leader = distributed.is_leader()
        for path in job.outputs_in_the_way(request) if leader else []:
            console.warning(
                f"{path}: already exists; without --force the run stops there if "
                + ("it confirms a k" if k == "auto" else "validation does not refuse the k")
            )
        with console.progress_bar(enabled=not json_output and distributed.is_leader()) as progress:
            note = console.warning if leader and console.stderr().is_terminal else None  # as progress
            result = _with_junit_error(junit, lambda: job.repair_checkpoint(request, progress, note))
        if distributed.is_leader():
            if junit is not None:
                ci.write_junit(junit, "lip repair", [ci.repair_case(view.repair_document(result))])
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


def _with_junit_error(junit: Path | None, run: Callable[[], T]) -> T:
    """`run()`; a failure once the outputs were checked (`files.checked` holds --junit) also writes
    an <error> case there."""
    from lip_cli import distributed, files
    from lip_cli.errors import LipError
    from lip_cli.render import ci

    try:
        return run()
    except LipError as failure:
        if junit is not None and distributed.is_leader() and files.write_location(junit) in files.checked:
            with contextlib.suppress(LipError):  # the failure's own line is what the user sees
                ci.write_junit(junit, "lip repair", [ci.error_case("repair", str(failure))])
        raise
