"""The `lip` command: options in, library calls, results out. No numerics here.

Library modules (and so torch) are imported inside the commands so that `lip --help` and shell
completion stay instant.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from lip_cli.errors import (
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    EXIT_USAGE,
    LipError,
    Terminated,
    first_line,
    interrupt_exit_code,
)

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
                from lip_cli import report

                message = " ".join(failure.format_message().split())
                report.print_json(report.error_document(message, failure.exit_code or EXIT_USAGE))
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


class Device(StrEnum):
    cpu = "cpu"
    cuda = "cuda"


class Targets(StrEnum):
    paper = "paper"
    logit_scale = "logit-scale"
    auto = "auto"


class ComputeDtype(StrEnum):
    float32 = "float32"
    float64 = "float64"


@contextlib.contextmanager
def user_errors(as_json: bool = False) -> Iterator[None]:
    """Map user-facing failures to one line on stderr and the exit code of `lip_cli.errors`; under
    --json also to one error document on stdout."""
    from lip_cli import files

    files.placed.clear()
    _interrupt_reported.clear()
    _json_run[:] = [as_json]
    if "lip_cli.report" in sys.modules:  # a new run in the same process (tests): no document yet
        sys.modules["lip_cli.report"].printed.clear()
    try:
        _import_heavy_modules()
        yield
    except LipError as failure:
        _fail(str(failure), failure.exit_code)
        raise typer.Exit(failure.exit_code) from None
    except KeyboardInterrupt as interrupt:
        _report_interrupt(interrupt_exit_code(interrupt))
        raise typer.Exit(interrupt_exit_code(interrupt)) from None
    except Exception as failure:
        if _is_out_of_memory(failure):
            _report_out_of_memory(failure)
        elif isinstance(failure, OSError | RecursionError):
            _report_failure(failure)
        else:
            raise
        raise typer.Exit(EXIT_BAD_INPUT) from None


def _fail(message: str, code: int) -> None:
    from lip_cli import report

    report.fail(message, code, as_json=any(_json_run))


def _is_out_of_memory(failure: Exception) -> bool:
    """A MemoryError, or torch's OutOfMemoryError (CUDA's, a RuntimeError) or its CPU allocator's
    failure (a plain RuntimeError) once torch is loaded."""
    torch = sys.modules.get("torch")
    return (
        isinstance(failure, MemoryError)
        or (torch is not None and isinstance(failure, torch.OutOfMemoryError))
        or (isinstance(failure, RuntimeError) and "DefaultCPUAllocator: can't allocate" in str(failure))
    )


def _report_failure(failure: OSError | RecursionError) -> None:
    """One line for an operating-system error no check foresaw (the file it names and why), or for
    data nested deeper than Python's recursion limit, with what was already put in place."""
    if isinstance(failure, RecursionError):
        what = "an input is nested too deeply to read (past Python's recursion limit)"
    else:
        what = f"{failure.filename}: {failure.strerror}" if failure.filename else first_line(failure)
    done = _placed_so_far()
    _fail(f"{what}; " + (f"wrote only {done}" if done else "nothing was written"), EXIT_BAD_INPUT)


def _placed_so_far() -> str:
    """The outputs this run has already renamed into place, for its last line ("" for none)."""
    from lip_cli import files

    return ", ".join(map(str, files.placed))


def _report_out_of_memory(failure: BaseException) -> None:
    """One line for a run that ran out of memory, with what it had already put in place, if any."""
    detail = f" ({first_line(failure)})" if str(failure).strip() else ""
    done = _placed_so_far()
    _fail(
        f"out of memory{detail}; "
        + (f"wrote only {done}" if done else "nothing was written")
        + ": a smaller --chunk-rows or --sample-rows (--batch-size for lip features) needs less",
        EXIT_BAD_INPUT,
    )


def _report_interrupt(code: int) -> None:
    """The one line of an interrupted run, printed once: what it had already put in place, if any."""
    if not _interrupt_reported:
        _interrupt_reported.append(code)
        what = "terminated" if code == EXIT_TERMINATED else "interrupted"
        done = _placed_so_far()
        _fail(f"{what} after writing {done}" if done else f"{what}; nothing was written", code)


def _import_heavy_modules() -> None:
    """Import torch, numpy, safetensors, rich and lip's own modules with Ctrl-C and SIGTERM held
    back until they are whole.

    An interrupt in the middle of an import can leave a half-initialised module behind, which
    later fails in ways that look like bad input (or, for `decimal` under rich, prints a C warning
    when the error line is reported); the interrupt is raised once the imports end.
    """
    held = (signal.SIGINT, signal.SIGTERM)
    received: list[int] = []
    previous = {}
    try:
        for number in held:
            previous[number] = signal.signal(number, lambda number, frame: received.append(number))
    except ValueError:  # not the main thread: signals cannot be held back here
        pass
    try:
        import numpy  # noqa: F401
        import safetensors.torch  # noqa: F401
        import torch  # noqa: F401

        import lip_cli.jobs  # noqa: F401
        import lip_cli.report  # noqa: F401
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if signal.SIGTERM in received:
        raise Terminated
    if received:
        raise KeyboardInterrupt


