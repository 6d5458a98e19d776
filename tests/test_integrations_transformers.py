"""The Hugging Face callback (`lip_cli.integrations.transformers`) with a real `Trainer` on CPU and a
tiny BERT built from a config (nothing downloaded): the decision at the end of training, logged in
`state.log_history`, the head `save_model` writes and `from_pretrained` loads, lip's record in
config.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lip_cli import LipError  # noqa: E402
from lip_cli.integrations.transformers import LipTrainerCallback  # noqa: E402

CLASSES, TOKENS = 4, 8


@pytest.fixture(autouse=True)
def one_thread() -> object:
    """Tiny products: one thread is faster, much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Sequences(torch.utils.data.Dataset):
    """Random token sequences labelled by their first token (mod 4), a fifth of the labels redrawn."""

    def __init__(self, rows: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 32, (rows, TOKENS), generator=generator)
        labels = self.ids[:, 0] % CLASSES
        noisy = torch.rand(rows, generator=generator) < 0.2
        self.labels = torch.where(noisy, torch.randint(CLASSES, (rows,), generator=generator), labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.labels[index]}


class TrainedHead(transformers.TrainerCallback):
    """The classifier's weight as training left it, before lip's callback (which runs after it)."""

    def on_train_end(
        self, args: object, state: object, control: object, model: object = None, **kwargs: object
    ):
        self.weight = model.classifier.weight.detach().clone()


def train(tmp_path: Path, lip_callback: LipTrainerCallback) -> tuple[object, TrainedHead]:
    config = transformers.BertConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=TOKENS, num_labels=CLASSES,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), num_train_epochs=1, per_device_train_batch_size=32,
        per_device_eval_batch_size=100, learning_rate=1e-3, eval_strategy="epoch", save_strategy="no",
        logging_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    trained = TrainedHead()
    trainer = transformers.Trainer(
        model=model,
        args=arguments,
        train_dataset=Sequences(192, 1),
        eval_dataset=Sequences(200, 2),
        callbacks=[trained, lip_callback],
    )
    trainer.train()
    return trainer, trained


def test_a_repair_is_what_save_model_writes_and_from_pretrained_loads(tmp_path: Path) -> None:
    lip_callback = LipTrainerCallback(k=2, force_write=True)  # a given k: tested, and applied
    trainer, trained = train(tmp_path, lip_callback)
    record = lip_callback.record
    assert record["k"] == 2 and record["outcome"] in ("given", "refused") and record["changed"]
    assert record["train_rows"] == 192 and record["val_rows"] == 200
    assert record["test"]["given_k"] and record["test"]["confirmation_rows"] == 200
    head = trainer.model.classifier.weight
    assert not torch.equal(head, trained.weight)
    # PSP + LAP at k = 2 of the trained head: its top 2 singular pairs kept, the tail re-fitted
    left, values, right = torch.linalg.svd(trained.weight.double(), full_matrices=False)
    change = head.detach().double() - trained.weight.double()
    assert (
        float((change @ right[:2].T).abs().max()) < 1e-6
        and float((left[:, :2].T @ change).abs().max()) < 1e-6
    )
    assert values.tolist() == pytest.approx(record["singular_values_before"], rel=1e-6)
    after = torch.linalg.svdvals(head.detach().double())
    assert after.tolist() == pytest.approx(
        sorted(map(abs, record["singular_values_after"]), reverse=True), rel=1e-5
    )

    entries = [entry for entry in trainer.state.log_history if "lip/k" in entry]
    assert len(entries) == 1 and entries[0]["lip/k"] == 2 and entries[0]["lip/decision"] == record["decision"]

    trainer.save_model(str(tmp_path / "model"))
    loaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "model")
    assert torch.equal(loaded.classifier.weight, head) and torch.equal(
        loaded.classifier.bias, trainer.model.classifier.bias
    )
    assert loaded.config.lip["outcome"] == record["outcome"]
    assert json.loads((tmp_path / "model" / "config.json").read_text())["lip"]["k"] == 2


def test_an_unconfirmed_decision_leaves_the_saved_head_bit_identical(tmp_path: Path) -> None:
    lip_callback = LipTrainerCallback()
    trainer, trained = train(tmp_path, lip_callback)
    record = lip_callback.record
    assert record["outcome"] == "unconfirmed" and not record["changed"] and record["k"] == record["rank"]
    assert record["test"]["confirmation_rows"] == 100 and record["test"]["selection_rows"] == 100
    trainer.save_model(str(tmp_path / "model"))
    loaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "model")
    assert torch.equal(loaded.classifier.weight, trained.weight)
    assert loaded.config.lip["decision"] == record["decision"]


def test_options_are_checked_when_the_callback_is_built() -> None:
    with pytest.raises(LipError, match=r"^--alpha 0: must be between 0 and 1$"):
        LipTrainerCallback(alpha=0)
    with pytest.raises(LipError, match="--targets auto chooses the targets together with k"):
        LipTrainerCallback(k=1, targets="auto")


def test_a_missing_transformers_is_named_with_its_extra() -> None:
    code = (
        "import sys, lip_cli\n"
        "sys.modules['transformers'] = None\n"
        "try:\n"
        "    import lip_cli.integrations.transformers\n"
        "except lip_cli.LipError as error:\n"
        "    print(error)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        "lip_cli.integrations.transformers needs Hugging Face transformers, which is not installed: "
        "pip install 'lip-cli[hf]'"
    )
