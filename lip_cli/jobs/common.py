"""Steps several commands share: the device, the classifier layer found and checked, the files a
command reads (for the path policy), LAP sums checked for overflow.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from lip_cli import arrays, checkpoint, files, labelled, layout, lip
from lip_cli.errors import LipError
from lip_cli.labelled import LabelledFeatures


def resolve_device(device: str) -> torch.device:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LipError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError as error:
        raise LipError(f"--device {device}: not a device torch knows ({error})") from error


def _minimum_classes(train: LabelledFeatures) -> int:
    """Classes the labels need (largest id + 1), once the row counts agree (from the headers)."""
    labels = train.labels
    labelled.check_label_rows(labels, train.features)
    if len(labels.shape) == 1 and not labels.dtype.is_floating_point and labels.dtype != torch.bool:
        return labelled.label_range(labels)[1] + 1
    return 1


def finite_or_fail(tensor: Tensor, where: str) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise LipError(f"{where} holds NaN or Inf values")


def classifier_for(
    model: checkpoint.Checkpoint,
    name: str | None,
    train: LabelledFeatures,
    val: LabelledFeatures | None = None,
) -> tuple[checkpoint.LinearLayer, Tensor, Tensor | None]:
    """The classifier layer that fits the features and labels, its weight and bias, all checked."""
    min_classes = _minimum_classes(train)
    widths = [
        layer.out_features
        for layer in checkpoint.linear_layers(model.state)
        if layer.in_features == train.features.shape[1]
    ]
    if name is None and labelled.label_classes(train.labels) is None and widths and min_classes > max(widths):
        raise LipError(
            f"{train.labels.name}: holds class id {min_classes - 1}, but the widest layer taking "
            f"{train.features.shape[1]} inputs has {max(widths)} classes"
        )
    layer = checkpoint.find_layer(
        model,
        name,
        in_features=train.features.shape[1],
        num_classes=labelled.label_classes(train.labels),
        min_classes=min_classes,
    )
    for data in (train, val):
        if data is not None:
            labelled.check_labels(data.labels, data.features, layer.out_features)
    refuse_empty(model, layer)
    weight, bias = layer_tensors(model, layer)
    return layer, weight, bias


def layer_tensors(
    model: checkpoint.Checkpoint, layer: checkpoint.LinearLayer
) -> tuple[Tensor, Tensor | None]:
    """The layer's weight and bias, refused unless they are dense, real, finite floating point."""
    weight = model.state[layer.weight_key]
    bias = model.state[layer.bias_key] if layer.bias_key else None
    for key, tensor in ((layer.weight_key, weight), (layer.bias_key, bias)):
        if tensor is None:
            continue
        where = f"{model.path}: `{key}`"
        problem = arrays.tensor_problem(tensor)
        if problem is not None:
            raise LipError(f"{where} {problem}")
        if tensor.dtype not in arrays.FLOAT_DTYPES:
            raise LipError(
                f"{where} is {str(tensor.dtype).removeprefix('torch.')}; lip reads and writes float16, "
                "bfloat16, float32 and float64 weights only (a repaired weight would not fit this type); "
                "convert the layer to floating point first"
            )
        finite_or_fail(tensor, where)
    largest = float(weight.abs().max()) if weight.numel() else 0.0
    if not math.isfinite(largest * largest * weight.numel()):  # the spectrum's energy is a float64 sum
        raise LipError(
            f"{model.path}: `{layer.weight_key}` holds values up to {largest:.3g}: its squared norm "
            "overflows float64; rescale the layer"
        )
    return weight, bias


def refuse_empty(model: checkpoint.Checkpoint, layer: checkpoint.LinearLayer) -> None:
    """A layer with no inputs or no classes has no spectrum to repair or compare."""
    if layer.out_features == 0 or layer.in_features == 0:
        raise LipError(f"{model.path}: `{layer.weight_key}` is {layer.shape_text}: an empty layer")


def check_statistics(stats: lip.LapStatistics, data: LabelledFeatures) -> None:
    """Refuse LAP sums that overflowed, naming the input that is too large (`check_sums`)."""
    check_sums(stats, data.features.name, data.labels.name)


def check_sums(stats: lip.LapStatistics, features_name: str, labels_name: str) -> None:
    """Refuse LAP sums that overflowed, naming the features or labels that are too large.

    An overflowed sum would otherwise pass for a direction the features never excite, or give NaN.
    """
    if not all(bool(torch.isfinite(stats.sums[name]).all()) for name in ("square", "projection")):
        if stats.compute_dtype != torch.float64:
            dtype = str(stats.compute_dtype).removeprefix("torch.")
            raise LipError(
                f"{features_name}: the features overflow {dtype} in the LAP sums; use --compute-dtype float64"
            )
        raise LipError(f"{features_name}: the features are too large: their LAP sums overflow float64")
    if not all(bool(torch.isfinite(value).all()) for value in stats.sums.values()):
        raise LipError(
            f"{labels_name}: the labels are too large: their LAP sums overflow; use class ids or 0/1 targets"
        )


def input_files(
    checkpoints: list[Path],
    features: Path | None = None,
    labels: Path | None = None,
    copied: bool = False,
) -> list[Path]:
    """Every file a command reads, for the path policy (`files.check_paths`).

    Checkpoints with their provenance records (and, when the folder is `copied`, every file of a
    model folder, each checked), feature and label shards, and the labels file beside the features
    (`layout.beside_labels`) when no labels are given.
    """
    found: list[Path] = []
    for model in map(Path, checkpoints):
        found += [model, checkpoint.sidecar_path(model)]
        if model.is_dir():
            found += files.folder_files(model) if copied else [model / files.LIP_RECORD]
    for spec in (features, labels):
        if spec is not None:
            found += arrays.shard_paths(spec) or [Path(spec)]
    if features is not None and labels is None and arrays.shard_paths(features) is None:
        found.append(layout.beside_labels(Path(features)))
    return found
