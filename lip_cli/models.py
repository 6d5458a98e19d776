"""Models and data for `lip features`: build an architecture from a spec, load weights safely, and
read images or model inputs with the evaluation transforms of the model's library.

Libraries beyond the core stack (torchvision, timm, transformers, pillow) are optional extras; a
missing one is a one-line error with the install command.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from lip_cli import checkpoint as checkpoints
from lip_cli import files
from lip_cli.errors import LipError, first_line

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
SPEC_KINDS = ("torchvision", "timm", "hf", "python")


def _need(module: str, extra: str = "vision") -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise LipError(f"this needs {module.split('.')[0]}: pip install 'lip-cli[{extra}]'") from error


@dataclass
class BuiltModel:
    model: nn.Module
    kind: str  # torchvision, timm, hf, python
    name: str
    classes: int


def head_classes(state: dict[str, torch.Tensor], path: Path) -> int:
    """The number of classes, read from the checkpoint's classifier layer."""
    return checkpoints.likely_classifier(
        checkpoints.Checkpoint(path=path, format="pt", state=state)
    ).out_features


def build_model(spec: str, checkpoint_path: Path, model_args: Sequence[tuple[str, str]] = ()) -> BuiltModel:
    """The architecture named by `spec`, with the checkpoint's weights loaded (weights_only/safetensors).

    `model_args`: (name, text) pairs of --model-arg, passed to a python: factory.
    """
    kind, _, name = spec.partition(":")
    if kind not in SPEC_KINDS or not name:
        raise LipError(
            f"--model {spec}: use torchvision:NAME, timm:NAME, hf:DIR or python:package.module:factory"
        )
    if model_args and kind != "python":
        raise LipError(f"--model-arg {model_args[0][0]}: passes arguments to a python: factory only")
    loaded = checkpoints.load_checkpoint(checkpoint_path)
    state = dict(loaded.state)
    classes = head_classes(state, Path(checkpoint_path))
    if kind == "torchvision":
        models = _need("torchvision.models")
        try:
            model = models.get_model(name, weights=None, num_classes=classes)
        except (ValueError, KeyError) as error:
            raise LipError(f"--model {spec}: torchvision has no model {name!r}") from error
    elif kind == "timm":
        timm = _need("timm")
        try:
            model = timm.create_model(name, pretrained=False, num_classes=classes)
        except RuntimeError as error:
            raise LipError(f"--model {spec}: timm has no model {name!r}") from error
    elif kind == "hf":
        transformers = _need("transformers", "dev")
        auto = transformers.AutoModelForImageClassification
        try:
            if Path(name).resolve() == Path(checkpoint_path).resolve():  # weights and their key mapping
                with _quiet(transformers):
                    model, loading = auto.from_pretrained(
                        name, use_safetensors=True, output_loading_info=True
                    )
                _refuse_missing(sorted(loading["missing_keys"]), Path(checkpoint_path))
                return BuiltModel(model, kind, name, classes)
            config = transformers.AutoConfig.from_pretrained(name)
        except (OSError, ValueError) as error:
            raise LipError(
                f"--model {spec}: not a Hugging Face model folder ({first_line(error)})"
            ) from error
        except RuntimeError as error:  # transformers refuses weights whose shapes differ from the config
            raise LipError(
                f"{checkpoint_path}: its weights do not fit its config.json (some shapes differ, e.g. the "
                "number of labels); fix config.json or pass the matching folder"
            ) from error
        config.num_labels = classes
        model = auto.from_config(config)
    else:
        model = python_model(spec, classes, model_args)
    load_weights(model, state, Path(checkpoint_path))
    return BuiltModel(model=model, kind=kind, name=name, classes=classes)


@contextlib.contextmanager
def _current_folder_importable() -> Iterator[None]:
    """The current folder on the import path after the installed packages (a `numpy.py` there
    shadows nothing), while a python: model is imported and built."""
    folder = os.getcwd()
    added = folder not in sys.path and "" not in sys.path
    if added:
        sys.path.append(folder)
        importlib.invalidate_caches()
    try:
        yield
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)


