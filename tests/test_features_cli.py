"""`lip features` with a python:module:factory model and a .npy of inputs (no vision extra needed)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lip_cli.cli import app

runner = CliRunner(env={"COLUMNS": "200"})
MODULE = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(12, 10), nn.ReLU())
        self.head = nn.Linear(10, 4)

    def forward(self, x):
        return self.head(self.body(x))


def make():
    return Net()


def not_a_model():
    return 42
"""


def run(*args: object):
    return runner.invoke(app, [str(arg) for arg in args])


@pytest.fixture
def setup(tmp_path: Path, monkeypatch) -> dict[str, Path]:
    (tmp_path / "lipfactory_models.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = importlib.util.spec_from_file_location("lipfactory_models", tmp_path / "lipfactory_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    model = module.make()
    torch.save(
        {"model": {f"model.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, tmp_path / "ckpt.pt"
    )
    inputs = np.random.default_rng(0).standard_normal((70, 3, 2, 2)).astype(np.float32)
    np.save(tmp_path / "inputs.npy", inputs)
    np.save(tmp_path / "targets.npy", np.random.default_rng(1).integers(0, 4, 70))
    return {
        "ckpt": tmp_path / "ckpt.pt",
        "inputs": tmp_path / "inputs.npy",
        "labels": tmp_path / "targets.npy",
        "model": model,
        "folder": tmp_path,
    }


def test_features_then_repair(setup) -> None:
    folder = setup["folder"]
    out = folder / "cache" / "feats.npy"
    out.parent.mkdir()
    result = run(
        "features",
        setup["ckpt"],
        "--model",
        "python:lipfactory_models:make",
        "--data",
        setup["inputs"],
        "--labels",
        setup["labels"],
        "--out",
        out,
        "--batch-size",
        16,
        "--json",
    )
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["samples"] == 70 and document["feature_dim"] == 10 and document["layer"] == "head"
    features = np.load(out)
    model = setup["model"].eval()
    with torch.inference_mode():
        logits = model(torch.from_numpy(np.load(setup["inputs"])))
    weight, bias = model.head.weight.detach(), model.head.bias.detach()
    torch.testing.assert_close(torch.from_numpy(features) @ weight.T + bias, logits, rtol=1e-5, atol=1e-5)
    assert np.array_equal(np.load(out.with_name(f"{out.stem}.labels.npy")), np.load(setup["labels"]))
    repaired = run("repair", setup["ckpt"], "-f", out, "--k", 2, "--json", "--dry-run")
    assert repaired.exit_code == 0, repaired.output
    assert json.loads(repaired.stdout)["layer"] == "model.head"  # its labels beside the cache were found
    (folder / "sub").mkdir()
    limited = run(
        "features",
        setup["ckpt"],
        "--model",
        "python:lipfactory_models:make",
        "--data",
        setup["inputs"],
        "--labels",
        setup["labels"],
        "--out",
        folder / "sub" / "few.npy",
        "--limit",
        9,
        "--dtype",
        "float16",
    )
    assert limited.exit_code == 0, limited.output
    few = np.load(folder / "sub" / "few.npy")
    assert few.shape == (9, 10) and few.dtype == np.float16


@pytest.mark.parametrize(
    "model, message",
    [
        ("python:lipfactory_models:missing", "cannot import 'missing'"),
        ("python:lipfactory_models:not_a_model", "not an nn.Module"),
        ("keras:resnet", "use torchvision:NAME"),
    ],
)
def test_bad_model_specs(setup, model: str, message: str) -> None:
    result = run(
        "features",
        setup["ckpt"],
        "--model",
        model,
        "--data",
        setup["inputs"],
        "--labels",
        setup["labels"],
        "--out",
        setup["folder"] / "f.npy",
    )
    assert result.exit_code == 1 and message in result.stderr and result.stderr.count("\n") == 1


def test_checkpoint_that_does_not_fit(setup) -> None:
    torch.save(
        {"head.weight": torch.zeros(4, 10), "other.weight": torch.zeros(2, 2)}, setup["folder"] / "bad.pt"
    )
    result = run(
        "features",
        setup["folder"] / "bad.pt",
        "--model",
        "python:lipfactory_models:make",
        "--data",
        setup["inputs"],
        "--labels",
        setup["labels"],
        "--out",
        setup["folder"] / "f.npy",
    )
    assert result.exit_code == 1
    assert (
        "does not fit the architecture: 3 missing keys" in result.stderr and "other.weight" in result.stderr
    )
    assert not (setup["folder"] / "f.npy").exists()


def test_bad_data(setup) -> None:
    base = [
        "features",
        setup["ckpt"],
        "--model",
        "python:lipfactory_models:make",
        "--out",
        setup["folder"] / "f.npy",
    ]
    cases = [
        (["--data", setup["inputs"]], "need --labels"),
        (["--data", setup["folder"] / "none.npy", "--labels", setup["labels"]], "none.npy: no such file"),
        (["--data", setup["folder"] / "no-folder"], "no-folder: no such folder"),
    ]
    for extra, message in cases:
        result = run(*base, *extra)
        assert result.exit_code == 1 and message in result.stderr, result.output


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed")
def test_missing_vision_extra_says_how_to_install(setup) -> None:
    result = run(
        "features",
        setup["ckpt"],
        "--model",
        "torchvision:resnet18",
        "--data",
        setup["inputs"],
        "--labels",
        setup["labels"],
        "--out",
        setup["folder"] / "f.npy",
    )
    assert result.exit_code == 1 and "pip install 'lip-cli[vision]'" in result.stderr
