"""Checkpoints as the ecosystem writes them: Lightning, DDP, torch.compile, EMA copies, head names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_head
from typer.testing import CliRunner

from lip_cli.checkpoint import Checkpoint, canonical_name, find_layer, is_ema, is_head_name, layer_by_name
from lip_cli.cli import app

runner = CliRunner(env={"COLUMNS": "200"})


def run(*args: object):
    return runner.invoke(app, [str(arg) for arg in args])


def state_checkpoint(state: dict) -> Checkpoint:
    return Checkpoint(path=Path("model.pt"), format="pt", state=state)


@pytest.mark.parametrize(
    "name, canonical, ema, head",
    [
        ("fc", "fc", False, True),
        ("model.fc", "fc", False, True),
        ("module._orig_mod.fc", "fc", False, True),
        ("model_ema.module.fc", "fc", True, True),
        ("ema.head.fc", "head.fc", True, True),
        ("classifier.1", "classifier.1", False, True),
        ("model.heads.head", "heads.head", False, True),
        ("score", "score", False, True),
        ("layer4.0.conv1", "layer4.0.conv1", False, False),
        ("model.encoder.proj", "encoder.proj", False, False),
    ],
)
def test_names(name: str, canonical: str, ema: bool, head: bool) -> None:
    assert canonical_name(name) == canonical
    assert is_ema(name) is ema
    assert is_head_name(name) is head


def test_layer_option_takes_a_unique_suffix_or_lists_the_matches() -> None:
    state = {
        "model.backbone.fc.weight": torch.zeros(8, 4),
        "model.fc.weight": torch.zeros(3, 8),
        "model.fc.bias": torch.zeros(3),
    }
    checkpoint = state_checkpoint(state)
    assert layer_by_name(checkpoint, "model.fc").bias_key == "model.fc.bias"
    assert layer_by_name(checkpoint, "backbone.fc").name == "model.backbone.fc"
    with pytest.raises(Exception, match="matches several layers: model.backbone.fc"):
        layer_by_name(checkpoint, "fc")
    with pytest.raises(Exception, match="no layer `c`"):
        layer_by_name(checkpoint, "c")  # a suffix must be whole components


def test_auto_detection_prefers_the_head_over_an_ema_copy_and_a_projection() -> None:
    state = {
        "model.proj.weight": torch.zeros(10, 16),
        "model.head.weight": torch.zeros(10, 16),
        "model_ema.module.head.weight": torch.zeros(10, 16),
    }
    layer = find_layer(state_checkpoint(state), None, in_features=16, num_classes=10)
    assert layer.name == "model.head"


def write_lightning(folder: Path, head) -> Path:
    """A Lightning-style checkpoint: prefixed state dict, EMA copy, optimizer and callbacks."""
    weight = head.weight.float()
    state = {
        "model.backbone.weight": torch.randn(12, 7),
        "model.fc.weight": weight,
        "model.fc.bias": head.bias.float(),
        "model_ema.module.fc.weight": weight * 0.9,
        "model_ema.module.fc.bias": head.bias.float(),
    }
    container = {
        "epoch": 12,
        "global_step": 3400,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": state,
        "optimizer_states": [{"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 0.1}]}],
        "callbacks": {"ModelCheckpoint": {"best_model_score": torch.tensor(0.7)}},
        "hyper_parameters": {"lr": 0.1, "classes": 5},
    }
    torch.save(container, folder / "lightning.ckpt.pt")
    np.save(folder / "features.npy", head.features.numpy())
    np.save(folder / "labels.npy", head.labels.numpy())
    return folder / "lightning.ckpt.pt"


def test_lightning_checkpoint_end_to_end(tmp_path: Path) -> None:
    head = make_head(n=300, q=12, l=5, seed=31)
    path = write_lightning(tmp_path, head)
    result = run("repair", path, "-f", tmp_path / "features.npy", "--k", 2, "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["layer"] == "model.fc"
    assert document["other_copies"] == ["model_ema.module.fc"]
    original = torch.load(path, weights_only=True)
    repaired = torch.load(document["output"], weights_only=True)
    assert repaired["epoch"] == 12 and repaired["hyper_parameters"] == original["hyper_parameters"]
    assert torch.equal(
        repaired["optimizer_states"][0]["state"][0]["exp_avg"],
        original["optimizer_states"][0]["state"][0]["exp_avg"],
    )
    assert torch.equal(repaired["callbacks"]["ModelCheckpoint"]["best_model_score"], torch.tensor(0.7))
    for key, tensor in original["state_dict"].items():
        if key != "model.fc.weight":
            assert torch.equal(repaired["state_dict"][key], tensor)
    assert not torch.equal(
        repaired["state_dict"]["model.fc.weight"], original["state_dict"]["model.fc.weight"]
    )
    ema = run(
        "repair",
        path,
        "-f",
        tmp_path / "features.npy",
        "--k",
        2,
        "--layer",
        "model_ema.module.fc",
        "--json",
        "--dry-run",
    )
    assert json.loads(ema.stdout)["layer"] == "model_ema.module.fc"
    human = run("repair", path, "-f", tmp_path / "features.npy", "--k", 2, "--dry-run")
    assert "model_ema.module.fc" in human.stdout


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_ddp_and_compile_prefixes(tmp_path: Path, prefix: str) -> None:
    head = make_head(n=200, q=12, l=5, seed=32)
    state = {
        f"{prefix}body.weight": torch.randn(12, 4),
        f"{prefix}fc.weight": head.weight.float(),
        f"{prefix}fc.bias": head.bias.float(),
    }
    torch.save(state, tmp_path / "m.pt")
    np.save(tmp_path / "features.npy", head.features.numpy())
    np.save(tmp_path / "labels.npy", head.labels.numpy())
    for layer in ([], ["--layer", "fc"]):
        result = run(
            "repair",
            tmp_path / "m.pt",
            "-f",
            tmp_path / "features.npy",
            "--k",
            2,
            "--dry-run",
            "--json",
            *layer,
        )
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["layer"] == f"{prefix}fc"