CLASS_ARGUMENTS = ("num_classes", "num_labels")


def argument_value(text: str) -> int | float | bool | str:
    """A --model-arg value: an int, a float, true/false, else the text itself."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def factory_arguments(
    factory: Any, classes: int, model_args: Sequence[tuple[str, str]], spec: str
) -> dict[str, Any]:
    """The keyword arguments of a python: factory: the head's number of classes for a parameter
    named num_classes or num_labels, and every --model-arg (which wins), each checked against the
    factory's signature."""
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # no signature to read (a builtin): pass what was given
        parameters = {}
    takes_any = not parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    keywords = {
        name: p
        for name, p in parameters.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    arguments: dict[str, Any] = {name: classes for name in CLASS_ARGUMENTS if name in keywords}
    for key, text in model_args:
        if key not in keywords and not takes_any:
            known = ", ".join(keywords) or "none"
            raise LipError(f"--model-arg {key}: {spec} takes no argument {key!r} (its arguments: {known})")
        arguments[key] = argument_value(text)
    return arguments


def python_model(spec: str, classes: int, model_args: Sequence[tuple[str, str]] = ()) -> nn.Module:
    """`python:package.module:factory`: the module imported (from the installed packages, else
    the current folder), the factory called with the head's classes and --model-arg values."""
    module_name, _, factory_name = spec.removeprefix("python:").partition(":")
    with _current_folder_importable():
        try:
            factory = getattr(importlib.import_module(module_name), factory_name)
        except (ImportError, AttributeError, ValueError, TypeError) as error:
            raise LipError(
                f"--model {spec}: cannot import {factory_name!r} from {module_name!r} ({first_line(error)}); "
                "name a module in the current folder or an installed one: python:package.module:factory"
            ) from error
        arguments = factory_arguments(factory, classes, model_args, spec)
        try:
            model = factory(**arguments)
        except Exception as error:  # the user's factory may fail in any way
            raise LipError(f"--model {spec}: {factory_name}() failed ({first_line(error)})") from error
    if not isinstance(model, nn.Module):
        raise LipError(f"--model {spec}: the factory returned a {type(model).__name__}, not an nn.Module")
    return model


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load a state dict, trying the wrapper prefixes (model., module., _orig_mod.) when keys miss."""
    expected = set(model.state_dict())
    candidates = [state]
    for prefix in checkpoints.WRAPPER_PREFIXES:
        stripped = {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}
        if stripped:
            candidates.append(stripped)
    best = max(candidates, key=lambda candidate: len(expected & set(candidate)))
    missing = sorted(expected - set(best))
    unexpected = sorted(set(best) - expected)
    if missing or unexpected:
        raise LipError(
            f"{path}: does not fit the architecture: {len(missing)} missing keys ({_few(missing)}), "
            f"{len(unexpected)} unexpected keys ({_few(unexpected)})"
        )
    try:
        model.load_state_dict(best, strict=True)
    except RuntimeError as error:
        raise LipError(f"{path}: does not fit the architecture ({first_line(error, 300)})") from error


@contextlib.contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    """transformers without its progress bars and load report: lip says what matters in one line."""
    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _refuse_missing(missing: list[str], path: Path) -> None:
    """A checkpoint that leaves weights of the model at their random initialisation gives random features."""
    if missing:
        raise LipError(
            f"{path}: does not cover the model: {len(missing)} weights missing ({_few(missing)}); they "
            "would stay randomly initialised. Pass the full trained checkpoint"
        )


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:4]) + (" ..." if len(keys) > 4 else "")


def eval_transform(built: BuiltModel, image_size: int | None, mean: tuple | None, std: tuple | None) -> Any:
    """timm's data config for timm models, the standard ImageNet evaluation transform otherwise."""
    transforms = _need("torchvision.transforms")
    if built.kind == "timm":
        timm_data = _need("timm.data")
        config = timm_data.resolve_data_config({}, model=built.model)
        if image_size:
            config["input_size"] = (3, image_size, image_size)
        if mean:
            config["mean"] = mean
        if std:
            config["std"] = std
        return timm_data.create_transform(**config)
    size = image_size or 224
    return transforms.Compose(
        [
            transforms.Resize(int(round(size / 0.875))),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(mean or IMAGENET_MEAN, std or IMAGENET_STD),
        ]
    )


class ImageFolderData(Dataset):
    """An ImageFolder layout: one sub-folder per class (sorted names = class ids), images inside."""

    def __init__(self, root: Path, transform: Any = None) -> None:
        root = Path(root)
        if not root.exists():
            raise LipError(f"{root}: no such folder")
        if not root.is_dir():
            raise LipError(f"{root}: not a folder of class sub-folders (or pass a .npy of inputs)")
        self.classes = sorted(path.name for path in root.iterdir() if path.is_dir())
        self.samples = [
            (path, index)
            for index, name in enumerate(self.classes)
            for path in sorted((root / name).rglob("*"))
            if path.suffix.lower() in IMAGE_SUFFIXES
        ]
        if not self.samples:
            raise LipError(f"{root}: no images in class sub-folders ({', '.join(IMAGE_SUFFIXES)})")
        for path, _ in self.samples:  # a FIFO or device named like an image would hang a worker
            files.check_readable(path)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image_module = _need("PIL.Image")
        path, label = self.samples[index]
        try:
            with image_module.open(path) as image:
                return self.transform(image.convert("RGB")), label
        except (OSError, ValueError, SyntaxError) as error:
            raise LipError(f"{path}: unreadable image ({first_line(error)})") from error


class ArrayInputs(Dataset):
    """Model inputs from a .npy file (read through a memory map) with their labels."""

    def __init__(self, inputs: Path, labels: Path) -> None:
        self.inputs = _load_npy(inputs, mmap=True)
        self.labels = _load_npy(labels, mmap=True)  # a header claiming more than the file holds fails here
        if self.inputs.ndim == 0 or not _is_real_number(self.inputs.dtype):
            raise LipError(
                f"{inputs}: model inputs must be an array of real numbers with one row per sample, "
                f"got {self.inputs.dtype} of shape {self.inputs.shape}"
            )
        if self.labels.ndim not in (1, 2) or not _is_real_number(self.labels.dtype):
            raise LipError(
                f"{labels}: labels must be class ids (n) or an (n, classes) matrix of real numbers, "
                f"got {self.labels.dtype} of shape {self.labels.shape}"
            )
        if len(self.inputs) != len(self.labels):
            raise LipError(f"{labels}: {len(self.labels)} labels but {len(self.inputs)} inputs in {inputs}")
        if np.issubdtype(self.labels.dtype, np.unsignedinteger):  # batches of uint64 do not collate
            if self.labels.size and int(self.labels.max()) > np.iinfo(np.int64).max:
                raise LipError(f"{labels}: label {int(self.labels.max())} is larger than any class id")
            self.labels = self.labels.astype(np.int64)
        if len(self.inputs) == 0:
            raise LipError(f"{inputs}: holds no samples")

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        return torch.from_numpy(np.array(self.inputs[index], dtype=np.float32)), self.labels[index]


def _load_npy(path: Path, mmap: bool = False) -> np.ndarray:
    if not Path(path).exists():
        raise LipError(f"{path}: no such file")
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise LipError(f"{path}: not a readable .npy file ({first_line(error)})") from error
    if not isinstance(array, np.ndarray):
        array.close()
        raise LipError(f"{path}: holds several arrays; model inputs and their labels are .npy files")
    return array


def _is_real_number(dtype: np.dtype) -> bool:
    numeric = np.issubdtype(dtype, np.number) and not np.issubdtype(dtype, np.complexfloating)
    return numeric or dtype == np.bool_
