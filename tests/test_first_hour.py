"""Issue #22: a new user's first hour. Own model in the current folder, caches side by side, the
version, and output that can be copied."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_head, save_problem
from typer.testing import CliRunner

from lip_cli import __version__, layout, models
from lip_cli.cli import app
from lip_cli.demo import DemoResult, DemoSettings
from lip_cli.errors import LipError
from lip_cli.jobs.common import input_files
from lip_cli.render import console
from lip_cli.render.demo import render_demo

runner = CliRunner()
NET = """
from importlib.machinery import PathFinder

import torch
from torch import nn

NUMPY_FOUND_AT = PathFinder.find_spec("numpy").origin  # what `import numpy` would load now


class Net(nn.Module):
    def __init__(self, num_classes, width=8):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, width), nn.ReLU())
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.body(x))


def labelled(num_labels, width=8, bias=True):
    return Net(num_labels, width)
"""


def run(*args: object, env: dict[str, str] | None = None):
    return runner.invoke(app, [str(arg) for arg in args], env=env)


@pytest.fixture
def own_model(tmp_path: Path, monkeypatch) -> Path:
    """The current folder holds <module>.py with a factory needing num_classes, a shadowing
    numpy.py, the trained weights and train/val inputs; the module name is unique to the test."""
    name = f"mynet_{abs(hash(tmp_path)) % 10**8}"
    (tmp_path / f"{name}.py").write_text(NET)
    (tmp_path / "numpy.py").write_text("raise ImportError('the numpy.py of the current folder')\n")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    body, fc = torch.nn.Linear(6, 8), torch.nn.Linear(8, 3)
    state = {f"body.0.{key}": value for key, value in body.state_dict().items()}
    state |= {f"fc.{key}": value for key, value in fc.state_dict().items()}
    torch.save(state, tmp_path / "model.pt")
    rng = np.random.default_rng(0)
    for split, rows in (("train", 90), ("val", 60)):
        np.save(tmp_path / f"{split}_inputs.npy", rng.standard_normal((rows, 6)).astype(np.float32))
        np.save(tmp_path / f"{split}_targets.npy", rng.integers(0, 3, rows))
    (tmp_path / "module_name").write_text(name)
    return tmp_path


def features(folder: Path, split: str, out: str, *extra: object, factory: str = "Net"):
    name = (folder / "module_name").read_text()
    args = ["features", "model.pt", "--model", f"python:{name}:{factory}", "--data", f"{split}_inputs.npy"]
    return run(*args, "--labels", f"{split}_targets.npy", "--out", out, *extra, env={"COLUMNS": "80"})


def test_version() -> None:
    for option in ("--version", "-V"):
        result = run(option)
        assert result.exit_code == 0 and result.stdout == f"lip {__version__}\n"


def test_every_json_document_carries_the_version(tmp_path: Path, head) -> None:
    paths = save_problem(tmp_path, head)
    for args in (["inspect", paths["model"]], ["repair", paths["model"], "-f", paths["features"], "--k", 2]):
        document = json.loads(run(*args, "--json", "--dry-run" if args[0] == "repair" else "--top=3").stdout)
        assert next(iter(document.items())) == ("lip_version", __version__)


def test_own_model_in_the_current_folder_caches_side_by_side(own_model: Path) -> None:
    """The done-when of #22: a factory needing num_classes, --out in new folders, train and val
    caches side by side with their own labels, and a repair that finds both."""
    first = features(own_model, "train", "caches/new/train.npy")
    assert first.exit_code == 0, first.output
    second = features(own_model, "val", "caches/new/val.npy")
    assert second.exit_code == 0, second.output
    cache = own_model / "caches" / "new"
    assert sorted(os.listdir(cache)) == ["train.labels.npy", "train.npy", "val.labels.npy", "val.npy"]
    for split in ("train", "val"):
        assert np.array_equal(np.load(cache / f"{split}.labels.npy"), np.load(f"{split}_targets.npy"))
    lines = first.stdout.splitlines()
    assert (
        lines[-2] == "next: lip repair model.pt --features caches/new/train.npy --val-features VAL --k auto"
    )
    assert lines[-1] == "      VAL: a cache of clean validation data (else leave --val-features out)"
    whole = (
        "next: lip repair model.pt --features caches/new/train.npy --val-features caches/new/val.npy --k auto"
    )
    assert second.stdout.splitlines()[-1] == whole and "as TRAIN" not in second.stdout + first.stdout
    repaired = run(
        "repair",
        "model.pt",
        "-f",
        "caches/new/train.npy",
        "--val-features",
        "caches/new/val.npy",
        "--k",
        1,
        "--dry-run",
        "--json",
        "--force-write",
    )  # fmt: skip (a drop is refused)
    assert repaired.exit_code == 0, repaired.output
    document = json.loads(repaired.stdout)
    assert document["labels_source"] == "caches/new/train.labels.npy beside the features"
    assert document["val_labels_source"] == "caches/new/val.labels.npy beside the features"


def test_the_current_folder_comes_after_the_installed_packages(own_model: Path) -> None:
    from importlib import import_module

    result = features(own_model, "train", "train.npy")
    assert result.exit_code == 0, result.output
    module = import_module((own_model / "module_name").read_text())
    assert Path(module.NUMPY_FOUND_AT).parent != own_model  # numpy.py there shadowed nothing
    assert str(own_model) not in sys.path  # and the folder left the import path afterwards


def test_python_m_lip_cli_does_not_put_the_current_folder_first(own_model: Path) -> None:
    """`python -m` (and torchrun -m) put the current folder first on the import path; lip takes
    it off, so that the folder's numpy.py does not break the run."""
    name = (own_model / "module_name").read_text()
    command = [sys.executable, "-m", "lip_cli", "features", "model.pt", "--model", f"python:{name}:Net"]
    command += ["--data", "train_inputs.npy", "--labels", "train_targets.npy", "--out", "out/train.npy"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (own_model / "out" / "train.labels.npy").is_file()


def test_model_args_and_num_labels(own_model: Path) -> None:
    state = torch.load("model.pt", weights_only=True)
    state = {key: value for key, value in state.items() if key.startswith("fc.")}
    state |= {
        "body.0.weight": torch.randn(5, 6),
        "body.0.bias": torch.zeros(5),
        "fc.weight": torch.randn(3, 5),
    }
    torch.save(state, "narrow.pt")
    name = (own_model / "module_name").read_text()
    args = ["features", "narrow.pt", "--data", "train_inputs.npy", "--labels", "train_targets.npy"]
    result = run(*args, "--model", f"python:{name}:labelled", "--model-arg", "width=5", "--out", "a.npy")
    assert result.exit_code == 0, result.output
    assert np.load("a.npy").shape == (90, 5)
    result = run(*args, "--model", f"python:{name}:Net", "--model-arg", "depth=3", "--out", "b.npy")
    assert result.exit_code == 1
    assert result.stderr == f"error: --model-arg depth: python:{name}:Net takes no argument 'depth' " \
        "(its arguments: num_classes, width)\n"  # fmt: skip
    result = run(*args, "--model", f"python:{name}:Net", "--model-arg", "width", "--out", "c.npy")
    assert result.exit_code == 2 and "KEY=VALUE" in result.output
    result = run(*args, "--model", "torchvision:resnet18", "--model-arg", "width=5", "--out", "d.npy")
    assert result.stderr == "error: --model-arg width: passes arguments to a python: factory only\n"
    assert not any(Path(name).exists() for name in ("b.npy", "c.npy", "d.npy"))


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("3", 3),
        ("-2", -2),
        ("0.5", 0.5),
        ("1e3", 1000.0),
        ("true", True),
        ("False", False),
        ("abc", "abc"),
        ("", ""),
    ],
)
def test_model_arg_values(text: str, value: object) -> None:
    parsed = models.argument_value(text)
    assert parsed == value and type(parsed) is type(value)


