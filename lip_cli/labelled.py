"""Features with their labels: a cache opened with its labels (found in the documented order), the
labels read as torch counts them, and checked against the features and the layer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lip_cli import arrays, layout
from lip_cli.arrays import (
    FEATURE_KEYS,
    LABEL_CHUNK_ROWS,
    LABEL_KEYS,
    ArraySource,
    check_features,
    concatenate,
    open_arrays,
    pick,
    shard_paths,
)
from lip_cli.errors import LipError

UNSIGNED_DTYPES = (torch.uint16, torch.uint32, torch.uint64)


def as_labels(source: ArraySource) -> ArraySource:
    """Labels as torch can count them: wide unsigned ids read as int64; complex values refused."""
    if not source.shape:
        raise LipError(
            f"{source.name}: labels must be a class vector or an (n, classes) matrix, "
            "got one value (shape ())"
        )
    if source.dtype.is_complex:
        raise LipError(
            f"{source.name}: labels are complex ({source.dtype}); store class ids as integers or "
            "label targets as real numbers"
        )
    if source.dtype not in UNSIGNED_DTYPES:
        return source

    def read(start: int, stop: int) -> Tensor:
        values = source.reader(start, stop)
        if values.numel() and int(values.numpy().max()) > torch.iinfo(torch.int64).max:
            raise LipError(f"{source.name}: label {int(values.numpy().max())} is larger than any class id")
        return values.to(torch.int64)

    return dataclasses.replace(source, dtype=torch.int64, reader=read)


def open_features(path: Path) -> tuple[ArraySource, ArraySource | None]:
    """The features array of a file, and a labels array when the same file holds one."""
    sources = open_arrays(path)
    labels = pick(sources, LABEL_KEYS)
    features = sources[None] if None in sources else pick(sources, FEATURE_KEYS)
    if features is None:
        others = [key for key in sources if sources[key] is not labels]
        if len(others) != 1:
            raise LipError(
                f"{path}: cannot tell which array holds the features among {sorted(map(str, sources))}; "
                f"name it one of {', '.join(FEATURE_KEYS)}"
            )
        features = sources[others[0]]
    check_features(features)
    return features, None if labels is None else as_labels(labels)


def open_labels(path: Path) -> ArraySource:
    """The labels array of a file: its only array, or the one named like labels."""
    sources = open_arrays(path)
    if len(sources) == 1:
        return as_labels(next(iter(sources.values())))
    labels = pick(sources, LABEL_KEYS)
    if labels is None:
        raise LipError(
            f"{path}: cannot tell which array holds the labels among {sorted(map(str, sources))}; "
            f"name it one of {', '.join(LABEL_KEYS)}"
        )
    return as_labels(labels)


def find_labels(
    features_path: Path, labels_path: Path | None, embedded: ArraySource | None, option: str = "--labels"
) -> tuple[ArraySource, str]:
    """The labels for a features file, and where they came from (`option`: the one that named
    `labels_path`), in the documented order."""
    if labels_path is not None:
        return open_labels(labels_path), f"{option} {labels_path}"
    if embedded is not None:
        return embedded, f"the features file ({embedded.name})"
    beside = layout.beside_labels(features_path)
    if beside.exists():
        return open_labels(beside), f"{beside} beside the features"
    raise layout.missing_labels(features_path, option)


def open_sharded(
    feature_paths: list[Path], label_spec: Path | None, features_spec: Path, option: str = "--labels"
) -> tuple[ArraySource, ArraySource, str]:
    """Feature shards with their labels: label shards paired in sorted order, one labels file for
    all of them, or each shard's own labels array. Every pair is checked, naming the shard."""
    label_paths = shard_paths(label_spec) if label_spec is not None else None
    if label_paths is not None and len(label_paths) != len(feature_paths):
        raise LipError(
            f"{label_spec}: {len(label_paths)} label shards for {len(feature_paths)} feature shards "
            f"in {features_spec}"
        )
    features, labels = [], []
    for index, path in enumerate(feature_paths):
        shard, embedded = open_features(path)
        if features and (shard.shape[1:] != features[0].shape[1:] or shard.dtype != features[0].dtype):
            raise LipError(
                f"{shard.name}: shard is {shard.shape[1:]} {shard.dtype}, but {features[0].name} is "
                f"{features[0].shape[1:]} {features[0].dtype}"
            )
        if label_paths is not None:
            label = open_labels(label_paths[index])
        elif label_spec is None:
            if embedded is None:
                raise LipError(f"{path}: shard holds no labels array; pass --labels with the label shards")
            label = embedded
        else:
            label = None
        if label is not None:
            if label.rows != shard.rows:
                raise LipError(
                    f"{label.name}: {label.rows} labels but shard {shard.name} has {shard.rows} rows"
                )
            if labels and (label.shape[1:] != labels[0].shape[1:] or label.dtype != labels[0].dtype):
                raise LipError(f"{label.name}: labels shard differs in shape or dtype from {labels[0].name}")
            labels.append(label)
        features.append(shard)
    name = f"{features_spec} ({len(features)} shards)"
    feature_source = concatenate(features, name)
    if label_spec is not None and label_paths is None:
        return feature_source, open_labels(label_spec), f"{option} {label_spec}"
    origin = f"{option} {label_spec} ({len(labels)} shards)" if label_paths else "each shard's labels array"
    label_source = concatenate(labels, f"{label_spec or features_spec} (labels of {len(labels)} shards)")
    return feature_source, label_source, origin


