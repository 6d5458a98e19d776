"""Every checkpoint the training frameworks write: recognised by content whatever the name, the
data-only types they store kept, pytorch_model.bin folders, and hostile pickles refused under any name."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_head
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import paper_lip
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lip_cli import formats
from lip_cli.cli import app
from lip_cli.files import sibling_output

runner = CliRunner(env={"COLUMNS": "200"})
NAMES = [
    "model.ckpt",
    "epoch=1-step=64.ckpt",
    "model_best.pth.tar",
    "model.tar",
    "pytorch_model.bin",
    "model",
]
SERIALIZATIONS = ["zip", "legacy", "safetensors"]


def run(*args: object):
    """The command; a repair at a given k pinned to the paper's targets, which the reference computes."""
    words = [str(arg) for arg in args]
    if words[:1] == ["repair"] and "--targets" not in words and "auto" not in words:
        words += ["--targets", "paper"]
    return runner.invoke(app, words)


def save(state: dict, path: Path, serialization: str) -> None:
    if serialization == "safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path, _use_new_zipfile_serialization=serialization == "zip")


def problem(folder: Path, seed: int = 3) -> tuple[dict[str, torch.Tensor], object]:
    """A state dict with a body and an `fc` head, and features.npy + labels.npy for the head."""
    head = make_head(n=120, q=6, l=4, seed=seed)
    state = {
        "body.weight": torch.randn(6, 5, generator=torch.Generator().manual_seed(seed)),
        "fc.weight": head.weight.float(),
        "fc.bias": head.bias.float(),
    }
    np.save(folder / "features.npy", head.features.float().numpy())
    np.save(folder / "labels.npy", head.labels.numpy())
    return state, head


def reference_head(head, k: int) -> np.ndarray:
    weight, bias = head.weight.float().double().numpy(), head.bias.float().double().numpy()
    return paper_lip(weight, bias, head.features.float().double().numpy(), head.labels.numpy(), k)


def close_to(weight: torch.Tensor, expected: np.ndarray) -> bool:
    error = np.linalg.norm(weight.double().numpy() - expected) / np.linalg.norm(expected)
    return bool(error < 1e-5)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("serialization", SERIALIZATIONS)
def test_detected_by_content_and_repaired_in_kind(tmp_path: Path, name: str, serialization: str) -> None:
    state, head = problem(tmp_path)
    model = tmp_path / name
    save(state, model, serialization)
    expected_format = {"zip": formats.TORCH_ZIP, "legacy": formats.TORCH_PICKLE}.get(
        serialization, serialization
    )
    assert formats.detect_format(model) == expected_format

    result = run("repair", model, "-f", tmp_path / "features.npy", "--k", 2, "--json")
    assert result.exit_code == 0, result.output
    output = Path(json.loads(result.stdout)["output"])
    assert output == sibling_output(model) and output.name != model.name
    assert formats.detect_format(output) == expected_format  # written back in the input's serialization
    repaired = load_file(output) if serialization == "safetensors" else torch.load(output, weights_only=True)
    assert close_to(repaired["fc.weight"], reference_head(head, 2))
    assert torch.equal(repaired["body.weight"], state["body.weight"])
    assert torch.equal(repaired["fc.bias"], state["fc.bias"])
    inspected = json.loads(run("inspect", output, "--json").stdout)
    assert inspected["provenance"]["k"] == 2


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=600), keep=st.integers(0, 600))
def test_detection_reads_only_the_head_and_never_fails(tmp_path: Path, content: bytes, keep: int) -> None:
    """Any bytes give a format or None, never an exception; a valid file keeps its format under any
    name, and a torch archive or numpy file is told from its first bytes alone."""
    path = tmp_path / "any"
    path.write_bytes(content)
    assert formats.detect_format(path) in (
        None,
        formats.SAFETENSORS,
        formats.NPY,
        formats.NPZ,
        *formats.TORCH_FORMATS,
    )
    torch.save({"w": torch.ones(3)}, path)
    zipped = path.read_bytes()
    path.write_bytes(
        zipped[: max(keep, 64)]
    )  # truncated: still named by its head, the loader reports the rest
    assert formats.detect_format(path) == formats.TORCH_ZIP
    np.save(tmp_path / "a.npy", np.ones(3))
    shutil.move(tmp_path / "a.npy", path)
    assert formats.detect_format(path) == formats.NPY


def test_default_output_keeps_the_framework_naming(tmp_path: Path) -> None:
    cases = {
        "model_best.pth.tar": "model_best.lip.pth.tar",
        "checkpoint-7.pth.tar": "checkpoint-7.lip.pth.tar",
        "epoch=1-step=64.ckpt": "epoch=1-step=64.lip.ckpt",
        "last.ckpt": "last.lip.ckpt",
        "pytorch_model.bin": "pytorch_model.lip.bin",
        "weights": "weights.lip",
        "epoch=1.5.tar": "epoch=1.5.lip.tar",  # `.5` is part of the name, not an extension
        "model.pt": "model.lip.pt",
    }
    for name, expected in cases.items():
        assert sibling_output(tmp_path / name).name == expected


