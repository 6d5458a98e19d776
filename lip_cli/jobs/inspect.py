"""`lip inspect`: the spectra of a checkpoint's 2-D weights, one layer in full (with the training
accuracy PSP + LAP would give at each k), or one layer across a series of checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lip_cli import checkpoint, lip, selection, spectra
from lip_cli.errors import LipError
from lip_cli.jobs.common import check_statistics, classifier_for, layer_tensors, refuse_empty, resolve_device
from lip_cli.labelled import open_labelled_features
from lip_cli.progress import Progress, no_progress
from lip_cli.statistics_pass import statistics_pass

ENERGY_LEVELS = (0.9, 0.95, 0.99)


@dataclass(frozen=True)
class LayerSpectrum:
    """Spectral statistics of one 2-D weight, seen as W = weight.T."""

    name: str
    shape: tuple[int, int]  # torch layout: (out_features, in_features)
    dtype: str
    singular_values: list[float]
    rank: int
    is_classifier: bool = False

    @property
    def shape_text(self) -> str:
        return f"{self.shape[0]}x{self.shape[1]}"

    @property
    def spectral_norm(self) -> float:
        return self.singular_values[0] if self.singular_values else 0.0

    @property
    def stable_rank(self) -> float:
        return spectra.stable_rank(torch.tensor(self.singular_values, dtype=torch.float64))

    @property
    def effective_rank(self) -> float:
        return spectra.effective_rank(torch.tensor(self.singular_values, dtype=torch.float64))

    @property
    def top_energy(self) -> float:
        """Share of the energy in the top 10% of the components."""
        return spectra.top_energy_share(torch.tensor(self.singular_values, dtype=torch.float64))

    @property
    def cumulative_energy(self) -> list[float]:
        return spectra.energy(torch.tensor(self.singular_values, dtype=torch.float64)).tolist()

    @property
    def k_for_energy(self) -> dict[float, int]:
        values = torch.tensor(self.singular_values, dtype=torch.float64)
        return {level: spectra.k_for_energy(values, level) for level in ENERGY_LEVELS}


def layer_spectrum(
    model: checkpoint.Checkpoint, layer: checkpoint.LinearLayer, is_classifier: bool = False
) -> LayerSpectrum:
    weight, _ = layer_tensors(model, layer)
    values = spectra.singular_values(weight)
    return LayerSpectrum(
        name=layer.name,
        shape=(layer.out_features, layer.in_features),
        dtype=str(layer.dtype).removeprefix("torch."),
        singular_values=values.tolist(),
        rank=spectra.numerical_rank(values, (layer.out_features, layer.in_features)),
        is_classifier=is_classifier,
    )


@dataclass
class InspectReport:
    """`lip inspect` without --layer: every 2-D weight of a checkpoint."""

    checkpoint: Path
    layers: list[LayerSpectrum]
    other_tensors: int  # tensors that are not 2-D weights (biases, norms, convolutions, buffers)
    provenance: dict | None = None  # what lip recorded when it wrote this checkpoint


def inspect_checkpoint(path: Path, progress: Progress = no_progress) -> InspectReport:
    model = checkpoint.load_checkpoint(path)
    layers = checkpoint.linear_layers(model.state)
    if not layers:
        raise LipError(f"{path}: holds no 2-D weight")
    classifier = checkpoint.likely_classifier(model)
    spectra_list = []
    for index, layer in enumerate(layers):
        spectra_list.append(layer_spectrum(model, layer, is_classifier=layer == classifier))
        progress("spectra", index + 1, len(layers))
    return InspectReport(
        Path(path), spectra_list, len(model.state) - len(layers), checkpoint.read_provenance(path)
    )


@dataclass
class LayerReport:
    """`lip inspect --layer`: one layer's full spectrum, and the accuracy each k would give."""

    checkpoint: Path
    spectrum: LayerSpectrum
    samples: int | None = None
    labels_origin: str | None = None
    k_curve: list[dict[str, float]] | None = None  # {k, train_accuracy} after PSP + LAP at k
    targets: str | None = None  # the LAP targets of the k curve
    accuracy_rows: int | None = None  # training rows the accuracies are measured on
    provenance: dict | None = None  # what lip recorded when it wrote this checkpoint


