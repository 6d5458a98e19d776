"""The Lightning callback (`lip_cli.integrations.lightning`) with a real Trainer on CPU: the decision
is `lip repair --k auto`'s on the same rows, only a confirmed repair changes the head, checkpoints
saved afterwards carry it and lip's record, the spectrum over training, the options' messages."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from typer.testing import CliRunner

pl = pytest.importorskip("lightning.pytorch")

from lip_cli import LipError, collect_features  # noqa: E402
from lip_cli.cli import app  # noqa: E402
from lip_cli.integrations.core import NO_VALIDATION  # noqa: E402
from lip_cli.integrations.lightning import LipCallback  # noqa: E402

CLASSES, WIDTH, BATCH = 20, 32, 250
runner = CliRunner()


@pytest.fixture(autouse=True)
def one_thread() -> object:
    """Tiny products: one thread is faster, much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def clusters(rows: int, seed: int, noise: float = 0.2) -> TensorDataset:
    """Gaussian clusters around fixed centres, a share `noise` of the labels redrawn at random."""
    centres = torch.randn(CLASSES, WIDTH, generator=torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(CLASSES, (rows,), generator=generator)
    inputs = centres[labels] + torch.randn(rows, WIDTH, generator=generator)
    flipped = torch.rand(rows, generator=generator) < noise
    return TensorDataset(
        inputs, torch.where(flipped, torch.randint(CLASSES, (rows,), generator=generator), labels)
    )


class Classifier(pl.LightningModule):
    """A small classifier: a body (an MLP with dropout, or nothing) and the head `fc`."""

    def __init__(self, hidden: int = 0, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        # dropout: lip must run the model in eval mode, as `collect_features` does for the command
        body = nn.Sequential(nn.Linear(WIDTH, hidden), nn.ReLU(), nn.Dropout(0.3))
        self.body = body if hidden else nn.Identity()
        self.fc = nn.Linear(hidden or WIDTH, CLASSES)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(inputs))

    def training_step(self, batch: list[torch.Tensor], index: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch: list[torch.Tensor], index: int) -> None:
        self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def collapsed_head() -> Classifier:
    """The clusters' Bayes head with its tail after k = 8 shrunk 20-fold, trained at lr 0 (the
    optimiser leaves it so): a head LAP repairs and the test confirms."""
    model = Classifier(lr=0.0)
    centres = torch.randn(CLASSES, WIDTH, generator=torch.Generator().manual_seed(5))
    u, s, vh = torch.linalg.svd(centres.T, full_matrices=False)
    with torch.no_grad():
        model.fc.weight.copy_(((u * torch.cat([s[:8], 0.05 * s[8:]])) @ vh).T)
        model.fc.bias.copy_(-(centres**2).sum(1) / 2)
    return model


def loaders(train_rows: int = 2000, val_rows: int = 2000) -> tuple[DataLoader, DataLoader]:
    train = DataLoader(clusters(train_rows, 1), batch_size=BATCH)
    return train, DataLoader(clusters(val_rows, 2), batch_size=val_rows)


def trainer(tmp_path: Path, *callbacks: pl.Callback, epochs: int = 1, **options: object) -> pl.Trainer:
    settings: dict = {"logger": pl.loggers.CSVLogger(tmp_path, name="logs"), "num_sanity_val_steps": 0}
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        **(settings | options),
    )


