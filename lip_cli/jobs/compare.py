"""`lip compare`: one layer in two or more checkpoints, as in the paper's analysis: spectra, the
subspace similarity phi(i, j) and principal angles; the gate's thresholds judged on them, and the
paired accuracy test when each head comes with its own validation features of the same rows.

The reference may be a baseline file (`lip inspect --save-baseline`) instead of a checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from lip_cli import baseline, checkpoint, gate, lip, selection, spectra
from lip_cli.errors import LipError
from lip_cli.jobs.common import layer_tensors, refuse_empty
from lip_cli.jobs.inspect import LayerSpectrum, layer_spectrum
from lip_cli.labelled import LabelledFeatures, check_labels, open_labelled_features
from lip_cli.progress import Progress, no_progress

CHUNK_ROWS = 16384


def comparison_sizes(rank: int) -> list[int]:
    """The subspace sizes shown in a comparison: 1, 2, 5, 10, 20, 50, ... up to the rank."""
    sizes = [size for base in (1, 2, 5) for size in (base * 10**e for e in range(7)) if size < rank]
    return sorted(set(sizes)) + [rank]


@dataclass
class Head:
    """One side of a comparison: a layer's spectrum and right singular vectors, and (from a
    checkpoint, not a baseline) its weight and bias."""

    path: Path
    spectrum: LayerSpectrum
    vectors: Tensor  # V of W = weight.T, (out_features, min(shape)), float64
    weight: Tensor | None = None
    bias: Tensor | None = None
    provenance: dict | None = None  # a baseline's record

    @property
    def is_baseline(self) -> bool:
        return self.weight is None


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
    same_vectors: spectra.VectorMatch | None = None  # B holds A's vectors (a repair of A)
    accuracy: gate.AccuracyTest | None = None  # with validation features for both
    checks: list[gate.Check] = field(default_factory=list)
    baseline_a: dict | None = None  # A's baseline record, when A is a baseline file

    @property
    def ratio(self) -> list[float | None]:
        return [
            b / a if a > 0 else None
            for a, b in zip(self.spectrum_a.singular_values, self.spectrum_b.singular_values, strict=True)
        ]

    @property
    def ratio_by_vector(self) -> list[float | None] | None:
        """B's value over A's on the same vector (None unless B holds A's vectors)."""
        if self.same_vectors is None:
            return None
        values_b = self.same_vectors.values_by_vector(self.spectrum_b.singular_values)
        return [
            b / a if a > 0 else None for a, b in zip(self.spectrum_a.singular_values, values_b, strict=True)
        ]

    @property
    def verdict(self) -> str:
        return gate.verdict(self.checks)


def read_head(path: Path, layer_name: str | None) -> Head:
    """A layer of a checkpoint (`layer_name`, else its likely classifier) or of a baseline file."""
    if baseline.is_baseline(path):
        record = baseline.read_baseline(path)
        if layer_name is not None and layer_name != record.layer:
            raise LipError(f"{path}: a baseline of `{record.layer}`, not of --layer {layer_name}")
        values = record.singular_values
        spectrum = LayerSpectrum(
            name=record.layer,
            shape=record.shape,
            dtype=record.dtype,
            singular_values=values.tolist(),
            rank=spectra.numerical_rank(values, record.shape),
            is_classifier=True,
        )
        return Head(Path(path), spectrum, record.vectors, provenance=record.provenance)
    model = checkpoint.load_checkpoint(path)
    layer = checkpoint.layer_by_name(model, layer_name) if layer_name else checkpoint.likely_classifier(model)
    refuse_empty(model, layer)
    weight, bias = layer_tensors(model, layer)
    return Head(
        Path(path),
        layer_spectrum(model, layer, is_classifier=True),
        spectra.right_singular_vectors(weight),
        weight,
        bias,
    )


def validation_hits(head: Head, data: LabelledFeatures) -> Tensor:
    """(n,) bool: which validation rows the head classifies right (`lip.correct_mask`), its logits
    computed in float64 chunk by chunk."""
    if head.weight is None:
        raise LipError(
            f"{head.path}: a baseline holds no weights, so it has no accuracy; give the reference "
            "checkpoint to compare accuracies"
        )
    out_features, in_features = head.spectrum.shape
    if data.features.shape[1:] != (in_features,):
        raise LipError(
            f"{data.features.name}: features of width {tuple(data.features.shape[1:])} for "
            f"`{head.spectrum.name}` in {head.path}, which takes {in_features}"
        )
    check_labels(data.labels, data.features, out_features)
    weight = head.weight.to(torch.float64).T
    bias = None if head.bias is None else head.bias.to(torch.float64)
    hits = []
    for start in range(0, data.features.rows, CHUNK_ROWS):
        logits = data.features.read(start, start + CHUNK_ROWS).to(torch.float64) @ weight
        if bias is not None:
            logits = logits + bias
        hits.append(lip.correct_mask(logits, data.labels.read(start, start + CHUNK_ROWS)))
    return torch.cat(hits) if hits else torch.zeros(0, dtype=torch.bool)


def _same_rows(first: LabelledFeatures, other: LabelledFeatures) -> None:
    """The accuracy test pairs rows: both caches must hold the same rows with the same labels."""
    if first.labels.shape != other.labels.shape:
        raise LipError(
            f"{other.labels.name}: {other.labels.shape[0] if other.labels.shape else 0} labels but "
            f"{first.labels.name} holds {first.labels.rows}; the accuracy test needs the same validation rows"
        )
    for start in range(0, first.labels.rows, CHUNK_ROWS):
        if not torch.equal(
            first.labels.read(start, start + CHUNK_ROWS), other.labels.read(start, start + CHUNK_ROWS)
        ):
            raise LipError(
                f"{other.labels.name}: other labels than {first.labels.name}; the accuracy test pairs each "
                "row of the two caches, which must hold the same samples in the same order"
            )


def compare_checkpoints(a: Path, b: Path, layer_name: str | None = None) -> CompareReport:
    """Spectra, subspace similarity phi(i, j) and principal angles of one layer in two checkpoints."""
    return compare_series(a, [b], layer_name)[0]


def compare_series(
    reference: Path,
    others: Sequence[Path],
    layer_name: str | None = None,
    progress: Progress = no_progress,
    thresholds: Sequence[gate.Threshold] = (),
    labels: Sequence[str] = (),
    val_features: Sequence[Path] = (),
    alpha: float = 0.05,
) -> list[CompareReport]:
    """One layer of each checkpoint in `others` against the same layer of `reference`, in order,
    with the `thresholds` judged on each comparison.

    The layer is `layer_name`, else the likely classifier of the reference; the reference is read
    and decomposed once. Any checkpoint without the layer, or with it in another shape, fails the
    whole series with its name. `val_features`: one cache per checkpoint, the reference's first,
    each of the same rows, for the paired accuracy test (`thresholds` must hold `accuracy`).
    """
    head_a = read_head(reference, layer_name)
    spectrum_a, v_a = head_a.spectrum, head_a.vectors
    for threshold in thresholds:
        if threshold.k is not None and threshold.k > v_a.shape[1]:
            raise LipError(
                f"{threshold.text}: K = {threshold.k} is beyond the {v_a.shape[1]} singular vectors of "
                f"`{spectrum_a.name}` ({spectrum_a.shape_text})"
            )
    data = [open_labelled_features(path, None, "--val-features") for path in val_features]
    hits_a = validation_hits(head_a, data[0]) if data else None
    sizes = comparison_sizes(v_a.shape[1])
    labels = list(labels) or [str(path) for path in others]
    reports = []
    for index, b in enumerate(others):
        head_b = read_head(b, layer_name or spectrum_a.name)
        if head_b.spectrum.shape != spectrum_a.shape:
            raise LipError(
                f"`{spectrum_a.name}` is {spectrum_a.shape_text} in {reference} but "
                f"{head_b.spectrum.shape_text} in {b}; only layers of the same shape compare"
            )
        v_b = head_b.vectors
        phi_matrix = spectra.subspace_similarity_matrix(v_a, v_b)
        report = CompareReport(
            checkpoint_a=Path(reference),
            checkpoint_b=Path(b),
            layer=spectrum_a.name,
            spectrum_a=spectrum_a,
            spectrum_b=head_b.spectrum,
            sizes=sizes,
            phi=[[float(phi_matrix[i - 1, j - 1]) for j in sizes] for i in sizes],
            largest_angle_degrees={k: _largest_angle(v_a, v_b, k) for k in sizes},
            phi_matrix=phi_matrix,
            same_vectors=None
            if _same_values(spectrum_a, head_b.spectrum)
            else spectra.match_vectors(v_a, v_b),
            baseline_a=head_a.provenance,
        )
        if data:
            _same_rows(data[0], data[index + 1])
            hits_b = validation_hits(head_b, data[index + 1])
            counts = selection.as_counts(selection.paired_counts(hits_a, hits_b))
            margin = next((t.value for t in thresholds if t.metric == "accuracy"), 0.0)
            report.accuracy = gate.accuracy_test(counts, alpha, margin)
        report.checks = [judge(threshold, report, labels[index], v_a, v_b) for threshold in thresholds]
        reports.append(report)
        progress("comparisons", index + 1, len(others))
    return reports


def _same_values(a: LayerSpectrum, b: LayerSpectrum) -> bool:
    """Whether two spectra agree to float32 rounding: then shared vectors mean the same head, not a
    repair of it."""
    values_a, values_b = (torch.tensor(s.singular_values, dtype=torch.float64) for s in (a, b))
    return bool(((values_a - values_b).abs() <= 1e-6 * values_a.max().clamp(min=1e-300)).all())


def _largest_angle(v_a: Tensor, v_b: Tensor, k: int) -> float:
    return float(spectra.principal_angles(v_a, v_b, k)[-1].rad2deg())


def metric_value(threshold: gate.Threshold, report: CompareReport, v_a: Tensor, v_b: Tensor) -> float:
    """The measured value a spectral threshold is judged on."""
    k = threshold.k
    if threshold.metric == "phi":
        return float(report.phi_matrix[k - 1, k - 1])
    if threshold.metric == "angle":
        return report.largest_angle_degrees.get(k, _largest_angle(v_a, v_b, k))
    a, b = report.spectrum_a, report.spectrum_b
    if threshold.metric == "effective-rank":
        return gate.change(a.effective_rank, b.effective_rank, threshold.relative)
    values = [torch.tensor(s.singular_values, dtype=torch.float64) for s in (a, b)]
    energy_a, energy_b = (spectra.energy_kept(v, k) for v in values)
    return gate.change(energy_a, energy_b, threshold.relative)


def judge(
    threshold: gate.Threshold, report: CompareReport, label: str, v_a: Tensor, v_b: Tensor
) -> gate.Check:
    if threshold.metric == "accuracy":
        if report.accuracy is None:  # the command refuses this before any work
            raise LipError(f"{threshold.text}: needs --val-features for every checkpoint")
        return gate.judge_accuracy(threshold, label, report.accuracy)
    return gate.judge(threshold, label, metric_value(threshold, report, v_a, v_b))