def test_out_folders_are_made_only_for_a_run_that_succeeds(own_model: Path) -> None:
    (own_model / "file").write_text("in the way")
    (own_model / "dangling").symlink_to(own_model / "nowhere")
    before = sorted(os.listdir(own_model))
    result = features(own_model, "train", "file/x/train.npy")
    assert (
        result.exit_code == 1
        and result.stderr == "error: file/x/train.npy: file is a file, not a folder\n"  # named as given
    )
    result = features(own_model, "train", "dangling/x/train.npy")
    assert (
        result.exit_code == 1
        and "dangling/x/train.npy: " in result.stderr
        and "is a dangling link" in result.stderr
    )
    np.save("train_inputs.npy", np.zeros((90, 7), dtype=np.float32))  # the model cannot run on these
    result = features(own_model, "train", "new/deeper/train.npy")
    assert result.exit_code == 1 and "the model cannot run on a batch" in result.stderr
    assert sorted(os.listdir(own_model)) == before and not (own_model / "nowhere").exists()


def test_labels_of_the_cache_are_not_overwritten_without_force(own_model: Path) -> None:
    assert features(own_model, "train", "train.npy").exit_code == 0
    Path("train.npy").unlink()
    result = features(own_model, "val", "train.npy")
    assert (
        result.exit_code == 1
        and result.stderr == "error: train.labels.npy: already exists; pass --force to overwrite it\n"
    )


def test_old_style_labels_only_when_unambiguous(tmp_path: Path, head) -> None:
    paths = save_problem(tmp_path, head)
    paths["labels"].rename(tmp_path / "labels.npy")  # as an older lip wrote it
    assert layout.beside_labels(paths["features"]) == tmp_path / "labels.npy"
    assert input_files([paths["model"]], paths["features"])[-1] == tmp_path / "labels.npy"
    result = run("repair", paths["model"], "-f", paths["features"], "--k", 1, "--dry-run", "--json")
    assert json.loads(result.stdout)["labels_source"] == f"{tmp_path / 'labels.npy'} beside the features"
    np.save(tmp_path / "val.npy", head.features.numpy())  # now labels.npy may be either cache's
    assert layout.beside_labels(paths["features"]) == tmp_path / "features.labels.npy"
    assert input_files([paths["model"]], paths["features"])[-1] == tmp_path / "features.labels.npy"
    result = run("repair", paths["model"], "-f", paths["features"], "--k", 1, "--dry-run")
    assert result.exit_code == 1 and result.stderr == (
        f"error: {paths['features']}: no labels found: pass --labels, or put features.labels.npy beside it "
        f"({tmp_path / 'labels.npy'} there may be the labels of another of the 2 .npy files in {tmp_path}, "
        "e.g. val.npy)\n"
    )