@dataclass(frozen=True)
class LabelledFeatures:
    features: arrays.ArraySource
    labels: arrays.ArraySource
    labels_origin: str


def open_labelled_features(features: Path, labels: Path | None, option: str = "--labels") -> LabelledFeatures:
    """Features and their labels, found in the documented order (the labels file given, the
    features file's own labels array, the labels file beside it), alike for training and validation
    features; `option` is the one that passes the labels (--labels, --val-labels).

    `features` may also be a glob or a folder of shards (see `open_sharded`).
    """
    shards = arrays.shard_paths(features)
    if shards is not None:
        return LabelledFeatures(*open_sharded(shards, labels, features, option))
    feature_source, embedded = open_features(features)
    label_source, origin = find_labels(features, labels, embedded, option)
    return LabelledFeatures(feature_source, label_source, origin)


def check_label_rows(labels: ArraySource, features: ArraySource) -> None:
    """One label per feature row, from the headers alone, before any label is read."""
    if labels.rows != features.rows:
        raise LipError(
            f"{labels.name}: {labels.rows} labels but {features.rows} feature rows in {features.name}"
        )


def label_range(labels: ArraySource) -> tuple[int, int]:
    """The smallest and largest class id of a class vector, read in chunks (memory stays small)."""
    low, high = None, None
    for start in range(0, labels.rows, LABEL_CHUNK_ROWS):
        chunk_low, chunk_high = torch.aminmax(labels.read(start, start + LABEL_CHUNK_ROWS))
        low = int(chunk_low) if low is None else min(low, int(chunk_low))
        high = int(chunk_high) if high is None else max(high, int(chunk_high))
    if low is None or high is None:
        raise LipError(f"{labels.name}: holds no labels")
    return low, high


def check_labels(labels: ArraySource, features: ArraySource, num_classes: int) -> None:
    """Shapes, dtypes and ranges of the labels against the features and the layer."""
    check_label_rows(labels, features)
    if len(labels.shape) == 1:
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise LipError(f"{labels.name}: class labels must be integers, got {labels.dtype}")
        low, high = label_range(labels)
        if low < 0 or high >= num_classes:
            raise LipError(
                f"{labels.name}: labels range over {low}..{high} but the layer has {num_classes} "
                f"classes (0..{num_classes - 1})"
            )
    elif len(labels.shape) == 2:
        if labels.shape[1] != num_classes:
            raise LipError(
                f"{labels.name}: label matrix has {labels.shape[1]} columns but the layer has "
                f"{num_classes} classes"
            )
    else:
        raise LipError(f"{labels.name}: labels must be a class vector or an (n, classes) matrix")


def label_classes(labels: ArraySource) -> int | None:
    """The number of classes a label matrix fixes, or None for class ids (any count above the max)."""
    return labels.shape[1] if len(labels.shape) == 2 else None
