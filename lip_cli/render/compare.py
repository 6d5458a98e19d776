"""`lip compare` shown: spectra side by side, phi(i, j) and principal angles, for one pair or a series."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.markup import escape
from rich.table import Table

from lip_cli.render.common import (
    sparkline,
    spectrum_document,
    spectrum_rows,
    statistics_cells,
    statistics_table,
)
from lip_cli.render.console import stdout


def render_compare(report: Any) -> None:
    console = stdout()
    a, b = report.spectrum_a, report.spectrum_b
    console.print(
        f"[bold]{report.layer}[/] ({a.shape[0]}x{a.shape[1]}):  "
        f"A = {report.checkpoint_a}   B = {report.checkpoint_b}"
    )
    summary = Table(show_header=True)
    for column in ("", "A", "B"):
        summary.add_column(column, justify="left" if not column else "right")
    summary.add_row("rank", str(a.rank), str(b.rank))
    summary.add_row("spectral norm", f"{a.spectral_norm:.4g}", f"{b.spectral_norm:.4g}")
    summary.add_row("stable rank", f"{a.stable_rank:.2f}", f"{b.stable_rank:.2f}")
    summary.add_row("effective rank", f"{a.effective_rank:.2f}", f"{b.effective_rank:.2f}")
    summary.add_row("spectrum", sparkline(a.singular_values, 30), sparkline(b.singular_values, 30))
    console.print(summary)
    values = Table(title="singular values", title_justify="left")
    for column in ("i", "A", "B", "B / A"):
        values.add_column(column, justify="right")
    ratio = report.ratio
    for index in spectrum_rows(len(a.singular_values), 0, head=8, around=0, tail=4):
        if index is None:
            values.add_row("…", "", "", "")
            continue
        values.add_row(
            str(index + 1),
            f"{a.singular_values[index]:.4g}",
            f"{b.singular_values[index]:.4g}",
            "-" if ratio[index] is None else f"{ratio[index]:.3f}",
        )
    console.print(values)
    console.print("[bold]subspace similarity phi(i, j)[/] of the top right singular vectors (1 = same span)")
    phi = Table()
    phi.add_column("i \\ j", justify="right")
    for size in report.sizes:
        phi.add_column(str(size), justify="right")
    for size, row in zip(report.sizes, report.phi, strict=True):
        phi.add_row(str(size), *(f"{value:.3f}" for value in row))
    console.print(phi)
    console.print("[bold]largest principal angle[/] between the top-k right singular subspaces")
    angles = Table()
    angles.add_column("k", justify="right")
    angles.add_column("degrees", justify="right")
    for k, degrees in report.largest_angle_degrees.items():
        angles.add_row(str(k), f"{degrees:.2f}")
    console.print(angles)
    render_same_vectors(report)


def render_compare_series(reports: Sequence[Any], labels: Sequence[str]) -> None:
    """`lip compare REF B C ...`: each checkpoint against the reference, one column per comparison."""
    console = stdout()
    labels = [escape(label) for label in labels]
    reference, names = labels[0], labels[1:]
    first = reports[0]
    console.print(
        f"[bold]{escape(first.layer)}[/] ({first.spectrum_a.shape_text}) against the reference "
        f"[bold]{reference}[/] = {escape(str(first.checkpoint_a))}"
    )
    for name, report in zip(names, reports, strict=True):
        console.print(f"  {name} = {escape(str(report.checkpoint_b))}", soft_wrap=True)
    summary = statistics_table("spectra", ("checkpoint",))
    spectra = [first.spectrum_a, *(report.spectrum_b for report in reports)]
    for name, spectrum in zip(labels, spectra, strict=True):
        summary.add_row(name, *statistics_cells(spectrum))
    console.print(summary)

    console.print(f"[bold]singular values[/] of {reference}, then each checkpoint's over them (B / A)")
    ratios = Table()
    ratios.add_column("i", justify="right")
    ratios.add_column(reference, justify="right", overflow="fold")
    for name in names:
        ratios.add_column(name, justify="right", overflow="fold")
    values = first.spectrum_a.singular_values
    for index in spectrum_rows(len(values), 0, head=8, around=0, tail=4):
        if index is None:
            ratios.add_row("…", *([""] * (len(reports) + 1)))
            continue
        cells = [report.ratio[index] for report in reports]
        ratios.add_row(
            str(index + 1),
            f"{values[index]:.4g}",
            *("-" if cell is None else f"{cell:.3f}" for cell in cells),
        )
    console.print(ratios)

    sizes = first.sizes
    console.print(
        "[bold]subspace similarity phi(k, k)[/] of the top-k right singular vectors with the "
        "reference's (1 = same span)"
    )
    phi = [[f"{report.phi[index][index]:.3f}" for index in range(len(sizes))] for report in reports]
    console.print(_by_size_table(names, sizes, phi))
    console.print("[bold]largest principal angle[/] (degrees) between the top-k right singular subspaces")
    angles = [[f"{report.largest_angle_degrees[k]:.2f}" for k in sizes] for report in reports]
    console.print(_by_size_table(names, sizes, angles))
    for name, report in zip(names, reports, strict=True):
        render_same_vectors(report, name)


def _by_size_table(names: Sequence[str], sizes: Sequence[int], columns: list[list[str]]) -> Table:
    """A row per subspace size k, a column per comparison."""
    table = Table()
    table.add_column("k", justify="right")
    for name in names:
        table.add_column(name, justify="right", overflow="fold")
    for index, k in enumerate(sizes):
        table.add_row(str(k), *(column[index] for column in columns))
    return table


def compare_document(report: Any) -> dict[str, Any]:
    return {
        "checkpoint_a": str(report.checkpoint_a),
        "checkpoint_b": str(report.checkpoint_b),
        "layer": report.layer,
        "a": spectrum_document(report.spectrum_a, full=True),
        "b": spectrum_document(report.spectrum_b, full=True),
        "ratio": report.ratio,
        "phi": {
            "sizes": report.sizes,
            "values": report.phi,
        },
        "largest_principal_angle_degrees": {str(k): v for k, v in report.largest_angle_degrees.items()},
        "same_vectors": same_vectors_document(report),
        "accuracy": accuracy_document(report.accuracy),
        "reference_baseline": report.baseline_a,
        "gate": gate_document([report]),
    }


def compare_pair_document(report: Any) -> dict[str, Any]:
    """`lip compare A B --json`: the comparison with its gate's verdict."""
    return compare_document(report)