def test_array_files_are_recognised_by_content_too(tmp_path: Path) -> None:
    state, head = problem(tmp_path)
    torch.save(state, tmp_path / "model.ckpt")
    shutil.move(tmp_path / "features.npy", tmp_path / "features.cache")
    np.savez(tmp_path / "val.data", features=head.features.float().numpy(), labels=head.labels.numpy())
    shutil.move(tmp_path / "val.data.npz", tmp_path / "val.data")
    result = run(
        "repair", tmp_path / "model.ckpt", "-f", tmp_path / "features.cache", "--k", 1,
        "--val-features", tmp_path / "val.data", "--json", "--force-write",  # k = 1 is lower here
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (tmp_path / "text.txt").write_text("not an array\n")
    failed = run("repair", tmp_path / "model.ckpt", "-f", tmp_path / "text.txt", "--k", 1, "--force")
    assert failed.exit_code == 1 and "unknown array format" in failed.stderr


def test_unrecognised_bytes_fail_in_one_line(tmp_path: Path) -> None:
    problem(tmp_path)
    (tmp_path / "notes.ckpt").write_bytes(b"just some text, not a checkpoint\n")
    result = run("repair", tmp_path / "notes.ckpt", "-f", tmp_path / "features.npy", "--k", 1)
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert "notes.ckpt: not a readable .ckpt checkpoint" in result.stderr
    (tmp_path / "notes").write_bytes(b"just some text\n")
    result = run("repair", tmp_path / "notes", "-f", tmp_path / "features.npy", "--k", 1)
    assert result.exit_code == 1 and "unknown checkpoint format (not recognised)" in result.stderr


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class OpenPayload(Payload):
    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("name", [*NAMES, "model.pt", "model.safetensors"])
@pytest.mark.parametrize("how", ["zip", "legacy", "bare pickle"])
@pytest.mark.parametrize("payload", [Payload, OpenPayload])
def test_hostile_pickles_never_run_under_any_name(tmp_path: Path, name: str, how: str, payload) -> None:
    state, _ = problem(tmp_path)
    marker = tmp_path / "MARKER"
    content = {"state_dict": state, "args": argparse.Namespace(lr=0.1), "evil": payload(marker)}
    if how == "bare pickle":
        with open(tmp_path / name, "wb") as handle:
            pickle.dump(content, handle, protocol=2)
    else:
        torch.save(content, tmp_path / name, _use_new_zipfile_serialization=how == "zip")
    result = run("repair", tmp_path / name, "-f", tmp_path / "features.npy", "--k", 1)
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.output
    assert not marker.exists()
    if how != "bare pickle":
        assert "never runs pickled code" in result.stderr
        assert ("`posix.system`" if payload is Payload else "`io.open`") in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([name, "features.npy", "labels.npy"])


class Unlisted:
    """A class of the test module: not data-only by lip's list, so its instances are refused."""

    def __init__(self) -> None:
        self.value = 1


def test_types_off_the_list_are_refused_by_name(tmp_path: Path) -> None:
    state, _ = problem(tmp_path)
    torch.save({"state_dict": state, "extra": Unlisted()}, tmp_path / "model.ckpt")
    result = run("repair", tmp_path / "model.ckpt", "-f", tmp_path / "features.npy", "--k", 1)
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert f"`{__name__}.Unlisted`" in result.stderr and "Re-save it" in result.stderr


def test_timm_style_args_namespace_round_trips(tmp_path: Path) -> None:
    state, head = problem(tmp_path)
    args = argparse.Namespace(model="resnet18", lr=0.05, epochs=3, mixup=None, data_dir=Path("/data"))
    ema = {key: value.clone() + 1 for key, value in state.items()}
    content = {"epoch": 3, "arch": "resnet18", "state_dict": state, "state_dict_ema": ema}
    content.update({"optimizer": {"state": {}, "param_groups": [{"lr": 0.05, "params": [0, 1, 2]}]}})
    content.update({"args": args, "metric": 71.5, "version": 2})
    torch.save(content, tmp_path / "model_best.pth.tar")
    result = run("repair", tmp_path / "model_best.pth.tar", "-f", tmp_path / "features.npy", "--k", 2)
    assert result.exit_code == 0, result.output

    with torch.serialization.safe_globals([argparse.Namespace, type(Path())]):
        written = torch.load(tmp_path / "model_best.lip.pth.tar", weights_only=True)
    assert type(written["args"]) is argparse.Namespace and vars(written["args"]) == vars(args)
    assert type(written["args"].data_dir) is type(Path())
    assert {key: written[key] for key in ("epoch", "arch", "metric", "version", "optimizer")} == {
        key: content[key] for key in ("epoch", "arch", "metric", "version", "optimizer")
    }
    assert all(torch.equal(written["state_dict_ema"][key], ema[key]) for key in ema)
    assert close_to(written["state_dict"]["fc.weight"], reference_head(head, 2))


def test_omegaconf_config_round_trips(tmp_path: Path) -> None:
    omegaconf = pytest.importorskip("omegaconf")
    state, head = problem(tmp_path)
    config = omegaconf.OmegaConf.create(
        {"model": {"name": "net", "widths": [8, 16]}, "lr": 0.1, "tag": "${model.name}-run", "seed": None}
    )
    content = {
        "state_dict": state,
        "hyper_parameters": {"cfg": config, "items": omegaconf.ListConfig([1, 2])},
    }
    torch.save(content, tmp_path / "run.ckpt")
    result = run("repair", tmp_path / "run.ckpt", "-f", tmp_path / "features.npy", "--k", 2)
    assert result.exit_code == 0, result.output

    written = torch.load(tmp_path / "run.lip.ckpt", weights_only=False)  # our own file: a full load checks it
    cfg = written["hyper_parameters"]["cfg"]
    assert (
        type(cfg) is omegaconf.DictConfig
        and type(written["hyper_parameters"]["items"]) is omegaconf.ListConfig
    )
    assert omegaconf.OmegaConf.to_container(cfg) == omegaconf.OmegaConf.to_container(config)
    assert cfg.tag == "net-run"  # the interpolation survives, unresolved in the file
    assert close_to(written["state_dict"]["fc.weight"], reference_head(head, 2))


def test_a_listed_type_is_read_without_its_package(tmp_path: Path, monkeypatch) -> None:
    """The walk never builds what the pickle names, so omegaconf need not even be importable."""
    omegaconf = pytest.importorskip("omegaconf")
    state, _ = problem(tmp_path)
    torch.save({"state_dict": state, "cfg": omegaconf.OmegaConf.create({"a": 1})}, tmp_path / "run.ckpt")
    real_import = importlib.import_module

    def without_omegaconf(name: str, *args):
        if name.startswith("omegaconf"):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_omegaconf)
    monkeypatch.setattr("builtins.__import__", _refusing_import(__import__, "omegaconf"))
    result = run("repair", tmp_path / "run.ckpt", "-f", tmp_path / "features.npy", "--k", 1)
    assert result.exit_code == 0, result.output