def inspect_layer(
    path: Path,
    layer_name: str | None,
    features: Path | None = None,
    labels: Path | None = None,
    device: str = "cpu",
    chunk_rows: int = 16384,
    progress: Progress = no_progress,
    targets: str = lip.DEFAULT_TARGETS,
) -> LayerReport:
    """The spectrum of one layer; with features, the training accuracy after LAP (with `targets`,
    as `lip repair` fits) for every k."""
    if labels is not None and features is None:
        raise LipError("--labels needs --features")
    if targets not in lip.TARGETS:
        raise LipError(f"--targets {targets}: must be one of {', '.join(lip.TARGETS)}")
    model = checkpoint.load_checkpoint(path)
    if features is None:
        layer = (
            checkpoint.layer_by_name(model, layer_name) if layer_name else checkpoint.likely_classifier(model)
        )
        return LayerReport(
            Path(path),
            layer_spectrum(model, layer, is_classifier=True),
            provenance=checkpoint.read_provenance(path),
        )
    train = open_labelled_features(features, labels)
    layer, weight, bias = classifier_for(model, layer_name, train)
    stats = lip.LapStatistics(weight, bias, device=resolve_device(device))
    fitted = statistics_pass(train, stats, chunk_rows, progress=progress)
    check_statistics(fitted.stats, train)
    ks = selection.k_grid(stats.svd.rank)
    accuracies = selection.curve(fitted.stats, fitted.sample, ks, targets)
    return LayerReport(
        checkpoint=Path(path),
        spectrum=layer_spectrum(model, layer, is_classifier=True),
        samples=train.features.rows,
        labels_origin=train.labels_origin,
        k_curve=[{"k": k, "train_accuracy": accuracy} for k, accuracy in zip(ks, accuracies, strict=True)],
        targets=targets,
        accuracy_rows=fitted.sampled_rows,
        provenance=checkpoint.read_provenance(path),
    )


def series_labels(paths: Sequence[Path], labels: Sequence[str] = ()) -> list[str]:
    """Names of a series of checkpoints: `labels` when given, else the file stems, made unique.

    Stems that collide take as many parent folders as it takes to tell them apart
    (`run1/model`, `run2/model`); a file given twice is numbered.
    """
    if labels:
        if len(labels) != len(paths):
            raise LipError(
                f"--label given {len(labels)} times for {len(paths)} checkpoints; give one per checkpoint"
            )
        return list(labels)
    parts = [Path(path).with_suffix("").parts or (str(path),) for path in paths]
    names = []
    for mine in parts:
        others = [theirs for theirs in parts if theirs != mine]
        depth = 1
        while depth < len(mine) and any(theirs[-depth:] == mine[-depth:] for theirs in others):
            depth += 1
        names.append("/".join(mine[-depth:]))
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if names.count(name) == 1 else f"{name} ({seen[name]})")
    return unique


@dataclass
class SeriesReport:
    """`lip inspect A B C ...`: one layer across a series of checkpoints, in the order given."""

    labels: list[str]
    layers: list[LayerReport]

    @property
    def layer(self) -> str:
        return self.layers[0].spectrum.name


def inspect_series(
    paths: Sequence[Path],
    layer_name: str | None = None,
    labels: Sequence[str] = (),
    progress: Progress = no_progress,
) -> SeriesReport:
    """The spectrum of one layer in each checkpoint: `layer_name`, else the likely classifier of the
    first checkpoint, found by its name in the others.

    Every layer must have the shape of the first one; a checkpoint that fails (unreadable, no such
    layer, another shape) fails the whole series with its name.
    """
    names = series_labels(paths, labels)
    layers: list[LayerReport] = []
    for index, path in enumerate(paths):
        report = inspect_layer(path, layer_name or (layers[0].spectrum.name if layers else None))
        first = layers[0].spectrum if layers else report.spectrum
        if report.spectrum.shape != first.shape:
            raise LipError(
                f"`{first.name}` is {first.shape_text} in {paths[0]} but `{report.spectrum.name}` is "
                f"{report.spectrum.shape_text} in {path}; only layers of the same shape compare"
            )
        layers.append(report)
        progress("spectra", index + 1, len(paths))
    return SeriesReport(names, layers)


def save_baseline(path: Path, layer_name: str | None, output: Path) -> Path:
    """`lip inspect --save-baseline`: what `lip compare` needs of this layer, without the checkpoint
    (`lip_cli.baseline`), written atomically to `output` (checked by the path policy before)."""
    from lip_cli import baseline
    from lip_cli.digests import sha256_of

    model = checkpoint.load_checkpoint(path)
    layer = checkpoint.layer_by_name(model, layer_name) if layer_name else checkpoint.likely_classifier(model)
    refuse_empty(model, layer)
    weight, _ = layer_tensors(model, layer)
    dtype = str(layer.dtype).removeprefix("torch.")
    record = baseline.from_weight(weight, layer.name, dtype, baseline.provenance_of(path, sha256_of(path)))
    baseline.write_baseline(record, output)
    return Path(output)
