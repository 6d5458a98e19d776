"""PNG figures with matplotlib (the optional `plot` extra): spectra, accuracy against k, phi maps."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from lip_cli.errors import LipError
from lip_cli.writes import atomic_output

if TYPE_CHECKING:
    from collections.abc import Sequence

    from lip_cli.jobs.compare import CompareReport
    from lip_cli.jobs.inspect import LayerReport, SeriesReport


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as error:
        raise LipError("--plot needs matplotlib: pip install 'lip-cli[plot]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure: Any, path: Path) -> None:
    """Write the figure as a PNG (atomically) and free it."""
    try:
        with atomic_output(path) as temporary:
            figure.savefig(temporary, format="png", dpi=120, bbox_inches="tight")
    finally:
        _pyplot().close(figure)


def _plain(label: str) -> str:
    """A name as matplotlib should show it: no mathtext from `$`, and not hidden for a leading `_`."""
    text = label.replace("$", r"\$")
    return " " + text if text.startswith("_") else text


def _spectrum_axes(
    axis: Any, values: list[float], label: str, color: str | None, normalize: bool = False
) -> None:
    """Positive singular values against their index on a log scale; with `normalize`, over the largest."""
    scale = values[0] if normalize and values and values[0] > 0 else 1.0
    positive = [(i + 1, v / scale) for i, v in enumerate(values) if v > 0]
    axis.semilogy([i for i, _ in positive], [v for _, v in positive], ".-", color=color, label=label)
    axis.set_xlabel("component i")
    axis.set_ylabel("singular value / largest (log)" if normalize else "singular value (log)")
    axis.grid(True, which="both", alpha=0.3)


def plot_layer(report: LayerReport, path: Path, normalize: bool = False) -> None:
    """Spectrum on a log scale with cumulative energy; accuracy against k when measured."""
    plt = _pyplot()
    spectrum = report.spectrum
    panels = 2 if report.k_curve else 1
    figure, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.2), squeeze=False, layout="constrained")
    axis = axes[0][0]
    _spectrum_axes(axis, spectrum.singular_values, "singular value", "tab:blue", normalize)
    energy_axis = axis.twinx()
    energy = spectrum.cumulative_energy
    energy_axis.plot(range(1, len(energy) + 1), energy, color="tab:orange", label="cumulative energy")
    energy_axis.set_ylim(0, 1.02)
    energy_axis.set_ylabel("cumulative energy")
    for level, k in spectrum.k_for_energy.items():
        energy_axis.axvline(k, color="grey", linestyle=":", linewidth=0.8)
        energy_axis.annotate(f"{level:.0%}", (k, level), fontsize=7, color="grey")
    axis.set_title(f"{spectrum.name} ({spectrum.shape[0]}x{spectrum.shape[1]})")
    if report.k_curve:
        curve_axis = axes[0][1]
        ks = [point["k"] for point in report.k_curve]
        curve_axis.plot(ks, [point["train_accuracy"] for point in report.k_curve], ".-", label="train")
        curve_axis.set_xlabel("k (components kept by PSP)")
        curve_axis.set_ylabel("accuracy after LAP")
        curve_axis.grid(True, alpha=0.3)
        curve_axis.set_title("accuracy on the given labels against k")
    _save(figure, path)


def plot_comparison(report: CompareReport, path: Path) -> None:
    """Both spectra on a log scale, and the phi(i, j) heatmap of their right singular vectors."""
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), layout="constrained")
    _spectrum_axes(left, report.spectrum_a.singular_values, str(report.checkpoint_a), "tab:blue")
    _spectrum_axes(left, report.spectrum_b.singular_values, str(report.checkpoint_b), "tab:red")
    left.legend(fontsize=8)
    left.set_title(f"spectra of {report.layer}")
    phi = report.phi_matrix.numpy()
    rank = phi.shape[0]
    image = right.imshow(
        phi, origin="lower", vmin=0, vmax=1, cmap="viridis", extent=(0.5, rank + 0.5, 0.5, rank + 0.5)
    )
    right.set_xlabel(f"j (top right singular vectors of {report.checkpoint_b.name})")
    right.set_ylabel(f"i (top right singular vectors of {report.checkpoint_a.name})")
    right.set_title("subspace similarity phi(i, j)")
    figure.colorbar(image, ax=right)
    _save(figure, path)


def series_figure(series: SeriesReport, normalize: bool = False) -> Any:
    """Every checkpoint's spectrum on a log scale, and their cumulative energy: a line each."""
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6), layout="constrained")
    first = series.layers[0].spectrum
    for label, report in zip(map(_plain, series.labels), series.layers, strict=True):
        values = report.spectrum.singular_values
        _spectrum_axes(left, values, label, None, normalize)
        energy = report.spectrum.cumulative_energy
        right.plot(range(1, len(energy) + 1), energy, ".-", label=label)
    left.set_title(f"singular values of {series.layer} ({first.shape_text})")
    left.legend(fontsize=8)
    right.set_ylim(0, 1.02)
    right.set_xlabel("component i")
    right.set_ylabel("cumulative energy")
    right.set_title("share of ||W||_F^2 in the top i components")
    right.grid(True, alpha=0.3)
    right.legend(fontsize=8)
    return figure