def _refusing_import(real, refused: str):
    def guarded(name, *args, **kwargs):
        if name.startswith(refused):
            raise ImportError(f"No module named '{name}'")
        return real(name, *args, **kwargs)

    return guarded


def bin_folder(model, folder: Path, sharded: bool) -> None:
    """A Hugging Face folder with torch `.bin` weights, sharded as transformers shards them."""
    from huggingface_hub import split_torch_state_dict_into_shards

    model.config.save_pretrained(folder)
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    split = split_torch_state_dict_into_shards(
        state, filename_pattern="pytorch_model{suffix}.bin", max_shard_size="4KB" if sharded else "10GB"
    )
    for shard, keys in split.filename_to_tensors.items():
        torch.save({key: state[key] for key in keys}, folder / shard)
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))


@pytest.mark.parametrize("layout", ["single", "sharded", "beside safetensors"])
def test_pytorch_model_bin_folders_load_with_transformers(tmp_path: Path, layout: str) -> None:
    transformers = pytest.importorskip("transformers")
    from test_hf_folders import features_and_logits, tiny_classifier

    model = tiny_classifier(seed=4)
    folder = tmp_path / "bert"
    folder.mkdir()
    sharded = layout == "sharded"
    bin_folder(model, folder, sharded)
    if layout == "beside safetensors":
        model.save_pretrained(folder)  # many hub folders hold both; transformers prefers safetensors
    assert (folder / "pytorch_model.bin.index.json").exists() == sharded
    inputs = torch.randint(0, 64, (120, 8), generator=torch.Generator().manual_seed(5))
    features, _ = features_and_logits(model, inputs)
    labels = torch.randint(0, 5, (120,), generator=torch.Generator().manual_seed(6))
    np.save(tmp_path / "features.npy", features.numpy())
    np.save(tmp_path / "labels.npy", labels.numpy())
    before = {path.name: path.read_bytes() for path in folder.iterdir()}

    result = run("repair", folder, "-f", tmp_path / "features.npy", "--k", 2, "--json")
    assert result.exit_code == 0, result.output
    output = Path(json.loads(result.stdout)["output"])
    assert output == tmp_path / "bert.lip"
    written = {path.name: path.read_bytes() for path in output.iterdir()}
    assert set(written) == set(before) | {"lip.json"}
    changed = {name for name in before if written[name] != before[name]}
    if sharded:
        index = json.loads(before["pytorch_model.bin.index.json"])
        assert changed == {index["weight_map"]["classifier.weight"]}
    elif layout == "single":
        assert changed == {"pytorch_model.bin"}
    else:  # both copies of the model repaired: no stale head left in the output
        assert changed == {"pytorch_model.bin", "model.safetensors"}
    bin_file = next(name for name in changed if name.endswith(".bin"))
    assert formats.detect_format(output / bin_file) == formats.TORCH_ZIP

    expected = paper_lip(
        model.classifier.weight.detach().numpy(),
        model.classifier.bias.detach().numpy(),
        features.numpy(),
        labels.numpy(),
        2,
    )
    for use_safetensors in [False, True] if layout == "beside safetensors" else [None]:
        repaired = transformers.BertForSequenceClassification.from_pretrained(
            output, use_safetensors=use_safetensors
        ).eval()
        assert close_to(repaired.classifier.weight.detach(), expected)
        for key, value in model.state_dict().items():
            if key != "classifier.weight":
                assert torch.equal(repaired.state_dict()[key], value), key


