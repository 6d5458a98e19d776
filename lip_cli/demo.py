"""A built-in demo: a small noisy-label problem, a classifier trained on it, its cached features.

Everything `lip repair` needs, made on the CPU in seconds with nothing downloaded.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lip_cli import files, writes
from lip_cli.errors import LipError

DEMO_FILES = ("model.pt", "train/inputs.npy", "train/targets.npy", "val/inputs.npy", "val/targets.npy")


@dataclass(frozen=True)
class DemoSettings:
    classes: int = 10
    inputs: int = 64
    width: int = 32  # features at the input of the classifier layer
    train_samples: int = 4000
    val_samples: int = 2000
    noise_rate: float = 0.4  # symmetric label noise on the training labels
    epochs: int = 40
    seed: int = 0


class DemoNet(nn.Module):
    """A small MLP whose classifier layer is `fc`, the way torchvision names it."""

    def __init__(self, settings: DemoSettings) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(settings.inputs, 128), nn.ReLU(), nn.Linear(128, settings.width), nn.ReLU()
        )
        self.fc = nn.Linear(settings.width, settings.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def demo_model() -> DemoNet:
    """The demo's architecture, for `lip features --model python:lip_cli.demo:demo_model`."""
    return DemoNet(DemoSettings())


@dataclass(frozen=True)
class DemoResult:
    folder: Path
    settings: DemoSettings
    train_accuracy_noisy: float  # against the noisy labels it was trained on
    val_accuracy: float  # against clean labels

    def document(self) -> dict[str, Any]:
        return {
            "folder": str(self.folder),
            "files": {name: str(self.folder / name) for name in DEMO_FILES},
            "classes": self.settings.classes,
            "feature_dim": self.settings.width,
            "train_samples": self.settings.train_samples,
            "val_samples": self.settings.val_samples,
            "noise_rate": self.settings.noise_rate,
            "train_accuracy_noisy_labels": self.train_accuracy_noisy,
            "val_accuracy_clean_labels": self.val_accuracy,
        }


