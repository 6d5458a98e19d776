"""`lip inspect` shown: the table of a checkpoint's 2-D weights, one layer in full, a series."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table

from lip_cli.render.common import (
    percent,
    render_k_curve,
    render_provenance,
    sparkline,
    spectrum_document,
    statistics_cells,
    statistics_table,
)
from lip_cli.render.console import bar, stdout


def render_inspect(report: Any) -> None:
    render_provenance(report.provenance)
    table = statistics_table(f"2-D weights of {report.checkpoint}", ("layer", "dtype"))
    for layer in report.layers:
        name = escape(layer.name) + (" [bold green]◀[/]" if layer.is_classifier else "")
        table.add_row(name, layer.dtype, *statistics_cells(layer))
    console = stdout()
    console.print(table)
    console.print(
        f"[dim]◀ the likely classifier; not shown: {report.other_tensors} other tensors (biases, norms, "
        "convolutions, buffers)[/]"
    )


def render_series(series: Any) -> None:
    """`lip inspect A B C ...`: a row per checkpoint for one layer."""
    dtypes = ", ".join(sorted({layer.spectrum.dtype for layer in series.layers}))
    table = statistics_table(
        f"`{series.layer}` ({dtypes}) in {len(series.layers)} checkpoints",
        ("checkpoint",),
        ("k for\n90/95/99%",),
    )
    for label, layer in zip(series.labels, series.layers, strict=True):
        spectrum = layer.spectrum
        table.add_row(
            escape(label),
            *statistics_cells(spectrum),
            "/".join(str(k) for k in spectrum.k_for_energy.values()),
        )
    console = stdout()
    for label, layer in zip(series.labels, series.layers, strict=True):
        if layer.provenance:
            console.print(f"[bold]{escape(label)}[/]:", end=" ")
            render_provenance(layer.provenance)
    console.print(table)


def layer_summary_rows(spectrum: Any) -> Table:
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("layer", f"{spectrum.name}  ({spectrum.shape[0]}x{spectrum.shape[1]}, {spectrum.dtype})")
    summary.add_row("rank", f"{spectrum.rank} of {len(spectrum.singular_values)}")
    summary.add_row("spectral norm", f"{spectrum.spectral_norm:.4g}")
    summary.add_row("stable rank", f"{spectrum.stable_rank:.2f}")
    summary.add_row("effective rank", f"{spectrum.effective_rank:.2f}")
    summary.add_row(
        "k for energy", "   ".join(f"{level:.0%}: {k}" for level, k in spectrum.k_for_energy.items())
    )
    summary.add_row("spectrum", sparkline(spectrum.singular_values))
    return summary


def render_layer(report: Any, top: int) -> None:
    console = stdout()
    spectrum = report.spectrum
    console.print(f"[bold]{report.checkpoint}[/]")
    render_provenance(report.provenance)
    console.print(layer_summary_rows(spectrum))
    values = spectrum.singular_values
    energy = spectrum.cumulative_energy
    table = Table(title=f"top {min(top, len(values))} of {len(values)} singular values", title_justify="left")
    for column in ("i", "sigma", "cumulative energy", ""):
        table.add_column(column, justify="right" if column else "left", no_wrap=True)
    for index in range(min(top, len(values))):
        table.add_row(
            str(index + 1), f"{values[index]:.4g}", percent(energy[index]), bar(values[index], values[0])
        )
    console.print(table)
    if report.k_curve:
        render_k_curve(report.k_curve, report.samples, report.labels_origin, targets=report.targets)


def inspect_document(report: Any) -> dict[str, Any]:
    return {
        "checkpoint": str(report.checkpoint),
        "layers": [spectrum_document(layer, full=False) for layer in report.layers],
        "other_tensors": report.other_tensors,
        "provenance": report.provenance,
    }


def layer_document(report: Any) -> dict[str, Any]:
    return {
        "checkpoint": str(report.checkpoint),
        "layer": spectrum_document(report.spectrum, full=True),
        "samples": report.samples,
        "labels_source": report.labels_origin,
        "k_curve": report.k_curve,
        "targets": report.targets,
        "provenance": report.provenance,
    }


def series_document(series: Any) -> dict[str, Any]:
    """One entry per checkpoint, in order: its label and the fields of `lip inspect X --layer L`."""
    return {
        "layer": series.layer,
        "checkpoints": [
            {"label": label} | layer_document(report)
            for label, report in zip(series.labels, series.layers, strict=True)
        ],
    }