def compare_series_document(reports: Sequence[Any], labels: Sequence[str]) -> dict[str, Any]:
    """One entry per comparison, in order, each the document of `lip compare REF X`; `gate` holds
    the verdict over all of them."""
    return {
        "reference": str(reports[0].checkpoint_a),
        "labels": list(labels),
        "layer": reports[0].layer,
        "comparisons": [compare_document(report) for report in reports],
        "gate": gate_document(reports),
    }


def render_same_vectors(report: Any, label: str = "B") -> None:
    """A compared head that holds the reference's singular vectors (a repair of it): said so, with
    its values matched by vector, since by rank its re-fitted values re-sort the components."""
    match = report.same_vectors
    if match is None:
        return
    console = stdout()
    order = "in another order" if match.reordered else "in the same order"
    console.print(
        f"[bold]{escape(label)} holds the reference's right singular vectors[/] (each within "
        f"{max(match.sines):.1g} of one, up to sign), {order}: a repair of it. Matched by vector, "
        "phi(k, k) = 1 and every angle is 0; the tables by rank compare components that its re-fitted "
        "values re-sort.",
        soft_wrap=not console.is_terminal,
    )
    table = Table(title="singular values by vector", title_justify="left")
    for column in ("i", "A", f"{label} (same vector)", "B / A", f"rank in {label}"):
        table.add_column(escape(column), justify="right")
    values_b = match.values_by_vector(report.spectrum_b.singular_values)
    ratios = report.ratio_by_vector
    for index in spectrum_rows(len(values_b), 0, head=8, around=0, tail=4):
        if index is None:
            table.add_row("…", "", "", "", "")
            continue
        table.add_row(
            str(index + 1),
            f"{report.spectrum_a.singular_values[index]:.4g}",
            f"{values_b[index]:.4g}",
            "-" if ratios[index] is None else f"{ratios[index]:.3f}",
            str(match.order[index] + 1),
        )
    console.print(table)