def assert_same(a: object, b: object, where: str = "") -> None:
    """Equal containers, with tensors compared bit for bit."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}/{index}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def test_lightning_checkpoint_repairs_and_loads_back(tmp_path: Path) -> None:
    lightning = pytest.importorskip("lightning")
    omegaconf = pytest.importorskip("omegaconf")

    class Net(lightning.LightningModule):
        def __init__(self, hidden: int = 6, classes: int = 3, cfg=None, args=None) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.body = torch.nn.Linear(5, hidden)
            self.fc = torch.nn.Linear(hidden, classes)

        def embed(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.body(x))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.embed(x))

        def training_step(self, batch, index):
            x, y = batch
            return torch.nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    torch.manual_seed(7)
    x, y = torch.randn(96, 5), torch.randint(0, 3, (96,))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    config = omegaconf.OmegaConf.create({"optimizer": {"lr": 0.1}, "layers": [5, 6, 3]})
    net = Net(cfg=config, args=argparse.Namespace(seed=7, data="toy"))
    trainer = lightning.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(net, data)
    saved = Path(trainer.checkpoint_callback.best_model_path)
    assert saved.name == "epoch=1-step=6.ckpt"  # Lightning's own naming
    with torch.inference_mode():
        features = net.embed(x)
    np.save(tmp_path / "features.npy", features.numpy())
    np.save(tmp_path / "labels.npy", y.numpy())

    result = run("repair", saved, "-f", tmp_path / "features.npy", "--k", 2, "--json")
    assert result.exit_code == 0, result.output
    output = Path(json.loads(result.stdout)["output"])
    assert output == saved.with_name("epoch=1-step=6.lip.ckpt")
    from tests.test_torch_files import assert_only_head_bytes_differ

    assert_only_head_bytes_differ(saved, output)  # every record but the head's storages, byte for byte

    loaded = Net.load_from_checkpoint(output, weights_only=False)  # our own file
    expected = paper_lip(
        net.fc.weight.detach().numpy(), net.fc.bias.detach().numpy(), features.numpy(), y.numpy(), 2
    )
    assert close_to(loaded.fc.weight.detach(), expected)
    assert loaded.hparams.cfg == config and loaded.hparams.args == argparse.Namespace(seed=7, data="toy")
    before = torch.load(saved, weights_only=False)
    after = torch.load(output, weights_only=False)
    before["state_dict"].pop("fc.weight"), after["state_dict"].pop("fc.weight")
    assert_same(before, after)  # every other entry kept: loops, optimizer state, hyper-parameters...


@pytest.mark.parametrize("shard", ["missing.bin", "sub", "."])
def test_a_second_layout_naming_a_shard_that_is_no_file_fails_before_work(tmp_path: Path, shard: str) -> None:
    """A folder read through model.safetensors whose pytorch_model.bin index (rewritten too, so that
    no stale head is left) names a missing shard or a folder: one line, exit 1, nothing written."""
    state, _ = problem(tmp_path)
    folder = tmp_path / "hf"
    (folder / "sub").mkdir(parents=True)
    save_file(state, str(folder / "model.safetensors"))
    index = {"weight_map": {"fc.weight": shard}}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))

    result = run("repair", folder, "-f", tmp_path / "features.npy", "--k", 2)
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # not a traceback
    assert "pytorch_model.bin.index.json" in result.stderr and f"{shard}" in result.stderr
    assert not (tmp_path / "hf.lip").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["features.npy", "hf", "labels.npy"]
