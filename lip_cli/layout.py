"""Where a feature cache's labels lie, and which caches belong together: names only, nothing read.

`lip features --out feats/train.npy` writes its labels to `feats/train.labels.npy` (and the class
names of an image folder to `feats/train.classes.json`), so that caches side by side keep their
own. An older lip wrote `labels.npy` beside the cache; it is still found, but only where it cannot
be another cache's.
"""

from __future__ import annotations

import re
from pathlib import Path

from lip_cli.errors import LipError

LABELS_SUFFIX = ".labels.npy"
OLD_LABELS = "labels.npy"  # what lip wrote beside every cache before caches were named
VALIDATION_WORDS = ("val", "valid", "validation", "dev")
TRAINING_WORD = "train"


def labels_file(cache: Path) -> Path:
    """The labels written beside a cache: `train.npy` -> `train.labels.npy`."""
    cache = Path(cache)
    return cache.with_name(cache.stem + LABELS_SUFFIX)


def classes_file(cache: Path) -> Path:
    """The class names written beside a cache of an image folder: `train.npy` -> `train.classes.json`."""
    cache = Path(cache)
    return cache.with_name(cache.stem + ".classes.json")


def other_arrays(features: Path) -> list[Path]:
    """The .npy files beside `features` that are neither it, nor labels, nor hidden: other caches
    (or model inputs) that an old-style `labels.npy` there might belong to."""
    features = Path(features)
    try:
        names = sorted(entry.name for entry in features.parent.iterdir())
    except OSError:
        return []
    return [
        features.parent / name
        for name in names
        if name.lower().endswith(".npy")
        and name not in (features.name, OLD_LABELS)
        and not name.lower().endswith(LABELS_SUFFIX)
        and not name.startswith(".")
    ]


def beside_labels(features: Path) -> Path:
    """The labels file that belongs to `features` when no labels are given: `<stem>.labels.npy`, else
    an old-style `labels.npy` when it is unambiguous (no other .npy beside the cache), else the
    `<stem>.labels.npy` that is missing (the path policy and the error name it)."""
    own = labels_file(features)
    old = Path(features).parent / OLD_LABELS
    if not own.exists() and old.exists() and not other_arrays(features):
        return old
    return own


def missing_labels(features: Path, option: str) -> LipError:
    """The error for a cache with no labels found, naming the option that passes them."""
    own, old = labels_file(features), Path(features).parent / OLD_LABELS
    message = f"{features}: no labels found: pass {option}, or put {own.name} beside it"
    if old.exists():
        others = other_arrays(features)
        message += (
            f" ({old} there may be the labels of another of the {len(others) + 1} .npy files in "
            f"{old.parent}, e.g. {others[0].name})"
        )
    return LipError(message)


def _words(name: str) -> list[str]:
    return re.split(r"([^A-Za-z0-9]+)", name)


def _swap_role(name: str, words: tuple[str, ...], replacement: str) -> str | None:
    """`name` with its first word among `words` (case-insensitive) replaced, or None without one."""
    parts = _words(name)
    for index, part in enumerate(parts):
        if part.lower() in words:
            return "".join([*parts[:index], replacement, *parts[index + 1 :]])
    return None


def is_validation(cache: Path) -> bool:
    """A cache named (or in a folder named) like validation data: val, valid, validation, dev."""
    cache = Path(cache)
    names = (cache.stem, cache.parent.name)
    return any(part.lower() in VALIDATION_WORDS for name in names for part in _words(name))


def counterpart(cache: Path) -> Path | None:
    """The cache of the other split beside `cache`, when it is there with its labels: val <-> train,
    in the file's name first, else in its folder's (`demo/val/features.npy` <-> `demo/train/...`)."""
    cache = Path(cache)
    words, replacement = (
        (VALIDATION_WORDS, TRAINING_WORD) if is_validation(cache) else ((TRAINING_WORD,), "val")
    )
    candidates = []
    stem = _swap_role(cache.stem, words, replacement)
    if stem is not None:
        candidates.append(cache.with_name(stem + cache.suffix))
    folder = _swap_role(cache.parent.name, words, replacement)
    if folder is not None:
        candidates.append(cache.parent.with_name(folder) / cache.name)
    for candidate in candidates:
        if candidate.is_file() and labels_file(candidate).is_file():
            return candidate
    return None
