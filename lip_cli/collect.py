"""The inputs of a model's classifier layer, collected with a forward hook: a feature cache for LAP."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from lip_cli.arrays import NpyWriter
from lip_cli.checkpoint import is_ema, is_head_name
from lip_cli.errors import LipError, first_line
from lip_cli.files import Output, check_paths
from lip_cli.layout import labels_file
from lip_cli.writes import atomic_outputs

OUTPUT_DTYPES = {"float32": np.float32, "float16": np.float16}


def classifier_module(model: nn.Module, layer: str | None = None) -> tuple[str, nn.Linear]:
    """The classifier `nn.Linear`: the one named, else the last one with a common head name, else the
    last `nn.Linear` of the model."""
    if layer is not None:
        try:
            module = model.get_submodule(layer)
        except AttributeError as error:
            raise LipError(f"the model has no module `{layer}`") from error
        if not isinstance(module, nn.Linear):
            raise LipError(f"`{layer}` is a {type(module).__name__}, not an nn.Linear")
        return layer, module
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise LipError("the model has no nn.Linear layer")
    heads = [(name, module) for name, module in linears if is_head_name(name) and not is_ema(name)]
    return (heads or linears)[-1]


class ClassifierInputs:
    """What a model's classifier layer receives, caught by a forward hook while the context is open.

    `capture(run)` calls `run()` (the model on one batch) and returns the batch's inputs of the
    layer, checked: one call per batch, one feature vector per sample. The hook is removed on exit,
    also on error; the model's mode and device are the caller's.
    """

    def __init__(self, model: nn.Module, layer: str | None = None) -> None:
        self.name, self.module = classifier_module(model, layer)
        self._captured: list[Tensor] = []
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def __enter__(self) -> ClassifierInputs:
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, _module: nn.Module, args: tuple, _output: Tensor) -> None:
        self._captured.append(args[0].detach())

    def capture(self, run: Callable[[], object]) -> Tensor:
        self._captured.clear()
        run()
        if len(self._captured) != 1:
            raise LipError(f"`{self.name}` ran {len(self._captured)} times for one batch; expected once")
        features = self._captured[0]
        self._captured.clear()
        if features.ndim != 2:
            raise LipError(
                f"`{self.name}` receives inputs of shape {tuple(features.shape)}; lip needs one "
                "feature vector per sample (batch x features)"
            )
        return features


def shard_name(path: Path, rank: int) -> Path:
    """`feats.npy` -> `feats.part-00003.npy`: the file of one process under torch.distributed."""
    return path.with_name(f"{path.stem}.part-{rank:05d}{path.suffix}")


def _distributed_rank() -> int | None:
    distributed = torch.distributed
    if distributed.is_available() and distributed.is_initialized() and distributed.get_world_size() > 1:
        return distributed.get_rank()
    return None


def collect_features(
    model: nn.Module,
    batches: Iterable,
    layer: str | None = None,
    out: str | Path | None = None,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    progress: Callable[[int], None] | None = None,
    force: bool = False,
    inputs_name: str | None = None,
) -> tuple[np.ndarray, np.ndarray] | tuple[Path, Path]:
    """Run `model` over `batches` of (inputs, labels) and keep what its classifier layer receives.

    The model runs in eval mode under inference_mode on `device`; the hook, the mode and the device
    are restored afterwards, also on error. Returns (features, labels) arrays, or with `out` writes
    them incrementally to `out` and its labels beside it (`feats.npy`, `feats.labels.npy`: memory
    does not grow with the data; existing files are replaced only with `force`) and returns the two
    paths. Under torch.distributed each process writes its own pair of shards
    (`feats.part-00000.npy`, `feats.labels.part-00000.npy`) for
    `lip repair -f 'feats.part-*.npy' --labels 'feats.labels.part-*.npy'`.
    Nothing non-finite is kept: activations that are NaN, Inf or beyond the range of `dtype` fail the
    run. With `inputs_name` (the command line's data), a model that cannot run on a batch is a
    LipError naming it; otherwise the model's own exception propagates.
    """
    if dtype not in OUTPUT_DTYPES:
        raise LipError(f"dtype must be one of {', '.join(OUTPUT_DTYPES)}, got {dtype}")
    classifier = ClassifierInputs(model, layer)
    name = classifier.name
    device = torch.device(device)
    parameter = next(model.parameters(), None)
    original_device = parameter.device if parameter is not None else device
    was_training = model.training
    outputs = None if out is None else _output_paths(Path(out))
    check_paths([], [Output(path) for path in outputs or ()], force)
    with contextlib.ExitStack() as stack:
        stack.enter_context(classifier)
        writers: list[NpyWriter] = []
        temporaries = stack.enter_context(atomic_outputs(*outputs)) if outputs else []
        parts: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
        try:
            model.to(device).eval()
            with torch.inference_mode():
                for batch in batches:
                    inputs, labels = batch[0], batch[1]
                    try:
                        features = classifier.capture(lambda inputs=inputs: model(inputs.to(device)))
                    except (RuntimeError, ValueError, TypeError, IndexError) as error:
                        if inputs_name is None:
                            raise
                        raise LipError(
                            f"{inputs_name}: the model cannot run on a batch of shape "
                            f"{tuple(inputs.shape)} ({first_line(error)}); are these the model's inputs?"
                        ) from error
                    block = _finite_block(features, dtype, name)
                    label_block = torch.as_tensor(labels).cpu().numpy()
                    if len(label_block) != len(block):
                        raise LipError(f"a batch has {len(block)} inputs but {len(label_block)} labels")
                    if outputs:
                        if not writers:
                            writers = [
                                NpyWriter(temporaries[0], block.dtype, block.shape[1:]),
                                NpyWriter(temporaries[1], label_block.dtype, label_block.shape[1:]),
                            ]
                        writers[0].write(block)
                        writers[1].write(label_block)
                    else:
                        parts[0].append(block)
                        parts[1].append(label_block)
                    if progress is not None:
                        progress(len(block))
        finally:
            model.train(was_training)
            model.to(original_device)
            for writer in writers:
                writer.close()
        if outputs and not writers:
            raise LipError("no batches: nothing to collect")
    if outputs:
        return outputs
    if not parts[0]:
        raise LipError("no batches: nothing to collect")
    return np.concatenate(parts[0]), np.concatenate(parts[1])


def _finite_block(features: Tensor, dtype: str, name: str) -> np.ndarray:
    """A batch of features in the cache's dtype, refused if any value is or becomes NaN or Inf."""
    if not bool(torch.isfinite(features).all()):
        raise LipError(f"`{name}` receives NaN or Inf values from the model; nothing written")
    with np.errstate(over="ignore"):  # overflow is reported below, as a LipError
        block = features.float().cpu().numpy().astype(OUTPUT_DTYPES[dtype])
    if not np.isfinite(block).all():
        fix = "use --dtype float32" if dtype != "float32" else "rescale the model's activations"
        raise LipError(
            f"`{name}` receives values up to {float(features.abs().max()):.4g}, beyond the range of "
            f"{dtype} ({float(np.finfo(OUTPUT_DTYPES[dtype]).max):.4g}); {fix}. Nothing written"
        )
    return block


def _output_paths(out: Path) -> tuple[Path, Path]:
    labels = labels_file(out)
    rank = _distributed_rank()
    if rank is not None:
        return shard_name(out, rank), shard_name(labels, rank)
    return out, labels