def make_problem(settings: DemoSettings, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Gaussian classes around random centres: train inputs, clean and noisy labels, val set."""
    centres = torch.randn(settings.classes, settings.inputs, generator=generator) * 0.55
    total = settings.train_samples + settings.val_samples
    clean = torch.randint(settings.classes, (total,), generator=generator)
    inputs = centres[clean] + torch.randn(total, settings.inputs, generator=generator)
    flip = torch.rand(settings.train_samples, generator=generator) < settings.noise_rate
    random_labels = torch.randint(settings.classes, (settings.train_samples,), generator=generator)
    noisy = torch.where(flip, random_labels, clean[: settings.train_samples])
    split = settings.train_samples
    return inputs[:split], noisy, inputs[split:], clean[split:]


def train(model: DemoNet, inputs: torch.Tensor, labels: torch.Tensor, settings: DemoSettings) -> None:
    """Plain cross-entropy training with Adam, long enough to start fitting the noise."""
    generator = torch.Generator().manual_seed(settings.seed + 1)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(settings.epochs):
        order = torch.randperm(inputs.shape[0], generator=generator)
        for start in range(0, inputs.shape[0], 128):
            batch = order[start : start + 128]
            optimiser.zero_grad()
            loss = nn.functional.cross_entropy(model(inputs[batch]), labels[batch])
            loss.backward()
            optimiser.step()
    model.eval()


def check_demo_folder(folder: Path, force: bool) -> None:
    """Refuse, before any training, a folder where the demo would replace files without --force,
    write through a link out of it, or find a file where it needs a folder."""
    nearest = next((path for path in (folder, *folder.parents) if os.path.lexists(path)), None)
    if nearest is not None and not nearest.is_dir():  # the folder, or one above it, is a file
        raise LipError(f"{nearest}: exists and is not a folder")
    existing = [name for name in DEMO_FILES if os.path.lexists(folder / name)]  # dangling links too
    if existing and not force:
        raise LipError(f"{folder}: already holds {', '.join(existing)}; pass --force to replace them")
    for name in DEMO_FILES:  # nothing written through a link out of the folder, nor over a folder
        if files.member(folder, name, "demo file").is_dir():
            raise LipError(f"{folder / name}: is a folder; --force replaces demo files only, move it")
    for part in ("train", "val"):
        if (folder / part).exists() and not (folder / part).is_dir():
            raise LipError(f"{folder / part}: exists and is not a folder; move it or choose another folder")


def make_demo(folder: Path, force: bool = False, settings: DemoSettings | None = None) -> DemoResult:
    """Write model.pt and the inputs with their labels: train/ (noisy labels), val/ (clean labels)."""
    settings = settings or DemoSettings()
    folder = Path(folder)
    check_demo_folder(folder, force)

    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    train_inputs, noisy_labels, val_inputs, val_labels = make_problem(settings, generator)
    model = DemoNet(settings)
    train(model, train_inputs, noisy_labels, settings)
    with torch.inference_mode():
        train_features = model.body(train_inputs)
        val_features = model.body(val_inputs)
        train_accuracy = (model.fc(train_features).argmax(1) == noisy_labels).float().mean().item()
        val_accuracy = (model.fc(val_features).argmax(1) == val_labels).float().mean().item()

    checkpoint = {
        "state_dict": model.state_dict(),
        "epoch": settings.epochs,
        "noise_rate": settings.noise_rate,
    }
    arrays = (train_inputs, noisy_labels, val_inputs, val_labels)  # in the order of DEMO_FILES[1:]
    wanted = [*reversed(folder.parents), folder, folder / "train", folder / "val"]
    made = [part for part in wanted if not os.path.lexists(part)]
    try:  # the folders only now, so that a failure or an interrupt before the end leaves none
        for part in made:
            try:
                part.mkdir()
            except OSError as error:
                raise LipError(f"{part}: cannot be made ({error.strerror}); nothing was written") from None
        files.check_paths([], [files.Output(folder / name) for name in DEMO_FILES], force)
        with writes.atomic_outputs(*(folder / name for name in DEMO_FILES)) as temporaries:
            torch.save(checkpoint, temporaries[0])
            for temporary, values in zip(temporaries[1:], arrays, strict=True):
                with open(temporary, "wb") as handle:
                    np.save(handle, values.numpy())
    except BaseException:
        for part in reversed(made):
            with contextlib.suppress(OSError):
                part.rmdir()
        raise
    return DemoResult(folder, settings, train_accuracy, val_accuracy)


def noise_folder(folder: Path, noise_rate: float) -> Path:
    """Where `make_demo_series` puts the demo trained at one noise rate: FOLDER/noise-0.2."""
    return Path(folder) / f"noise-{noise_rate:g}"


def make_demo_series(
    folder: Path, noise_rates: Sequence[float], force: bool = False, settings: DemoSettings | None = None
) -> list[DemoResult]:
    """One demo per noise rate, each in its `noise_folder`, for the paper's analysis across noise.

    Only the training labels differ: the inputs, clean labels, initial weights and batch order are
    the same, and a label flipped at one rate is flipped (to the same class) at every higher rate.
    Existing files are looked for in every folder before any training starts.
    """
    settings = settings or DemoSettings()
    folders = [noise_folder(folder, rate) for rate in noise_rates]
    shared = next((one for index, one in enumerate(folders) if one in folders[:index]), None)
    if shared is not None:
        raise LipError(f"--noise: two rates would both be written to {shared}; give rates that differ more")
    for one in folders:  # every folder checked before any training
        files.member(Path(folder), one.name, "noise folder")
        check_demo_folder(one, force)
    return [
        make_demo(noise_folder(folder, rate), force=force, settings=replace(settings, noise_rate=rate))
        for rate in noise_rates
    ]