def command_decision(tmp_path: Path, checkpoint: Path, train: DataLoader, val: DataLoader) -> dict:
    """`lip repair --k auto --json` on the checkpoint and the features the trained model gives."""
    model = Classifier.load_from_checkpoint(checkpoint)
    collect_features(model, train, out=tmp_path / "train.npy")
    collect_features(model, val, out=tmp_path / "val.npy")
    result = runner.invoke(
        app,
        [
            "repair", str(checkpoint), "--features", str(tmp_path / "train.npy"),
            "--val-features", str(tmp_path / "val.npy"), "--k", "auto", "--json",
            "--chunk-rows", str(BATCH), "--force-write", "--output", str(tmp_path / "command.ckpt"),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("case", ["repaired", "unconfirmed"])
def test_the_callback_decides_as_the_command_on_the_same_rows(tmp_path: Path, case: str) -> None:
    train, val = loaders()
    torch.manual_seed(0)  # the MLP's initial weights: training them on noisy labels gives nothing to confirm
    model = collapsed_head() if case == "repaired" else Classifier(hidden=32, lr=0.2)
    lip = LipCallback()
    saves = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    trainer(tmp_path, lip, saves, epochs=1 if case == "repaired" else 3).fit(model, train, val)
    record = lip.record
    assert record is not None and record["outcome"] == case

    trained = tmp_path / "checkpoints" / "last.ckpt"  # saved before the decision: the trained head
    command = command_decision(tmp_path, trained, train, val)
    assert (record["k"], record["targets"], record["outcome"]) == (
        command["k"], command["targets"], command["outcome"]
    )  # fmt: skip
    assert record["test"] == command["test"]  # p, counts, interval, power: the same test
    assert record["decision"] == command["decision"]
    # the head in memory is the one the command writes, bit for bit
    written = Classifier.load_from_checkpoint(tmp_path / "command.ckpt").fc.weight
    assert torch.equal(model.fc.weight, written)
    trained_head = Classifier.load_from_checkpoint(trained).fc.weight
    assert torch.equal(model.fc.weight, trained_head) == (case == "unconfirmed")
    assert record["changed"] == (case == "repaired")

    # a checkpoint saved afterwards carries the head in memory and lip's record, and loads back
    after = tmp_path / "after.ckpt"
    model.trainer.save_checkpoint(after)
    loaded = Classifier.load_from_checkpoint(after)
    assert torch.equal(loaded.fc.weight, model.fc.weight) and torch.equal(loaded.fc.bias, model.fc.bias)
    state = torch.load(after, weights_only=True)["callbacks"][lip.state_key]
    assert state["record"]["outcome"] == case and state["record"]["k"] == command["k"]
    restored = LipCallback()
    restored.load_state_dict(state)
    assert restored.record == record

    # the decision is in the trainer's logger
    rows = list(csv.DictReader((tmp_path / "logs" / "version_0" / "metrics.csv").open()))
    logged = [row for row in rows if row.get("lip/k")]
    assert len(logged) == 1 and float(logged[0]["lip/k"]) == command["k"]
    assert float(logged[0]["lip/confirmed"]) == (case == "repaired")
    if case == "repaired":
        assert float(logged[0]["lip/p_value"]) == pytest.approx(command["test"]["p_value"])
        assert float(logged[0]["lip/ci_low"]) > 0


def test_without_a_validation_loader_nothing_changes(tmp_path: Path) -> None:
    train, _ = loaders(val_rows=40)
    model = collapsed_head()
    before = model.fc.weight.detach().clone()
    lip = LipCallback()
    trainer(tmp_path, lip, logger=False, enable_checkpointing=False, limit_val_batches=0).fit(model, train)
    assert lip.record["outcome"] == "unconfirmed" and lip.record["decision"] == NO_VALIDATION
    assert torch.equal(model.fc.weight, before) and not lip.record["changed"]
    assert lip.record["test"] is None and lip.record["train_rows"] == 2000


def test_a_given_k_is_tested_and_applied_and_too_few_rows_change_nothing(tmp_path: Path) -> None:
    train, val = loaders(val_rows=5)
    model = collapsed_head()
    before = model.fc.weight.detach().clone()
    auto = LipCallback(seed=1)
    trainer(tmp_path, auto, logger=False, enable_checkpointing=False).fit(model, train, val)
    assert auto.record["outcome"] == "unconfirmed" and torch.equal(model.fc.weight, before)
    assert "5 validation rows are too few" in auto.record["decision"]

    train, val = loaders()
    given = LipCallback(k=8, targets="logit-scale")
    trainer(tmp_path, given, logger=False, enable_checkpointing=False).fit(model, train, val)
    assert given.record["outcome"] == "given" and given.record["k"] == 8 and given.record["changed"]
    assert given.record["test"]["given_k"] and given.record["test"]["accuracy_change"] > 0
    assert not torch.equal(model.fc.weight, before)


def test_options_are_checked_when_the_callback_is_built_with_the_commands_messages(tmp_path: Path) -> None:
    cases = {
        (("--k", "3", "--targets", "auto"), (("k", 3), ("targets", "auto"))),
        (("--k", "auto", "--alpha", "1.5"), (("alpha", 1.5),)),
    }
    for arguments, options in cases:
        result = runner.invoke(
            app, ["repair", "missing.pt", "--features", "missing.npy", *arguments, "--json"]
        )
        assert result.exit_code in (1, 2)
        with pytest.raises(LipError) as raised:
            LipCallback(**dict(options))
        assert str(raised.value).splitlines() == [str(raised.value)]  # one line
        if result.exit_code == 1:
            assert json.loads(result.stdout)["error"]["message"] == str(raised.value)
    for bad in ({"k": -1}, {"k": "8"}, {"targets": "papers"}, {"seed": -1}, {"compute_dtype": "float16"}):
        with pytest.raises(LipError, match=f"--{next(iter(bad)).replace('_', '-')} "):
            LipCallback(**bad)
    assert (
        LipCallback().request.targets == "logit-scale" and LipCallback(k=4).request.targets == "logit-scale"
    )
    with pytest.raises(LipError, match="the model has no module `head`"):  # before any training
        trainer(tmp_path, LipCallback(layer="head"), logger=False).fit(collapsed_head(), *loaders(40, 40))


def test_the_spectrum_is_logged_at_each_validation_epoch_never_in_the_sanity_check(tmp_path: Path) -> None:
    train, val = loaders(train_rows=500, val_rows=200)
    lip = LipCallback(track_spectrum=True)
    torch.manual_seed(0)
    trainer(tmp_path, lip, epochs=2, num_sanity_val_steps=1).fit(Classifier(hidden=16, lr=0.2), train, val)
    rows = list(csv.DictReader((tmp_path / "logs" / "version_0" / "metrics.csv").open()))
    spectra = [row for row in rows if row.get("lip/stable_rank")]
    assert len(spectra) == 2 and len(lip.spectra) == 2  # two epochs, the sanity check left out
    assert [entry["epoch"] for entry in lip.spectra] == [0, 1]
    assert float(spectra[0]["lip/phi_first_epoch"] or 1.0) == 1.0  # no phi at the first epoch itself
    assert 0.0 <= float(spectra[1]["lip/phi_first_epoch"]) <= 1.0
    assert len(lip.spectra[0]["singular_values"]) == min(16, CLASSES)


def test_importing_lip_leaves_the_frameworks_alone_and_a_missing_one_is_named() -> None:
    code = (
        "import sys, lip_cli, lip_cli.integrations\n"
        "assert 'lightning' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules)\n"
        "sys.modules['lightning'] = None\n"
        "try:\n"
        "    import lip_cli.integrations.lightning\n"
        "except lip_cli.LipError as error:\n"
        "    print(error)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        "lip_cli.integrations.lightning needs Lightning, which is not installed: "
        "pip install 'lip-cli[lightning]'"
    )


class HeadOfEachRank(pl.Callback):
    """Writes each process's head and lip's record after lip's callback ran (it runs first)."""

    def __init__(self, folder: Path, lip: LipCallback) -> None:
        self.folder, self.lip = folder, lip

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.save(pl_module.fc.weight.detach().clone(), self.folder / f"head-{trainer.global_rank}.pt")
        (self.folder / f"record-{trainer.global_rank}.json").write_text(json.dumps(self.lip.record))


@pytest.mark.skipif(
    os.environ.get("LIP_TEST_DDP_SPAWN") != "1",
    reason="2 processes that each import Lightning: 30-50 s here; LIP_TEST_DDP_SPAWN=1 runs it "
    "(tests/test_integrations_ddp.py runs the same all-reduce path without Lightning, in seconds)",
)
def test_under_ddp_the_sums_meet_and_every_rank_holds_the_head_the_command_chooses(tmp_path: Path) -> None:
    train, val = loaders(train_rows=1000, val_rows=1001)  # odd: DistributedSampler pads a rank by one row
    model = collapsed_head()
    lip = LipCallback()
    ddp = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[lip, HeadOfEachRank(tmp_path, lip)],
    )  # fmt: skip
    ddp.fit(model, train, val)
    heads = [torch.load(tmp_path / f"head-{rank}.pt", weights_only=True) for rank in (0, 1)]
    records = [json.loads((tmp_path / f"record-{rank}.json").read_text()) for rank in (0, 1)]
    assert torch.equal(heads[0], heads[1]) and torch.equal(model.fc.weight, heads[0])  # rank 0's, everywhere
    assert records[0]["test"] == records[1]["test"] and records[0]["train_rows"] == 1000
    assert ddp.callback_metrics["lip/k"] == records[0]["k"]

    # the command on the same rows, the validation rows in the ranks' order (as torchrun reads a file)
    features = val.dataset.tensors[0]  # the head's inputs: the body is the identity
    order = torch.cat([torch.arange(0, 1001, 2), torch.arange(1, 1001, 2)])
    np.save(tmp_path / "train.npy", train.dataset.tensors[0].numpy())
    np.save(tmp_path / "train.labels.npy", train.dataset.tensors[1].numpy())
    np.save(tmp_path / "val.npy", features[order].numpy())
    np.save(tmp_path / "val.labels.npy", val.dataset.tensors[1][order].numpy())
    torch.save({"state_dict": collapsed_head().state_dict()}, tmp_path / "trained.pt")
    result = runner.invoke(
        app,
        [
            "repair", str(tmp_path / "trained.pt"), "--features", str(tmp_path / "train.npy"),
            "--val-features", str(tmp_path / "val.npy"), "--k", "auto", "--json", "--dry-run",
        ],
    )  # fmt: skip
    command = json.loads(result.stdout)
    assert (records[0]["k"], records[0]["outcome"]) == (command["k"], command["outcome"]) == (8, "repaired")
    assert records[0]["test"] == command["test"]
    assert records[0]["val_rows"] == 1001
