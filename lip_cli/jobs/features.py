"""`lip features`: run a model over images or inputs and cache what its classifier layer receives."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lip_cli import files, layout, writes
from lip_cli.errors import LipError
from lip_cli.jobs.common import input_files, resolve_device
from lip_cli.progress import Progress, no_progress


@dataclass(frozen=True)
class FeaturesRequest:
    """Everything `lip features` needs; the defaults are the command's defaults."""

    checkpoint: Path
    model: str
    data: Path
    out: Path
    labels: Path | None = None
    layer: str | None = None
    batch_size: int = 64
    device: str = "cpu"
    num_workers: int = 0
    dtype: str = "float32"
    limit: int | None = None
    image_size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    force: bool = False
    model_args: tuple[tuple[str, str], ...] = ()  # --model-arg KEY=VALUE, for a python: factory


@dataclass
class FeaturesReport:
    checkpoint: Path
    features: Path
    labels: Path
    classes_file: Path | None
    samples: int
    feature_dim: int
    layer: str
    model: str
    seconds: float
    validation: bool = False  # named like validation data (`layout.is_validation`)
    other_split: Path | None = None  # the other split's cache beside it, when there (`layout.counterpart`)


def _worker_message(error: Exception) -> str | None:
    """The LipError message inside an exception a DataLoader worker re-raised, if there is one."""
    for line in reversed(str(error).splitlines()):
        if "LipError: " in line:
            return line.split("LipError: ", 1)[1]
    return None


def extract_features(request: FeaturesRequest, progress: Progress = no_progress) -> FeaturesReport:
    """`lip features`: run a model over images or inputs and cache what its classifier receives."""
    import time

    from torch.utils.data import DataLoader, Subset

    from lip_cli import collect, models

    started = time.perf_counter()
    device = resolve_device(request.device)
    out = Path(request.out)
    if out.suffix.lower() != ".npy":
        raise LipError(f"--out {out}: the feature cache is a .npy file")
    classes_file = layout.classes_file(out)
    images = Path(request.data).suffix.lower() != ".npy"  # else model inputs in a .npy
    model_folder = [Path(request.model[3:])] if request.model.startswith("hf:") else []
    labels_out = layout.labels_file(out)
    files.check_paths(
        [*input_files([request.checkpoint, *model_folder]), Path(request.data), request.labels],
        [
            files.Output(out, parents=True),
            files.Output(labels_out, parents=True),
            files.Output(classes_file, parents=True) if images else None,
        ],
        request.force,
    )
    built = models.build_model(request.model, request.checkpoint, request.model_args)
    if not images:
        if request.labels is None:
            raise LipError(f"{request.data}: model inputs in a .npy need --labels")
        dataset: Any = models.ArrayInputs(request.data, request.labels)
        class_names = None
    else:
        dataset = models.ImageFolderData(request.data)
        dataset.transform = models.eval_transform(built, request.image_size, request.mean, request.std)
        class_names = dataset.classes
    if request.limit is not None:
        dataset = Subset(dataset, range(min(request.limit, len(dataset))))
    total = len(dataset)
    loader = DataLoader(dataset, batch_size=request.batch_size, num_workers=request.num_workers)
    done = [0]

    def advance(rows: int) -> None:
        done[0] += rows
        progress("features", done[0], total)

    name, module = collect.classifier_module(built.model, request.layer)
    with files.new_folders(out):  # made only now that the model and the data are known to load
        try:
            collect.collect_features(
                built.model,
                loader,
                name,
                out,
                request.dtype,
                device,
                advance,
                force=request.force,
                inputs_name=f"--data {request.data}",
            )
        except LipError:
            raise
        except Exception as error:  # a worker's LipError comes back wrapped in its own exception type
            message = _worker_message(error)
            if message is None:
                raise
            raise LipError(message) from error
        if class_names:
            with writes.atomic_output(classes_file) as temporary:
                temporary.write_text(json.dumps(class_names, indent=1) + "\n")
    return FeaturesReport(
        checkpoint=Path(request.checkpoint),
        features=out,
        labels=labels_out,
        classes_file=classes_file if class_names else None,
        samples=total,
        feature_dim=module.in_features,
        layer=name,
        model=request.model,
        seconds=time.perf_counter() - started,
        validation=layout.is_validation(out),
        other_split=layout.counterpart(out),
    )
