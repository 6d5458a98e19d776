"""`lip compare`: its options."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Any

import typer

from lip_cli.exits import user_errors
from lip_cli.options import ForceOption, JsonOption, PlotOption, check_series_labels, usage_error


def _threshold_parser(direction: str) -> Any:
    def parse(value: str) -> Any:
        from lip_cli import gate

        try:
            return gate.parse_threshold(value, direction)
        except ValueError as error:
            raise typer.BadParameter(str(error)) from None

    return parse


def _alpha(value: str) -> float:
    from lip_cli.commands.repair import parse_alpha

    return parse_alpha(value)


def compare(
    reference: Annotated[
        Path,
        typer.Argument(
            help="The reference checkpoint (A), e.g. trained on clean labels, or its baseline file "
            "(lip inspect --save-baseline).",
            readable=False,
        ),
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
    fail_below: Annotated[
        list[Any] | None,
        typer.Option(
            "--fail-below",
            metavar="<METRIC=VALUE>",
            parser=_threshold_parser("below"),
            help="Gate: exit 5 when METRIC of a checkpoint against the reference is below VALUE: phi@K "
            "(phi(K, K)), effective-rank or energy@K (B - A; VALUE% in percent of A's), accuracy (B - A "
            "on --val-features, e.g. -0.01; fails only when significantly worse). Repeatable.",
        ),
    ] = None,
    fail_above: Annotated[
        list[Any] | None,
        typer.Option(
            "--fail-above",
            metavar="<METRIC=VALUE>",
            parser=_threshold_parser("above"),
            help="Gate: exit 5 when METRIC is above VALUE: angle@K (the largest principal angle, "
            "degrees), effective-rank or energy@K. Repeatable.",
        ),
    ] = None,
    val_features: Annotated[
        list[Path] | None,
        typer.Option(
            "--val-features",
            help="Validation features of the reference, then of each checkpoint (repeat it, in order): "
            "each model's own cache of the same rows and labels, for the paired accuracy test.",
            readable=False,
        ),
    ] = None,
    alpha: Annotated[
        float,
        typer.Option("--alpha", parser=_alpha, help="Level of the exact one-sided test of an accuracy drop."),
    ] = 0.05,
    junit: Annotated[
        Path | None,
        typer.Option("--junit", help="Also write a JUnit XML report here: one test case per threshold."),
    ] = None,
    no_step_summary: Annotated[
        bool,
        typer.Option(
            "--no-step-summary",
            help="Do not append the markdown summary to $GITHUB_STEP_SUMMARY (appended when it is set).",
        ),
    ] = False,
    plot: PlotOption = None,
    force: ForceOption = False,
    json_output: JsonOption = False,
) -> None:
    """Compare one layer against a reference: spectra, subspace similarity phi(i, j), principal angles;
    with --fail-below / --fail-above, a gate that exits 5 when a threshold is crossed."""
    check_series_labels(names, len(checkpoints) + 1)
    thresholds = [*(fail_below or ()), *(fail_above or ())]
    if val_features and len(val_features) != len(checkpoints) + 1:
        raise usage_error(
            f"{len(val_features)} given for {len(checkpoints) + 1} models; give one per model, the "
            "reference's first",
            "--val-features",
        )
    if any(threshold.metric == "accuracy" for threshold in thresholds) and not val_features:
        raise usage_error(
            "needs --val-features: each model's validation features of the same rows", "--fail-below accuracy"
        )
    with user_errors(json_output):
        from lip_cli import files, plots
        from lip_cli.errors import GATE_EXIT_CODES, LipError
        from lip_cli.jobs import compare as job
        from lip_cli.jobs.common import input_files
        from lip_cli.jobs.inspect import series_labels
        from lip_cli.render import ci, console
        from lip_cli.render import compare as view

        inputs = input_files([reference, *checkpoints])
        for path in val_features or ():
            inputs += input_files([], path)
        junit_output = files.Output(junit, suffixes=(".xml",)) if junit else None
        files.check_paths(inputs, [files.Output(plot) if plot else None, junit_output], force)
        labels = series_labels([reference, *checkpoints], names or ())
        summary = not no_step_summary
        pair = len(checkpoints) == 1 and not names
        try:
            with console.progress_bar(enabled=not json_output and not pair) as progress:
                results = job.compare_series(
                    reference, checkpoints, layer, progress, thresholds, labels[1:], val_features or (), alpha
                )
        except LipError as failure:
            _report_failure(str(failure), junit, summary)
            raise
        if plot is not None:
            if pair:
                plots.plot_comparison(results[0], plot)
            else:
                plots.plot_comparison_series(results, labels, plot)
        if json_output:
            document = (
                view.compare_pair_document(results[0])
                if pair
                else view.compare_series_document(results, labels)
            )
            console.print_json(document)
        elif pair:
            view.render_compare(results[0])
        else:
            view.render_compare_series(results, labels)
        if not json_output:
            view.render_gate(results, labels[1:] if not pair else ["B"])
        cases = ci.compare_cases(results, labels[1:])
        verdict = view.gate_verdict(results)
        if junit is not None:
            _write_junit(junit, f"lip compare {results[0].layer}", cases)
        if summary:
            warning = ci.append_step_summary(ci.compare_summary(results, labels[1:], verdict, cases))
            if warning:
                console.warning(warning)
    raise typer.Exit(GATE_EXIT_CODES[verdict])


def _write_junit(path: Path, suite: str, cases: list) -> None:
    from lip_cli.render import ci
    from lip_cli.writes import atomic_output

    with atomic_output(path) as temporary:
        temporary.write_text(ci.junit_xml(suite, cases), encoding="utf-8")


def _report_failure(message: str, junit: Path | None, summary: bool) -> None:
    """A run that failed (a file that does not load): an <error> case and the summary say so."""
    from lip_cli.errors import LipError
    from lip_cli.render import ci, console

    if junit is not None:
        with contextlib.suppress(LipError):  # the failure's own line is what the user sees
            _write_junit(junit, "lip compare", [ci.error_case("compare", message)])
    if summary:
        warning = ci.append_step_summary(ci.error_summary("compare", message))
        if warning:
            console.warning(warning)
