"""PNG figures with matplotlib (the optional `plot` extra): spectra, accuracy against k, phi maps."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from lip_cli.errors import LipError
from lip_cli.files import atomic_output

if TYPE_CHECKING:
    from lip_cli.jobs import CompareReport, LayerReport


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as error:
        raise LipError("--plot needs matplotlib: pip install 'lip-cli[plot]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure: Any, path: Path) -> None:
    with atomic_output(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120, bbox_inches="tight")


def _spectrum_axes(axis: Any, values: list[float], label: str, color: str) -> None:
    positive = [(i + 1, v) for i, v in enumerate(values) if v > 0]
    axis.semilogy([i for i, _ in positive], [v for _, v in positive], ".-", color=color, label=label)
    axis.set_xlabel("component i")
    axis.set_ylabel("singular value (log)")
    axis.grid(True, which="both", alpha=0.3)


def plot_layer(report: LayerReport, path: Path) -> None:
    """Spectrum on a log scale with cumulative energy; accuracy against k when measured."""
    plt = _pyplot()
    spectrum = report.spectrum
    panels = 2 if report.k_curve else 1
    figure, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.2), squeeze=False, layout="constrained")
    axis = axes[0][0]
    _spectrum_axes(axis, spectrum.singular_values, "singular value", "tab:blue")
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
    plt.close(figure)


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
    plt.close(figure)


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
    plt.close(figure)
