"""`lip compare`: its options."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Any

import typer

from lip_cli.exits import user_errors
from lip_cli.options import (
    INPUTS,
    OUTPUT,
    ForceOption,
    JsonOption,
    JunitOption,
    PlotOption,
    check_series_labels,
    usage_error,
)

EXAMPLES = [
    "lip compare clean.pt noisy.pt",
    "lip compare base.lipb new.pt --fail-below phi@5=0.9 --junit gate.xml",
]
EXIT_CODES = "0 done (gate passed), 5 gate failed, 3 too few rows, 1 bad input, 2 usage, 130/143 signal"
GATE = "Gate (CI)"
DETAILS = {
    "CHECKPOINTS...": "Each one against the reference, in order.",
    "--label": "In the tables, the figure and the JSON; repeat it: the reference, then each checkpoint.",
    "REFERENCE": "Or its baseline file, written by lip inspect --save-baseline.",
    "--fail-below": "phi@K (phi(K, K)), effective-rank or energy@K (B - A; VALUE% in percent of A's), "
    "accuracy (B - A on --val-features, e.g. -0.01; fails only when significantly worse). Repeatable.",
    "--fail-above": "angle@K (the largest principal angle among the top K, degrees), effective-rank or "
    "energy@K. Repeatable.",
    "--val-features": "Repeat it, in order: the reference's, then each checkpoint's own cache of the same "
    "rows and labels, for the paired exact test of accuracy.",
    "--junit": "One test case per threshold; a crossed one is a failure, a failed load an error.",
    "--no-step-summary": "The markdown summary is appended to $GITHUB_STEP_SUMMARY when it is set.",
}


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
            help="The reference (A), e.g. trained on clean labels, or its baseline file.", readable=False
        ),
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
    fail_below: Annotated[
        list[Any] | None,
        typer.Option(
            "--fail-below",
            metavar="METRIC=VALUE",
            parser=_threshold_parser("below"),
            help="Exit 5 when METRIC is below VALUE (phi@K, effective-rank, energy@K, accuracy).",
            rich_help_panel=GATE,
        ),
    ] = None,
    fail_above: Annotated[
        list[Any] | None,
        typer.Option(
            "--fail-above",
            metavar="METRIC=VALUE",
            parser=_threshold_parser("above"),
            help="Exit 5 when METRIC is above VALUE (angle@K, effective-rank, energy@K).",
            rich_help_panel=GATE,
        ),
    ] = None,
    val_features: Annotated[
        list[Path] | None,
        typer.Option(
            "--val-features",
            help="Each model's validation features, reference first: the accuracy test.",
            readable=False,
            rich_help_panel=GATE,
        ),
    ] = None,
    alpha: Annotated[
        float,
        typer.Option(
            "--alpha", parser=_alpha, help="Level of the exact test of a drop.", rich_help_panel=GATE
        ),
    ] = 0.05,
    junit: JunitOption = None,
    no_step_summary: Annotated[
        bool,
        typer.Option(
            "--no-step-summary",
            help="Do not append to $GITHUB_STEP_SUMMARY.",
            rich_help_panel=OUTPUT,
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
            ci.write_junit(junit, f"lip compare {results[0].layer}", cases)
        if summary:
            warning = ci.append_step_summary(ci.compare_summary(results, labels[1:], verdict, cases))
            if warning:
                console.warning(warning)
    raise typer.Exit(GATE_EXIT_CODES[verdict])


def _report_failure(message: str, junit: Path | None, summary: bool) -> None:
    """A run that failed (a file that does not load): an <error> case and the summary say so."""
    from lip_cli.errors import LipError
    from lip_cli.render import ci, console

    if junit is not None:
        with contextlib.suppress(LipError):  # the failure's own line is what the user sees
            ci.write_junit(junit, "lip compare", [ci.error_case("compare", message)])
    if summary:
        warning = ci.append_step_summary(ci.error_summary("compare", message))
        if warning:
            console.warning(warning)