def plot_series(series: SeriesReport, path: Path, normalize: bool = False) -> None:
    """`lip inspect A B C ... --plot`: the figure of `series_figure`, saved as a PNG."""
    _save(series_figure(series, normalize), path)


def comparison_series_figure(reports: Sequence[CompareReport], labels: Sequence[str]) -> Any:
    """The spectra, then one phi(i, j) heatmap per comparison on one colour scale (0 to 1)."""
    plt = _pyplot()
    labels = [_plain(label) for label in labels]
    panels = len(reports) + 1
    columns = min(panels, 3)
    rows = -(-panels // columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(4.6 * columns, 4.0 * rows), squeeze=False, layout="constrained"
    )
    flat = [axis for row in axes for axis in row]
    spectra_axis, heatmap_axes = flat[0], flat[1:panels]
    reference = reports[0]
    _spectrum_axes(spectra_axis, reference.spectrum_a.singular_values, labels[0], "black")
    for label, report in zip(labels[1:], reports, strict=True):
        _spectrum_axes(spectra_axis, report.spectrum_b.singular_values, label, None)
    spectra_axis.legend(fontsize=8)
    spectra_axis.set_title(f"spectra of {reference.layer}")
    image = None
    for axis, label, report in zip(heatmap_axes, labels[1:], reports, strict=True):
        phi = report.phi_matrix.numpy()
        rank_a, rank_b = phi.shape
        image = axis.imshow(
            phi, origin="lower", vmin=0, vmax=1, cmap="viridis", extent=(0.5, rank_b + 0.5, 0.5, rank_a + 0.5)
        )
        axis.set_xlabel(f"j (right singular vectors of {label})")
        axis.set_ylabel(f"i (of {labels[0]})")
        axis.set_title(label)
    for axis in flat[panels:]:
        axis.set_visible(False)
    figure.colorbar(image, ax=heatmap_axes, label="phi(i, j), one scale for every panel")
    figure.suptitle(
        f"subspace similarity phi(i, j) of {reference.layer}'s top right singular vectors with {labels[0]}'s"
    )
    return figure


def plot_comparison_series(reports: Sequence[CompareReport], labels: Sequence[str], path: Path) -> None:
    """`lip compare REF B C ... --plot`: the figure of `comparison_series_figure`, saved as a PNG."""
    _save(comparison_series_figure(reports, labels), path)


def plot_k_curve(curve: list[dict[str, float]], path: Path, title: str) -> None:
    """Accuracy against k after PSP + LAP, on the training labels and on the selection data."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 4.2), layout="constrained")
    ks = [point["k"] for point in curve]
    axis.plot(ks, [point["train_accuracy"] for point in curve], ".-", label="training labels")
    if curve and "val_accuracy" in curve[0]:
        axis.plot(ks, [point["val_accuracy"] for point in curve], ".-", label="validation / held out")
    axis.set_xlabel("k (components kept by PSP)")
    axis.set_ylabel("accuracy")
    axis.grid(True, alpha=0.3)
    axis.legend()
    axis.set_title(title)
    _save(figure, path)
