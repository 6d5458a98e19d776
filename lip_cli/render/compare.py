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
    }


def compare_series_document(reports: Sequence[Any], labels: Sequence[str]) -> dict[str, Any]:
    """One entry per comparison, in order, each the document of `lip compare REF X`."""
    return {
        "reference": str(reports[0].checkpoint_a),
        "labels": list(labels),
        "layer": reports[0].layer,
        "comparisons": [compare_document(report) for report in reports],
    }
