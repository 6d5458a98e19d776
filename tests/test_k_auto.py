"""`lip repair --k auto`: k chosen on validation or held-out data, never silently worse."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Head, make_head, save_problem
from reference import logit_scale_lip
from typer.testing import CliRunner

from lip_cli.cli import app

runner = CliRunner(env={"COLUMNS": "200"})


def run(*args: object):
    return runner.invoke(app, [str(arg) for arg in args])


def write_val(folder: Path, head: Head, seed: int = 99) -> Path:
    val = make_head(n=200, q=head.weight.shape[1], l=head.weight.shape[0], seed=seed)
    np.savez(folder / "val.npz", features=val.features.numpy(), labels=val.labels.numpy())
    return folder / "val.npz"


def chosen_by_rule(curve: list[dict], column: str) -> int:
    best = max(point[column] for point in curve)
    return max(point["k"] for point in curve if point[column] == best)


def test_auto_on_validation_picks_the_best_k_and_writes_it(tmp_path: Path) -> None:
    head = make_head(n=400, q=16, l=8, seed=21)  # a random, untrained head: LAP helps a lot
    paths = save_problem(tmp_path, head)
    val = write_val(tmp_path, head)
    result = run(
        "repair", paths["model"], "-f", paths["features"], "--val-features", val, "--k", "auto", "--json"
    )
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    curve = document["k_curve"]
    assert [point["k"] for point in curve] == list(range(9))
    assert document["k_selection"] == "val"
    assert document["k_chosen"] == chosen_by_rule(curve, "val_accuracy") < 8
    assert document["accuracy"]["val_after"] > document["accuracy"]["val_before"]
    assert document["accuracy"]["val_after"] == curve[document["k_chosen"]]["val_accuracy"]
    written = torch.load(document["output"], weights_only=True)["fc.weight"]
    explicit = run(
        "repair", paths["model"], "-f", paths["features"], "--k", document["k_chosen"], "--dry-run", "--json"
    )
    assert json.loads(explicit.stdout)["singular_values_after"] == document["singular_values_after"]
    assert written.shape == (8, 16)


def test_auto_without_validation_holds_out_training_samples(tmp_path: Path) -> None:
    head = make_head(n=600, q=16, l=8, seed=22)
    paths = save_problem(tmp_path, head)
    args = ["repair", paths["model"], "-f", paths["features"], "--k", "auto", "--dry-run", "--json"]
    first, second = run(*args), run(*args)
    assert first.exit_code == 0, first.output
    document = json.loads(first.stdout)
    assert document == json.loads(second.stdout)  # seeded
    assert document["k_selection"] == "holdout"
    assert {"holdout_before", "holdout_after", "train_before", "train_after"} <= set(document["accuracy"])
    assert document["k_chosen"] == chosen_by_rule(document["k_curve"], "val_accuracy")
    other_seed = json.loads(run(*args, "--seed", "5").stdout)
    assert other_seed["k_curve"] != document["k_curve"]


def least_squares_head(head: Head) -> torch.Tensor:
    """The head that minimises the squared error to one-hot targets: LAP cannot change it."""
    x = torch.cat([head.features, torch.ones(head.features.shape[0], 1, dtype=torch.float64)], dim=1)
    y = torch.nn.functional.one_hot(head.labels, head.weight.shape[0]).double()
    solution = torch.linalg.lstsq(x, y).solution  # (q + 1, l)
    return solution.T  # (l, q + 1): weight and bias


def test_auto_leaves_the_layer_alone_when_no_k_helps(tmp_path: Path) -> None:
    head = make_head(n=300, q=10, l=5, seed=23)
    optimum = least_squares_head(head)
    head = Head(optimum[:, :-1].contiguous(), optimum[:, -1].contiguous(), head.features, head.labels)
    paths = save_problem(tmp_path, head)
    np.savez(tmp_path / "val.npz", features=head.features.numpy(), labels=head.labels.numpy())
    args = [
        "repair",
        paths["model"],
        "-f",
        paths["features"],
        "--val-features",
        tmp_path / "val.npz",
        "--k",
        "auto",
    ]
    result = run(*args, "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["k_chosen"] == document["rank"] == 5
    assert document["output"] is None and not (tmp_path / "model.lip.pt").exists()
    assert "no k beats the unrepaired layer" in result.stderr
    forced = run(*args, "--force-write", "--json")
    assert forced.exit_code == 0, forced.output
    original = torch.load(paths["model"], weights_only=True)
    copy = torch.load(tmp_path / "model.lip.pt", weights_only=True)
    assert all(torch.equal(copy[key], original[key]) for key in original)


def test_explicit_k_that_lowers_validation_accuracy_warns(tmp_path: Path) -> None:
    head = make_head(n=300, q=10, l=5, seed=24)
    optimum = least_squares_head(head)
    # a trained-like head: the least-squares optimum scaled up, as cross-entropy training does
    head = Head(8 * optimum[:, :-1].contiguous(), 8 * optimum[:, -1].contiguous(), head.features, head.labels)
    paths = save_problem(tmp_path, head)
    np.savez(tmp_path / "val.npz", features=head.features.numpy(), labels=head.labels.numpy())
    result = run(
        "repair", paths["model"], "-f", paths["features"], "--val-features", tmp_path / "val.npz", "--k", 1
    )
    assert result.exit_code == 0, result.output
    document = json.loads(
        run(
            "repair",
            paths["model"],
            "-f",
            paths["features"],
            "--val-features",
            tmp_path / "val.npz",
            "--k",
            1,
            "--dry-run",
            "--json",
        ).stdout
    )
    assert document["accuracy"]["val_after"] < document["accuracy"]["val_before"]
    assert "LOWERS validation accuracy" in result.stderr
    assert (
        "LOWERS" not in run("repair", paths["model"], "-f", paths["features"], "--k", 5, "--dry-run").stderr
    )


@pytest.mark.parametrize("value", ["foo", "-1", "1.5"])
def test_k_must_be_a_number_or_auto(tmp_path: Path, value: str) -> None:
    result = run("repair", tmp_path / "m.pt", "-f", tmp_path / "f.npy", "--k", value)
    assert result.exit_code == 2


def test_bad_holdout(tmp_path: Path, head) -> None:
    paths = save_problem(tmp_path, head)
    result = run("repair", paths["model"], "-f", paths["features"], "--k", "auto", "--holdout", "1.5")
    assert result.exit_code == 1 and "--holdout 1.5" in result.stderr


def test_repair_plot_of_the_k_curve(tmp_path: Path, head) -> None:
    image = pytest.importorskip("matplotlib.image")
    paths = save_problem(tmp_path, head)
    result = run(
        "repair", paths["model"], "-f", paths["features"], "--k", "auto", "--plot", tmp_path / "k.png"
    )
    assert result.exit_code == 0, result.output
    assert image.imread(tmp_path / "k.png").ndim == 3


def test_accuracies_on_a_sample_of_rows(tmp_path: Path) -> None:
    head = make_head(n=500, q=16, l=8, seed=25)
    paths = save_problem(tmp_path, head)
    human_args = [
        "repair",
        paths["model"],
        "-f",
        paths["features"],
        "--k",
        3,
        "--dry-run",
        "--chunk-rows",
        64,
    ]
    base = [*human_args, "--json"]
    full = json.loads(run(*base).stdout)
    assert full["accuracy_rows"] == 500
    sampled = json.loads(run(*base, "--sample-rows", 120).stdout)
    assert sampled["accuracy_rows"] == 120
    assert sampled["singular_values_after"] == full["singular_values_after"]  # the fit uses every row
    assert sampled == json.loads(run(*base, "--sample-rows", 120).stdout)  # seeded
    assert round(sampled["accuracy"]["train_before"] * 120) == pytest.approx(
        sampled["accuracy"]["train_before"] * 120
    )
    assert sampled["accuracy"] != full["accuracy"]
    human = run(*human_args, "--sample-rows", 120)
    assert "random sample of 120 of 500 rows" in " ".join(human.stderr.split())


def test_logit_scale_targets_from_the_command(tmp_path: Path) -> None:
    head = make_head(n=300, q=12, l=6, seed=26)
    paths = save_problem(tmp_path, head)
    result = run(
        "repair", paths["model"], "-f", paths["features"], "--k", 2, "--targets", "logit-scale", "--json"
    )
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    features = head.features.numpy().astype(np.float32)
    weight, bias = head.weight.numpy().astype(np.float32), head.bias.numpy().astype(np.float32)
    logits = features.astype(np.float64) @ weight.T + bias
    centred = np.eye(6)[head.labels.numpy()] - 1 / 6
    scale = ((logits - logits.mean(1, keepdims=True)) * centred).sum() / (centred**2).sum()
    assert document["targets"] == "logit-scale"
    assert document["target_scale"] == pytest.approx(scale, rel=1e-6)
    expected = logit_scale_lip(weight, bias, features, head.labels.numpy(), 2)
    written = torch.load(document["output"], weights_only=True)["fc.weight"].double().numpy()
    assert np.linalg.norm(written - expected) / np.linalg.norm(expected) < 1e-6
    assert (
        run("repair", paths["model"], "-f", paths["features"], "--k", 2, "--targets", "other").exit_code == 2
    )
