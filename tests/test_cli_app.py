"""The command as a whole: help for every command, fast start-up, the demo, the Python API."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import lip_cli
from lip_cli.cli import app
from lip_cli.demo import DemoSettings, make_demo

runner = CliRunner(env={"COLUMNS": "200"})
COMMANDS = ["repair", "inspect", "compare", "features", "demo"]


def command_options(name: str) -> list[str]:
    from typer.main import get_command

    command = get_command(app).commands[name]  # type: ignore[attr-defined]
    return [option for param in command.params for option in param.opts if option.startswith("--")]


@pytest.mark.parametrize("name", COMMANDS)
def test_help_documents_every_option(name: str) -> None:
    result = runner.invoke(app, [name, "--help"])
    assert result.exit_code == 0
    for option in command_options(name):
        assert option in result.output, option


def test_top_level_help_lists_every_command() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output


def test_startup_does_not_import_torch() -> None:
    code = "import sys, lip_cli.cli, lip_cli; print('torch' in sys.modules, 'rich' in sys.modules)"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert output.stdout.split() == ["False", "False"]
    help_run = subprocess.run([sys.executable, "-m", "lip_cli", "--help"], capture_output=True, text=True)
    assert help_run.returncode == 0 and "repair" in help_run.stdout


def test_public_api_is_importable() -> None:
    for name in lip_cli.__all__:
        assert getattr(lip_cli, name) is not None
    with pytest.raises(AttributeError):
        lip_cli.does_not_exist  # noqa: B018


def test_demo_then_features_then_repair(tmp_path: Path) -> None:
    settings = DemoSettings(train_samples=600, val_samples=300, epochs=3)
    result = make_demo(tmp_path / "demo", settings=settings)
    assert 0.0 <= result.val_accuracy <= 1.0
    folder = tmp_path / "demo"
    for part in ("train", "val"):
        cached = runner.invoke(
            app,
            [
                "features",
                str(folder / "model.pt"),
                "--model",
                "python:lip_cli.demo:demo_model",
                "--data",
                str(folder / part / "inputs.npy"),
                "--labels",
                str(folder / part / "targets.npy"),
                "--out",
                str(folder / part / "features.npy"),
            ],
        )
        assert cached.exit_code == 0, cached.output
        assert "wrote" in cached.stdout and "next: lip repair" in cached.stdout and cached.stderr == ""
    repaired = runner.invoke(
        app,
        [
            "repair",
            str(folder / "model.pt"),
            "-f",
            str(folder / "train" / "features.npy"),
            "--val-features",
            str(folder / "val" / "features.npy"),
            "--k",
            "8",
            "--json",
        ],
    )
    assert repaired.exit_code == 0, repaired.output
    document = json.loads(repaired.stdout)
    assert document["layer"] == "fc" and document["rank"] == 10
    assert set(document["accuracy"]) == {"train_before", "train_after", "val_before", "val_after"}
    assert document["val_labels_source"] == f"{folder / 'val' / 'features.labels.npy'} beside the features"
    assert document["accuracy"]["train_before"] == pytest.approx(result.train_accuracy_noisy, abs=1e-6)
    assert document["accuracy"]["val_before"] == pytest.approx(result.val_accuracy, abs=1e-6)
    saved = torch.load(folder / "model.lip.pt", weights_only=True)
    assert saved["epoch"] == 3 and saved["state_dict"]["fc.weight"].shape == (10, 32)
    inspected = runner.invoke(app, ["inspect", str(folder / "model.lip.pt")])
    assert inspected.exit_code == 0 and "written by lip" in inspected.stdout


def test_demo_refuses_to_replace_files_without_force(tmp_path: Path) -> None:
    settings = DemoSettings(train_samples=100, val_samples=50, epochs=1)
    make_demo(tmp_path, settings=settings)
    result = runner.invoke(app, ["demo", str(tmp_path)])
    assert result.exit_code == 1 and "pass --force" in result.stderr
