"""LIP as a Hugging Face `TrainerCallback`: `Trainer(callbacks=[LipTrainerCallback()])` takes
`lip repair --k auto`'s decision at the end of `trainer.train()`, on the Trainer's own loaders.

At `on_train_end` the callback makes one no-grad pass over the `train_dataloader` and one over the
`eval_dataloader` the Trainer passes (the Trainer builds the latter when it evaluates: set
`eval_strategy`), collecting what the classifier layer receives into lip's streaming statistics,
and decides as the command does on the evaluation rows. Only an outcome that changes the layer (a
confirmed k) changes the model in memory, so `trainer.save_model()` afterwards writes the repaired
head, and `from_pretrained` loads it; lip's record goes into the model's config (`config.lip`,
saved in config.json) and the figures into `state.log_history`, on the world process zero.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from lip_cli.integrations import missing_framework

try:
    from transformers import TrainerCallback
    from transformers.utils import logging
except ImportError as error:  # pragma: no cover - exercised with the package hidden
    raise missing_framework("lip_cli.integrations.transformers", "Hugging Face transformers", "hf") from error

import torch

from lip_cli.collect import ClassifierInputs
from lip_cli.errors import LipError
from lip_cli.integrations.core import AUTO, LipDecision, decide_in_memory, request_for, rows_of_this_process

CONFIG_KEY = "lip"
logger = logging.get_logger(__name__)


class LipTrainerCallback(TrainerCallback):
    """`lip repair --k auto` at the end of `trainer.train()`, on the Trainer's loaders.

    The options are the command's (`--k`, `--targets`, `--alpha`, `--seed`, `--layer`,
    `--force-write`, `--compute-dtype`), checked here with its messages. Batches are the Trainer's
    dictionaries: `label_key` holds the labels, the other entries are the model's keyword inputs.
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
        label_key: str = "labels",
    ) -> None:
        self.request = request_for(k, targets, alpha, seed, layer, force_write, compute_dtype)
        self.label_key = label_key
        self.decision: LipDecision | None = None
        self.record: dict[str, Any] | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is not None:
            ClassifierInputs(model, self.request.layer)  # the layer is found before training, or named

    def on_train_end(
        self,
        args: Any,
        state: Any,
        control: Any,
        model: Any = None,
        train_dataloader: Any = None,
        eval_dataloader: Any = None,
        **kwargs: Any,
    ) -> None:
        if model is None:
            raise LipError("the Trainer passed no model to the callback")
        device = next(model.parameters()).device
        self.decision = decide_in_memory(
            model,
            self.request,
            train_dataloader,
            eval_dataloader,
            self._runner(model, device),
            (rows_of_this_process(train_dataloader), rows_of_this_process(eval_dataloader)),
        )
        self.record = self.decision.record
        config = getattr(model, "config", None)
        if config is not None:
            setattr(config, CONFIG_KEY, self.record)
        if state.is_world_process_zero:
            entry = {**self.decision.metrics, "lip/outcome": self.record["outcome"]}
            entry["lip/decision"] = self.record["decision"]
            if state.epoch is not None:
                entry["epoch"] = state.epoch
            state.log_history.append({**entry, "step": state.global_step})
            logger.warning(f"lip: {self.record['decision']}")

    def _runner(self, model: Any, device: torch.device) -> Callable[[Any], tuple[Callable[[], object], Any]]:
        label_key = self.label_key

        def run(batch: Any) -> tuple[Callable[[], object], Any]:
            if not isinstance(batch, Mapping) or label_key not in batch:
                raise LipError(f"a batch has no `{label_key}` entry: the labels lip fits the head to")
            inputs = {
                name: value.to(device) if isinstance(value, torch.Tensor) else value
                for name, value in batch.items()
                if name != label_key
            }
            return (lambda: model(**inputs)), batch[label_key]

        return run
