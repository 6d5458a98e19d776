"""What each command does, as plain functions: read the inputs, run the core, write the outputs.

No terminal here: progress goes to an optional callback and results come back as dataclasses that
`report` renders for people (rich) or machines (JSON).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from lip_cli import arrays, checkpoint, files, lip, spectra
from lip_cli.errors import LipError

Progress = Callable[[str, int, int], None]
"""Called as progress(task, rows done, rows in all) while a pass streams over a file."""


def _no_progress(task: str, done: int, total: int) -> None:
    return None


@dataclass(frozen=True)
class LabelledFeatures:
    features: arrays.ArraySource
    labels: arrays.ArraySource
    labels_origin: str


def open_labelled_features(features: Path, labels: Path | None, look_beside: bool = True) -> LabelledFeatures:
    """Features and their labels, found in the documented order (--labels, container, beside)."""
    feature_source, embedded = arrays.open_features(features)
    if labels is None and embedded is None and not look_beside:
        raise LipError(f"{features}: holds no labels array; pass its labels file too")
    label_source, origin = arrays.find_labels(features, labels, embedded)
    return LabelledFeatures(feature_source, label_source, origin)


def resolve_device(device: str) -> torch.device:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LipError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError as error:
        raise LipError(f"--device {device}: not a device torch knows ({error})") from error


def _minimum_classes(labels: arrays.ArraySource) -> int:
    if len(labels.shape) == 1 and not labels.dtype.is_floating_point and labels.rows:
        return int(labels.read().max()) + 1
    return 1


def _finite_or_fail(tensor: Tensor, where: str) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise LipError(f"{where} holds NaN or Inf values")


@dataclass(frozen=True)
class RepairRequest:
    """Everything `lip repair` needs; the defaults are the command's defaults."""

    checkpoint: Path
    features: Path
    k: int
    labels: Path | None = None
    layer: str | None = None
    output: Path | None = None
    val_features: Path | None = None
    val_labels: Path | None = None
    device: str = "cpu"
    compute_dtype: str = "float64"
    chunk_rows: int = 65536
    force: bool = False
    dry_run: bool = False


@dataclass
class RepairReport:
    """What a repair did: the layer, the spectrum before and after, accuracies, the output."""

    checkpoint: Path
    layer: checkpoint.LinearLayer
    has_bias: bool
    samples: int
    k: int
    rank: int
    labels_origin: str
    singular_values_before: list[float]
    singular_values_after: list[float]
    unexcited: list[int]
    accuracy: dict[str, float]
    output: Path | None
    val_labels_origin: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def energy_kept(self) -> float:
        return spectra.energy_kept(torch.tensor(self.singular_values_before), self.k)

    @property
    def effective_rank_before(self) -> float:
        return spectra.effective_rank(torch.tensor(self.singular_values_before))

    @property
    def effective_rank_after(self) -> float:
        return spectra.effective_rank(torch.tensor(self.singular_values_after).abs())


def _batches(
    data: LabelledFeatures, chunk_rows: int, task: str, progress: Progress
) -> Iterator[tuple[Tensor, Tensor]]:
    """(features, labels) chunks of a data set, reporting progress after each."""
    total = data.features.rows
    for start, x, y in arrays.iter_batches(data.features, data.labels, chunk_rows):
        yield x, y
        progress(task, min(start + chunk_rows, total), total)


def repair_checkpoint(request: RepairRequest, progress: Progress = _no_progress) -> RepairReport:
    """`lip repair`: PSP + LAP on the classifier layer of a checkpoint, written to a new file."""
    if request.val_labels is not None and request.val_features is None:
        raise LipError("--val-labels needs --val-features")
    compute_dtype = lip.COMPUTE_DTYPES[request.compute_dtype]
    device = resolve_device(request.device)
    output = None if request.dry_run else Path(request.output or files.sibling_output(request.checkpoint))
    inputs = [Path(request.checkpoint), Path(request.features)]
    if output is not None:
        files.check_output(output, inputs, request.force)

    train = open_labelled_features(request.features, request.labels)
    val = None
    if request.val_features is not None:
        val = open_labelled_features(request.val_features, request.val_labels, look_beside=False)
        if val.features.shape[1] != train.features.shape[1]:
            raise LipError(
                f"{val.features.name}: validation features have {val.features.shape[1]} columns, "
                f"training features {train.features.shape[1]}"
            )

    model = checkpoint.load_checkpoint(request.checkpoint)
    layer = checkpoint.find_layer(
        model,
        request.layer,
        in_features=train.features.shape[1],
        num_classes=arrays.label_classes(train.labels),
        min_classes=_minimum_classes(train.labels),
    )
    for data in (train, val):
        if data is not None:
            arrays.check_labels(data.labels, data.features, layer.out_features)
    weight = model.state[layer.weight_key]
    bias = model.state[layer.bias_key] if layer.bias_key else None
    _finite_or_fail(weight, f"{model.path}: `{layer.weight_key}`")
    if bias is not None:
        _finite_or_fail(bias, f"{model.path}: `{layer.bias_key}`")

    stats = lip.LapStatistics(weight, bias, compute_dtype=compute_dtype, device=device)
    if not 0 <= request.k <= stats.svd.rank:
        raise LipError(
            f"--k {request.k}: must be between 0 and the rank of `{layer.weight_key}`, {stats.svd.rank}"
        )

    correct_before = 0
    for x, y in _batches(train, request.chunk_rows, "statistics", progress):
        stats.update(x, y)
        correct_before += lip.count_correct(lip.head_logits(x.to(device), weight, bias, compute_dtype), y)
    repaired = lip.repair(stats, request.k)

    accuracy = {
        "train_before": correct_before / train.features.rows,
        "train_after": _accuracy(train, [repaired.weight], bias, request, device, progress, "train")[0],
    }
    if val is not None:
        before, after = _accuracy(val, [weight, repaired.weight], bias, request, device, progress, "val")
        accuracy["val_before"], accuracy["val_after"] = before, after

    warnings = []
    if repaired.unexcited:
        warnings.append(
            f"{len(repaired.unexcited)} tail direction(s) are never excited by the features and "
            f"keep their old singular values: {repaired.unexcited[:10]}"
        )
    if output is not None:
        updates = {layer.weight_key: repaired.weight.to(weight.device)}
        checkpoint.write_checkpoint(model, updates, output)

    return RepairReport(
        checkpoint=Path(request.checkpoint),
        layer=layer,
        has_bias=bias is not None,
        samples=train.features.rows,
        k=request.k,
        rank=stats.svd.rank,
        labels_origin=train.labels_origin,
        val_labels_origin=None if val is None else val.labels_origin,
        singular_values_before=repaired.singular_values_before.tolist(),
        singular_values_after=repaired.singular_values_after.tolist(),
        unexcited=list(repaired.unexcited),
        accuracy=accuracy,
        output=output,
        warnings=warnings,
    )


def _accuracy(
    data: LabelledFeatures,
    weights: list[Tensor],
    bias: Tensor | None,
    request: RepairRequest,
    device: torch.device,
    progress: Progress,
    name: str,
) -> list[float]:
    """Accuracy of each candidate weight (sharing one bias) in one pass over the data."""
    compute_dtype = lip.COMPUTE_DTYPES[request.compute_dtype]
    correct = [0] * len(weights)
    for x, y in _batches(data, request.chunk_rows, f"accuracy ({name})", progress):
        x = x.to(device)
        for index, weight in enumerate(weights):
            correct[index] += lip.count_correct(lip.head_logits(x, weight, bias, compute_dtype), y)
    return [count / data.features.rows for count in correct]
