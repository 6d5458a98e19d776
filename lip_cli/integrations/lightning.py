"""LIP as a Lightning callback: `Trainer(callbacks=[LipCallback()])` takes `lip repair --k auto`'s
decision at the end of training, on the trainer's own loaders, with no feature cache on disk.

At `on_train_end` (the model still on its device, the last ModelCheckpoint save already made) the
callback makes one no-grad pass over the training loader and one over the validation loader,
collecting what the classifier layer receives into lip's streaming statistics, and decides as the
command does on the validation rows. Only an outcome that changes the layer (a confirmed k) changes
the module in memory; `trainer.save_checkpoint(path)` afterwards writes the repaired head and lip's
record (`state_dict`, under the callback's state key). Checkpoints ModelCheckpoint saved during fit
keep the trained head. Under DDP the sums and counts are all-reduced and rank 0's head is broadcast.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lip_cli.integrations import missing_framework

try:
    import lightning.pytorch as pl
    from lightning.pytorch.utilities import rank_zero_info
except ImportError as error:  # pragma: no cover - exercised with the package hidden
    raise missing_framework("lip_cli.integrations.lightning", "Lightning", "lightning") from error

import torch

from lip_cli.collect import ClassifierInputs, classifier_module
from lip_cli.errors import LipError
from lip_cli.integrations.core import (
    AUTO,
    LipDecision,
    decide_in_memory,
    request_for,
    rows_of_this_process,
    spectrum_summary,
)


def inputs_and_labels(batch: Any) -> tuple[Any, torch.Tensor]:
    """(inputs, labels) of a batch: its first two items, as `lip features` reads a loader."""
    if isinstance(batch, Mapping) or not isinstance(batch, Sequence) or len(batch) < 2:
        raise LipError(
            "a batch is not an (inputs, labels) pair; pass batch_to_inputs=lambda batch: (inputs, labels)"
        )
    return batch[0], batch[1]


def _one_loader(loaders: Any) -> Any:
    """The loader the trainer used (the first of several)."""
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if isinstance(loaders, Sequence) and not hasattr(loaders, "dataset"):
        return loaders[0] if loaders else None
    return loaders


class LipCallback(pl.Callback):
    """`lip repair --k auto` at the end of `trainer.fit`, on the trainer's loaders.

    The options are the command's (`--k`, `--targets`, `--alpha`, `--seed`, `--layer`,
    `--force-write`, `--compute-dtype`), checked here with its messages. `track_spectrum` logs the
    head's effective rank, stable rank, top-10% energy and phi against the first epoch at every
    validation epoch (never in the sanity check). `batch_to_inputs` turns a batch into
    (inputs, labels) when it is not such a pair; `pl_module(inputs)` must run the model.
    """

    def __init__(
        self,
        k: int | str = AUTO,
        *,
        targets: str | None = None,
        alpha: float = 0.05,
        seed: int = 0,
        layer: str | None = None,
        force_write: bool = False,
        compute_dtype: str = "float32",
        track_spectrum: bool = False,
        batch_to_inputs: Callable[[Any], tuple[Any, torch.Tensor]] | None = None,
    ) -> None:
        self.request = request_for(k, targets, alpha, seed, layer, force_write, compute_dtype)
        self.track_spectrum = bool(track_spectrum)
        self.batch_to_inputs = batch_to_inputs or inputs_and_labels
        self.decision: LipDecision | None = None
        self.record: dict[str, Any] | None = None  # lip's record of the decision, also in checkpoints
        self.spectra: list[dict[str, Any]] = []  # the head's singular values at each validation epoch
        self._first_v: torch.Tensor | None = None

    @property
    def state_key(self) -> str:
        request = self.request
        return self._generate_state_key(k=request.k, layer=request.layer, seed=request.seed)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            ClassifierInputs(pl_module, self.request.layer)  # the layer is found before training, or named

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.track_spectrum or trainer.sanity_checking:
            return
        _, module = classifier_module(pl_module, self.request.layer)
        summary, v, values = spectrum_summary(module.weight, self._first_v)
        if self._first_v is None:
            self._first_v = v
        pl_module.log_dict(summary)
        self.spectra.append({"epoch": trainer.current_epoch, "singular_values": values})

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        train = _one_loader(trainer.train_dataloader)
        val = _one_loader(trainer.val_dataloaders)

        def run(batch: Any) -> tuple[Callable[[], object], torch.Tensor]:
            batch = trainer.strategy.batch_to_device(batch)
            inputs, labels = self.batch_to_inputs(batch)
            return (lambda: pl_module(inputs)), labels

        limits = (rows_of_this_process(train), rows_of_this_process(val))
        self.decision = decide_in_memory(pl_module, self.request, train, val, run, limits)
        self.record = self.decision.record
        metrics = self.decision.metrics
        trainer.callback_metrics.update({name: torch.tensor(value) for name, value in metrics.items()})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()
        rank_zero_info(f"lip: {self.record['decision']}")

    def state_dict(self) -> dict[str, Any]:
        return {"record": self.record, "spectra": self.spectra}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.record = state_dict.get("record")
        self.spectra = list(state_dict.get("spectra") or [])