def _raise_terminated(number: int, frame: object) -> None:
    _signals_received.append(number)
    raise Terminated


_signals_received: list[int] = []
_interrupt_reported: list[int] = []
_json_run: list[bool] = []  # whether the command running was given --json


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


@app.command()
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
            help="Validation features, to measure accuracy before and after.",
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
            help="Level of the one-sided exact McNemar test that confirms a k (--k auto) or says "
            "whether a given k's change on the validation set is significant.",
        ),
    ] = 0.05,
    force_write: Annotated[
        bool,
        typer.Option(
            "--force-write",
            help="Write what the evidence withholds, and exit 0: with --k auto an unchanged copy when no "
            "k is confirmed; a given k that the validation set shows significantly worse.",
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
        from lip_cli import distributed, jobs, plots, report

        request = jobs.RepairRequest(
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
        for path in jobs.outputs_in_the_way(request) if distributed.is_leader() else []:
            report.warning(f"{path}: already exists; without --force the run stops there if it confirms a k")
        with report.progress_bar(enabled=not json_output and distributed.is_leader()) as progress:
            result = jobs.repair_checkpoint(request, progress)
        if distributed.is_leader():
            if plot is not None:
                plots.plot_k_curve(
                    result.k_curve, plot, title=f"{result.layer.name}: accuracy after PSP + LAP"
                )
            if json_output:
                for message in result.warnings:
                    report.warning(message)
                report.print_json(report.repair_document(result))
            else:
                report.render_repair(result)
    raise typer.Exit(result.exit_code)


def usage_error(message: str, option: str) -> typer.BadParameter:
    """A misuse of the command line: exit 2 with the usage, before any work starts."""
    return typer.BadParameter(message, param_hint=option)


def _check_series_labels(names: list[str] | None, checkpoints: int) -> None:
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


@app.command()
def inspect(
    checkpoints: Annotated[
        list[Path],
        typer.Argument(
            help="Checkpoint: a torch file (.pt, .ckpt, .pth.tar...), safetensors, or a model folder. "
            "Several: one layer of each, side by side (e.g. trained at several noise levels).",
            readable=False,
        ),
    ],
    layer: Annotated[
        str | None,
        typer.Option(
            "--layer",
            help="Show this layer's full spectrum instead of the table of all 2-D weights. With several "
            "checkpoints: the layer to show (default: the first one's likely classifier).",
        ),
    ] = None,
    top: Annotated[int, typer.Option("--top", min=1, help="Singular values listed in the layer view.")] = 20,
    features: Annotated[
        Path | None,
        typer.Option(
            "--features",
            "-f",
            help="Training features: adds the accuracy that each k would give after LAP.",
            readable=False,
        ),
    ] = None,
    labels: Annotated[
        Path | None,
        typer.Option(
            "--labels", "-l", help="Training labels (found as in `lip repair` when left out).", readable=False
        ),
    ] = None,
    names: Annotated[
        list[str] | None,
        typer.Option(
            "--label",
            help="Name of a checkpoint of the series in the table, the figure's legend and the JSON; "
            "repeat it, once per checkpoint, in order (default: the file stems).",
        ),
    ] = None,
    normalize: Annotated[
        bool,
        typer.Option(
            "--normalize",
            help="With --plot: divide each spectrum by its largest value, so that shapes compare.",
        ),
    ] = False,
    device: DeviceOption = Device.cpu,
    chunk_rows: ChunkRowsOption = 16384,
    plot: PlotOption = None,
    force: ForceOption = False,
    json_output: JsonOption = False,
) -> None:
    """Show singular-value spectra: every 2-D weight, one layer in full (and the accuracy for each k),
    or one layer across a series of checkpoints."""
    series = len(checkpoints) > 1 or bool(names)
    if series and (features is not None or labels is not None):
        raise usage_error(
            "takes one checkpoint and no --label; run lip inspect once per checkpoint", "--features"
        )
    _check_series_labels(names, len(checkpoints))
    with user_errors(json_output):
        from lip_cli import files, jobs, plots, report

        inputs = jobs.input_files(checkpoints, features, labels)
        files.check_paths(inputs, [files.Output(plot) if plot else None], force)
        if series:
            with report.progress_bar(enabled=not json_output) as progress:
                spectra = jobs.inspect_series(checkpoints, layer, names or (), progress)
            if plot is not None:
                plots.plot_series(spectra, plot, normalize)
            if json_output:
                report.print_json(report.series_document(spectra))
            else:
                report.render_series(spectra)
            return
        checkpoint = checkpoints[0]
        with report.progress_bar(enabled=not json_output) as progress:
            if layer is None and features is None and labels is None:
                table = jobs.inspect_checkpoint(checkpoint, progress)
                if json_output:
                    report.print_json(report.inspect_document(table))
                else:
                    report.render_inspect(table)
                if plot is not None:  # the classifier's spectrum, already computed for the table
                    classifier = next(layer for layer in table.layers if layer.is_classifier)
                    plots.plot_layer(jobs.LayerReport(table.checkpoint, classifier), plot, normalize)
                return
            result = jobs.inspect_layer(
                checkpoint, layer, features, labels, device.value, chunk_rows, progress=progress
            )
        if plot is not None:
            plots.plot_layer(result, plot, normalize)
        if json_output:
            report.print_json(report.layer_document(result))
        else:
            report.render_layer(result, top)


@app.command()
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
    _check_series_labels(names, len(checkpoints) + 1)
    with user_errors(json_output):
        from lip_cli import files, jobs, plots, report

        inputs = jobs.input_files([reference, *checkpoints])
        files.check_paths(inputs, [files.Output(plot) if plot else None], force)
        if len(checkpoints) == 1 and not names:
            result = jobs.compare_checkpoints(reference, checkpoints[0], layer)
            if plot is not None:
                plots.plot_comparison(result, plot)
            if json_output:
                report.print_json(report.compare_document(result))
            else:
                report.render_compare(result)
            return
        with report.progress_bar(enabled=not json_output) as progress:
            results = jobs.compare_series(reference, checkpoints, layer, progress)
        names = jobs.series_labels([reference, *checkpoints], names or ())
        if plot is not None:
            plots.plot_comparison_series(results, names, plot)
        if json_output:
            report.print_json(report.compare_series_document(results, names))
        else:
            report.render_compare_series(results, names)


class FeatureDtype(StrEnum):
    float32 = "float32"
    float16 = "float16"


def parse_triple(value: str | None) -> str | None:
    """--mean/--std: three comma-separated numbers."""
    if value is None:
        return None
    parts = value.split(",")
    try:
        if len(parts) == 3:
            [float(part) for part in parts]
            return value
    except ValueError:
        pass
    raise typer.BadParameter(f"{value!r} is not three comma-separated numbers (e.g. 0.485,0.456,0.406)")


def parse_model_arg(value: str) -> str:
    """--model-arg: KEY=VALUE, the key a Python identifier."""
    key, equals, _ = value.partition("=")
    if not equals or not key.isidentifier():
        raise typer.BadParameter(f"{value!r} is not KEY=VALUE with KEY a Python name (e.g. depth=18)")
    return value


@app.command()
def features(
    checkpoint: Annotated[
        Path,
        typer.Argument(help="Trained weights: a torch file, safetensors, or a model folder.", readable=False),
    ],
    model: Annotated[
        str,
        typer.Option(
            "--model",
            help="Architecture: torchvision:NAME, timm:NAME, hf:DIR (image classification) or "
            "python:package.module:factory (a module installed or in the current folder). Its number "
            "of classes is read from the checkpoint's head (and passed to a factory that takes "
            "num_classes or num_labels).",
        ),
    ],
    data: Annotated[
        Path,
        typer.Option(
            "--data",
            help="An image folder (one sub-folder per class) or a .npy of model inputs.",
            readable=False,
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="The feature cache to write (.npy), its labels beside it: train.npy, train.labels.npy "
            "(and train.classes.json for an image folder). Missing folders are made.",
        ),
    ],
    labels: Annotated[
        Path | None,
        typer.Option(
            "--labels", "-l", help="Labels of a .npy of inputs (class ids or a matrix).", readable=False
        ),
    ] = None,
    layer: LayerOption = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Samples per forward pass.")] = 64,
    device: Annotated[Device, typer.Option("--device", help="Where the model runs.")] = Device.cpu,
    num_workers: Annotated[
        int, typer.Option("--num-workers", min=0, help="Data-loading processes (0: in this process).")
    ] = 0,
    dtype: Annotated[
        FeatureDtype, typer.Option("--dtype", help="Precision of the cache on disk.")
    ] = FeatureDtype.float32,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Only the first N samples.")] = None,
    image_size: Annotated[
        int | None,
        typer.Option("--image-size", min=1, help="Evaluation crop size (default: the model's, or 224)."),
    ] = None,
    mean: Annotated[
        str | None,
        typer.Option("--mean", parser=parse_triple, help="Normalisation mean, e.g. 0.485,0.456,0.406."),
    ] = None,
    std: Annotated[
        str | None,
        typer.Option("--std", parser=parse_triple, help="Normalisation std, e.g. 0.229,0.224,0.225."),
    ] = None,
    model_args: Annotated[
        list[str] | None,
        typer.Option(
            "--model-arg",
            parser=parse_model_arg,
            help="KEY=VALUE passed to a python: factory (repeatable); the value is read as an int, a "
            "float, true/false, else text.",
        ),
    ] = None,
    force: ForceOption = False,
    json_output: JsonOption = False,
) -> None:
    """Cache the inputs of a model's classifier layer over a data set: what `lip repair` needs."""
    with user_errors(json_output):
        from lip_cli import jobs, report

        def triple(value: str | None) -> tuple[float, float, float] | None:
            return None if value is None else tuple(float(part) for part in value.split(","))  # type: ignore[return-value]

        request = jobs.FeaturesRequest(
            checkpoint=checkpoint,
            model=model,
            data=data,
            out=out,
            labels=labels,
            layer=layer,
            batch_size=batch_size,
            device=device.value,
            num_workers=num_workers,
            dtype=dtype.value,
            limit=limit,
            image_size=image_size,
            mean=triple(mean),
            std=triple(std),
            force=force,
            model_args=tuple(tuple(pair.split("=", 1)) for pair in model_args or ()),  # type: ignore[misc]
        )
        with report.progress_bar(enabled=not json_output) as progress:
            result = jobs.extract_features(request, progress)
        if json_output:
            report.print_json(report.features_document(result))
        else:
            report.render_features(result)


def parse_noise(value: str | None) -> str | None:
    """--noise: comma-separated label-noise rates in [0, 1), no repeats."""
    if value is None:
        return None
    try:
        rates = [float(part) for part in value.split(",")]
    except ValueError:
        rates = []
    if rates and all(0.0 <= rate < 1.0 for rate in rates) and len(set(rates)) == len(rates):
        return value
    raise typer.BadParameter(f"{value!r} is not a list of distinct rates in [0, 1) (e.g. 0,0.2,0.4)")


@app.command()
def demo(
    folder: Annotated[Path, typer.Argument(help="Folder to create the demo files in.")] = Path("demo"),
    noise: Annotated[
        str | None,
        typer.Option(
            "--noise",
            parser=parse_noise,
            help="Share of training labels made random (default 0.4). Several, comma-separated "
            "(e.g. 0,0.2,0.4): one model per rate in FOLDER/noise-RATE/, trained alike on the same inputs.",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace demo files already there.")] = False,
    json_output: JsonOption = False,
) -> None:
    """Make a small noisy-label problem, train a classifier on it (CPU, seconds), cache its features."""
    with user_errors(json_output):
        from lip_cli import demo as demo_module
        from lip_cli import report

        rates = None if noise is None else [float(part) for part in noise.split(",")]
        if rates is not None and len(rates) > 1:
            results = demo_module.make_demo_series(folder, rates, force=force)
            if json_output:
                report.print_json({"demos": [result.document() for result in results]})
            else:
                report.render_demo_series(results)
            return
        settings = (
            demo_module.DemoSettings() if rates is None else demo_module.DemoSettings(noise_rate=rates[0])
        )
        result = demo_module.make_demo(folder, force=force, settings=settings)
        if json_output:
            report.print_json(result.document())
        else:
            report.render_demo(result)


def main() -> None:
    """The `lip` process: SIGTERM ends a run like Ctrl-C (exit 143), and the exit code is the
    run's whatever lands during the interpreter's shut-down."""
    signal.signal(signal.SIGTERM, _raise_terminated)
    _json_run[:] = [_asks_for_json(sys.argv[1:])]
    try:
        app()
    except (KeyboardInterrupt, SystemExit) as ending:
        code = interrupt_exit_code(ending) if isinstance(ending, KeyboardInterrupt) else ending.code
        if code in (EXIT_INTERRUPTED, EXIT_TERMINATED):
            _exit_interrupted(EXIT_TERMINATED if signal.SIGTERM in _signals_received else code)
        _ignore_interrupts()  # the run is over: a late Ctrl-C would only turn its code into -SIGINT
        raise
    _ignore_interrupts()


def _ignore_interrupts() -> None:
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, signal.SIG_IGN)


def _exit_interrupted(code: int) -> None:
    """End an interrupted process with its one line (unless a command's handler printed it: typer
    exits silently on an interrupt outside it) and `code`, and nothing else.

    Its clean-ups have run (the interrupt unwound through them). A normal exit would still run
    Python's shut-down, where a second signal, or the first one having landed inside an `exec`
    (dataclasses and namedtuples are built that way during imports), ends the process with
    SIGINT instead of the code: the flaky -2 of tests/test_safety.py.
    """
    _ignore_interrupts()
    _report_interrupt(code)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