def render_gate(reports: Sequence[Any], labels: Sequence[str]) -> None:
    """The accuracy test and the thresholds of each comparison, then the gate's verdict."""
    console = stdout()
    for report, label in zip(reports, labels, strict=True):
        test = report.accuracy
        if test is not None:
            low, high = test.interval
            counts = test.counts
            console.print(
                f"[bold]validation accuracy[/] of {escape(label)} against the reference on {counts.rows:,} "
                f"rows: {100 * counts.change:+.1f} pt ({100 * (1 - 2 * test.alpha):g}% CI "
                f"{100 * low:+.1f} to {100 * high:+.1f}), "
                f"{counts.gains} rows gained, {counts.losses} lost, p = {test.p_value_drop:.2g} for a drop",
                soft_wrap=not console.is_terminal,
            )
    checks = [check for report in reports for check in report.checks]
    if not checks:
        return
    table = Table(title="gate", title_justify="left")
    for column in ("checkpoint", "check", "result"):
        table.add_column(column, overflow="fold")
    style = {"passed": "green", "failed": "bold red", "too few rows": "yellow"}
    for check in checks:
        table.add_row(
            escape(check.comparison),
            escape(check.threshold.rule),
            f"[{style[check.verdict]}]{check.verdict}[/]: {escape(check.detail)}",
        )
    console.print(table)
    verdict = reports[0].verdict if len(reports) == 1 else gate_verdict(reports)
    from lip_cli.errors import GATE_EXIT_CODES

    words = {"passed": "gate passed", "failed": "gate failed", "too few rows": "too few rows to tell"}
    console.print(f"[{style[verdict]}]{words[verdict]}[/] (exit {GATE_EXIT_CODES[verdict]})")


def gate_verdict(reports: Sequence[Any]) -> str:
    from lip_cli import gate

    return gate.verdict([check for report in reports for check in report.checks])


def check_document(check: Any) -> dict[str, Any]:
    threshold = check.threshold
    return {
        "threshold": threshold.text,
        "metric": threshold.metric,
        "k": threshold.k,
        "limit": threshold.value,
        "relative": threshold.relative,
        "direction": threshold.direction,
        "comparison": check.comparison,
        "value": check.value,
        "verdict": check.verdict,
        "detail": check.detail,
    }


def gate_document(reports: Sequence[Any]) -> dict[str, Any]:
    from lip_cli.errors import GATE_EXIT_CODES

    verdict = gate_verdict(reports)
    return {
        "verdict": verdict,
        "exit_code": GATE_EXIT_CODES[verdict],
        "checks": [check_document(check) for report in reports for check in report.checks],
    }


def accuracy_document(test: Any) -> dict[str, Any] | None:
    if test is None:
        return None
    counts = test.counts
    return {
        "rows": counts.rows,
        "both_right": counts.both,
        "gained": counts.gains,
        "lost": counts.losses,
        "both_wrong": counts.neither,
        "accuracy_change": counts.change,
        "ci_accuracy_change": list(test.interval),
        "ci_level": 1 - 2 * test.alpha,
        "p_value_drop": test.p_value_drop,
        "alpha": test.alpha,
        "drop_detected": test.drop_detected,
        "enough_rows": test.detectable,
        "rows_needed": test.rows_needed,
    }


def same_vectors_document(report: Any) -> dict[str, Any] | None:
    match = report.same_vectors
    if match is None:
        return None
    return {
        "order": [index + 1 for index in match.order],
        "largest_sine": max(match.sines),
        "singular_values_b": match.values_by_vector(report.spectrum_b.singular_values),
        "ratio": report.ratio_by_vector,
    }