def test_missing_validation_labels_name_val_labels(tmp_path: Path, head) -> None:
    paths = save_problem(tmp_path, head)
    (tmp_path / "v").mkdir()
    np.save(tmp_path / "v" / "val.npy", head.features.numpy())
    val = tmp_path / "v" / "val.npy"
    result = run(
        "repair", paths["model"], "-f", paths["features"], "--val-features", val, "--k", 1, "--dry-run"
    )
    assert result.exit_code == 1 and result.stderr == (
        f"error: {val}: no labels found: pass --val-labels, or put val.labels.npy beside it\n"
    )
    np.save(tmp_path / "v" / "val.labels.npy", head.labels.numpy())
    args = ["repair", paths["model"], "-f", paths["features"], "--val-features", val, "--k", 1]
    result = run(*args, "--dry-run", "--json")
    assert (
        json.loads(result.stdout)["val_labels_source"]
        == f"{tmp_path / 'v' / 'val.labels.npy'} beside the features"
    )


def test_counterpart_caches(tmp_path: Path) -> None:
    for folder in ("train", "val"):
        (tmp_path / folder).mkdir()
        for name in ("features.npy", "features.labels.npy"):
            (tmp_path / folder / name).write_bytes(b"")
    assert layout.counterpart(tmp_path / "val" / "features.npy") == tmp_path / "train" / "features.npy"
    assert layout.counterpart(tmp_path / "train" / "features.npy") == tmp_path / "val" / "features.npy"
    assert layout.is_validation(tmp_path / "x" / "my-valid.npy") and not layout.is_validation(
        tmp_path / "interval.npy"
    )
    assert layout.counterpart(tmp_path / "dev.npy") is None


def fresh_console(monkeypatch) -> None:
    """The next console is made now, under this test's environment: the first one made in a
    process keeps the width that COLUMNS gave it then."""
    monkeypatch.setattr(console, "_consoles", {})


@pytest.mark.parametrize("columns", ["80", "40"])
def test_demo_commands_are_one_line_at_any_width(capsys, monkeypatch, columns: str) -> None:
    monkeypatch.setenv("COLUMNS", columns)
    fresh_console(monkeypatch)
    folder = Path("a-rather-long-folder-name/for-the-demo")
    render_demo(DemoResult(folder, DemoSettings(), 0.9, 0.8))
    lines = capsys.readouterr().out.splitlines()
    repair = f"  lip repair {folder}/model.pt --features {folder}/train/features.npy --val-features " \
        f"{folder}/val/features.npy --k auto"  # fmt: skip
    assert lines[-1] == repair and lines[-4] == "next:"
    assert lines[-3].startswith("  lip features ") and lines[-3].endswith(
        f"--out {folder}/train/features.npy"
    )


def test_warnings_wrap_at_words_on_a_terminal_and_stay_whole_otherwise(capsys, monkeypatch) -> None:
    message = "k was chosen and confirmed on held-out training rows, whose labels are noisy"
    monkeypatch.setenv("COLUMNS", "40")
    fresh_console(monkeypatch)
    console.warning(message)
    assert capsys.readouterr().err == f"warning: {message}\n"
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("NO_COLOR", "1")
    console.warning(message)
    lines = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().err).splitlines()
    assert " ".join(line.strip() for line in lines) == f"warning: {message}"
    assert len(lines) > 1 and all(len(line) <= 40 for line in lines)
    assert all(word in f"warning: {message}".split() for line in lines for word in line.split())


def test_piped_output_has_no_trailing_spaces(tmp_path: Path, head, monkeypatch) -> None:
    fresh_console(monkeypatch)
    paths = save_problem(tmp_path, make_head(n=120, q=6, l=3, seed=2))
    for args in (
        ["inspect", paths["model"]],
        ["repair", paths["model"], "-f", paths["features"], "--k", 1, "--dry-run"],
    ):
        result = run(*args, env={"COLUMNS": "100"})
        assert result.exit_code == 0 and "│" in result.stdout + "─"
        assert [line for line in result.stdout.splitlines() if line != line.rstrip()] == []


def test_beside_labels_names(tmp_path: Path) -> None:
    assert layout.labels_file(Path("feats/train.npy")) == Path("feats/train.labels.npy")
    with pytest.raises(LipError, match="pass --val-labels"):
        raise layout.missing_labels(tmp_path / "val.npy", "--val-labels")
