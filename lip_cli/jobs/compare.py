"""`lip compare`: one layer in two or more checkpoints, as in the paper's analysis: spectra, the
subspace similarity phi(i, j) and principal angles.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from lip_cli import checkpoint, spectra
from lip_cli.errors import LipError
from lip_cli.jobs.common import layer_tensors, refuse_empty
from lip_cli.jobs.inspect import LayerSpectrum, layer_spectrum
from lip_cli.progress import Progress, no_progress


def comparison_sizes(rank: int) -> list[int]:
    """The subspace sizes shown in a comparison: 1, 2, 5, 10, 20, 50, ... up to the rank."""
    sizes = [size for base in (1, 2, 5) for size in (base * 10**e for e in range(7)) if size < rank]
    return sorted(set(sizes)) + [rank]


@dataclass
class CompareReport:
    """`lip compare`: one layer in two checkpoints, as in the paper's analysis."""

    checkpoint_a: Path
    checkpoint_b: Path
    layer: str
    spectrum_a: LayerSpectrum
    spectrum_b: LayerSpectrum
    sizes: list[int]
    phi: list[list[float]]  # phi[a][b] = phi(V_A, V_B, sizes[a], sizes[b])
    largest_angle_degrees: dict[int, float]  # top-k subspaces of V_A and V_B
    phi_matrix: Tensor  # (r, r): phi for every i, j, for the heatmap

    @property
    def ratio(self) -> list[float | None]:
        return [
            b / a if a > 0 else None
            for a, b in zip(self.spectrum_a.singular_values, self.spectrum_b.singular_values, strict=True)
        ]


def compare_checkpoints(a: Path, b: Path, layer_name: str | None = None) -> CompareReport:
    """Spectra, subspace similarity phi(i, j) and principal angles of one layer in two checkpoints."""
    return compare_series(a, [b], layer_name)[0]


def compare_series(
    reference: Path,
    others: Sequence[Path],
    layer_name: str | None = None,
    progress: Progress = no_progress,
) -> list[CompareReport]:
    """One layer of each checkpoint in `others` against the same layer of `reference`, in order.

    The layer is `layer_name`, else the likely classifier of the reference; the reference is read
    and decomposed once. Any checkpoint without the layer, or with it in another shape, fails the
    whole series with its name.
    """
    model_a = checkpoint.load_checkpoint(reference)
    layer_a = (
        checkpoint.layer_by_name(model_a, layer_name) if layer_name else checkpoint.likely_classifier(model_a)
    )
    refuse_empty(model_a, layer_a)
    weight_a, _ = layer_tensors(model_a, layer_a)
    v_a = spectra.right_singular_vectors(weight_a)
    spectrum_a = layer_spectrum(model_a, layer_a, is_classifier=True)
    del model_a, weight_a
    sizes = comparison_sizes(v_a.shape[1])
    reports = []
    for index, b in enumerate(others):
        model_b = checkpoint.load_checkpoint(b)
        layer_b = checkpoint.layer_by_name(model_b, layer_name or layer_a.name)
        if (layer_a.out_features, layer_a.in_features) != (layer_b.out_features, layer_b.in_features):
            raise LipError(
                f"`{layer_a.name}` is {layer_a.shape_text} in {reference} but {layer_b.shape_text} in {b}; "
                "only layers of the same shape compare"
            )
        weight_b, _ = layer_tensors(model_b, layer_b)
        v_b = spectra.right_singular_vectors(weight_b)
        phi_matrix = spectra.subspace_similarity_matrix(v_a, v_b)
        reports.append(
            CompareReport(
                checkpoint_a=Path(reference),
                checkpoint_b=Path(b),
                layer=layer_a.name,
                spectrum_a=spectrum_a,
                spectrum_b=layer_spectrum(model_b, layer_b, is_classifier=True),
                sizes=sizes,
                phi=[[float(phi_matrix[i - 1, j - 1]) for j in sizes] for i in sizes],
                largest_angle_degrees={
                    k: float(spectra.principal_angles(v_a, v_b, k)[-1].rad2deg()) for k in sizes
                },
                phi_matrix=phi_matrix,
            )
        )
        progress("comparisons", index + 1, len(others))
    return reports
