"""Baseline files: what `lip compare` needs of a reference head, without its checkpoint.

`lip inspect MODEL --save-baseline FILE` writes a small safetensors file: the layer's singular
values and right singular vectors (float64, as compare computes them) and, in its metadata under
`lip_baseline`, the layer, its shape and dtype, the source file's sha256 and the lip version. It is
recognised by its bytes (a safetensors file whose metadata holds `lip_baseline`), whatever its name,
and `lip compare` takes it in place of the reference checkpoint with the same results.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import Tensor

from lip_cli import formats, spectra
from lip_cli.errors import LipError, first_line

MARKER = "lip_baseline"  # the metadata key that makes a safetensors file a baseline
VERSION = 1
VALUES, VECTORS = "singular_values", "right_singular_vectors"


@dataclass(frozen=True)
class Baseline:
    """A reference head's spectrum and right singular vectors, with where they came from."""

    layer: str
    shape: tuple[int, int]  # torch layout: (out_features, in_features)
    dtype: str  # of the weight it was taken from
    singular_values: Tensor  # (min(shape),) float64, descending
    vectors: Tensor  # (out_features, min(shape)) float64: V of W = weight.T, by singular value
    provenance: dict  # source, source_sha256, lip_version, created


def is_baseline(path: Path) -> bool:
    """Whether `path` is a baseline file: safetensors (by its bytes) with the baseline metadata."""
    path = Path(path)
    if not path.is_file() or formats.detect_format(path) != formats.SAFETENSORS:
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return MARKER in (handle.metadata() or {})
    except Exception:  # a corrupt file is the checkpoint reader's to name
        return False


def from_weight(weight: Tensor, layer: str, dtype: str, provenance: dict) -> Baseline:
    """The baseline of a layer's weight (torch layout, (out, in))."""
    return Baseline(
        layer=layer,
        shape=(int(weight.shape[0]), int(weight.shape[1])),
        dtype=dtype,
        singular_values=spectra.singular_values(weight),
        vectors=spectra.right_singular_vectors(weight),
        provenance=provenance,
    )


def provenance_of(source: Path, sha256: str) -> dict:
    from lip_cli import __version__

    return {
        "source": str(source),
        "source_sha256": sha256,
        "lip_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def write_baseline(baseline: Baseline, output: Path) -> None:
    """Write atomically (the path policy checked it before the work: `files.check_paths`)."""
    from safetensors.torch import save_file

    from lip_cli.writes import atomic_output

    record = {
        "version": VERSION,
        "layer": baseline.layer,
        "shape": list(baseline.shape),
        "dtype": baseline.dtype,
        **baseline.provenance,
    }
    tensors = {
        VALUES: baseline.singular_values.to(torch.float64).contiguous(),
        VECTORS: baseline.vectors.to(torch.float64).contiguous(),
    }
    with atomic_output(output) as temporary:
        save_file(
            tensors, str(temporary), metadata={"format": "pt", MARKER: json.dumps(record, sort_keys=True)}
        )


def read_baseline(path: Path) -> Baseline:
    """A baseline file, checked: the record, both tensors, their shapes and values."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            record = json.loads((handle.metadata() or {})[MARKER])
            keys = set(handle.keys())
            if keys != {VALUES, VECTORS}:
                raise ValueError(
                    f"holds {', '.join(sorted(keys)) or 'no tensors'}, not {VALUES} and {VECTORS}"
                )
            values, vectors = handle.get_tensor(VALUES), handle.get_tensor(VECTORS)
    except (OSError, ValueError, KeyError, RecursionError) as error:
        raise LipError(f"{path}: not a readable lip baseline ({first_line(error)})") from error
    except Exception as error:  # safetensors' own errors for a corrupt file
        raise LipError(f"{path}: not a readable lip baseline ({first_line(error)})") from error
    problem = _problem(record, values, vectors)
    if problem:
        raise LipError(f"{path}: not a usable lip baseline ({problem})")
    out_features, in_features = record["shape"]
    provenance = {key: record.get(key) for key in ("source", "source_sha256", "lip_version", "created")}
    return Baseline(
        str(record["layer"]),
        (out_features, in_features),
        str(record.get("dtype", "")),
        values,
        vectors,
        provenance,
    )


def _problem(record: object, values: Tensor, vectors: Tensor) -> str | None:
    """What is wrong with a baseline's contents, or None."""
    if not isinstance(record, dict) or not isinstance(record.get("layer"), str):
        return "its record names no layer"
    if record.get("version") != VERSION:
        return f"format version {record.get('version')!r}; this lip reads version {VERSION}"
    shape = record.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(type(n) is int and n > 0 for n in shape)):
        return "its record gives no layer shape"
    rank = min(shape)
    if values.dtype != torch.float64 or vectors.dtype != torch.float64:
        return "its tensors are not float64"
    if tuple(values.shape) != (rank,) or tuple(vectors.shape) != (shape[0], rank):
        shapes = f"{tuple(values.shape)} and {tuple(vectors.shape)}"
        return f"tensors of shapes {shapes} for a {shape[0]}x{shape[1]} layer"
    if not bool(torch.isfinite(values).all() and torch.isfinite(vectors).all()):
        return "it holds NaN or Inf values"
    if bool((values < 0).any()) or bool((values[1:] > values[:-1]).any()):
        return "its singular values are not non-negative and descending"
    gram = vectors.T @ vectors
    if not torch.allclose(gram, torch.eye(rank, dtype=torch.float64), atol=1e-8):
        return "its singular vectors are not orthonormal"
    return None
