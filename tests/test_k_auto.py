"""`lip repair --k auto`: k chosen on validation or held-out data, never silently worse."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Head, make_head, save_problem
from reference import logit_scale_lip
from typer.testing import CliRunner

from lip_cli import lip, selection
from lip_cli.cli import app
from lip_cli.labelled import open_labelled_features
from lip_cli.lip import LapStatistics
from lip_cli.statistics_pass import statistics_pass

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


def test_auto_on_validation_chooses_on_one_part_and_confirms_on_the_other(tmp_path: Path) -> None:
    head = make_head(n=400, q=16, l=8, seed=21)  # a random, untrained head: the paper's LAP helps a lot
    paths = save_problem(tmp_path, head)
    val = write_val(tmp_path, head)
    args = ["repair", paths["model"], "-f", paths["features"], "--val-features", val, "--k", "auto"]
    result = run(*args, "--targets", "paper", "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    curve, test = document["k_curve"], document["test"]
    assert [point["k"] for point in curve] == list(range(9))
    assert document["k_selection"] == "val" and test["data"] == "val"
    assert test["selection_rows"] == test["confirmation_rows"] == 100  # 200 validation rows, half each
    assert test["best_k"] == chosen_by_rule(curve, "val_accuracy") < 8  # chosen on the selection part
    assert test["confirmed"] and test["p_value"] <= test["alpha"] == 0.05
    assert document["k_chosen"] == test["best_k"]
    assert document["accuracy"]["val_after"] > document["accuracy"]["val_before"]
    low, high = test["ci_accuracy_change"]
    assert 0 < low <= test["accuracy_change"] <= high and test["ci_level"] == pytest.approx(0.9)
    assert document["decision"] == (
        f"k = {test['best_k']}: {100 * test['accuracy_change']:+.1f} pt on 100 confirmation rows "
        f"(90% CI {100 * low:+.1f} to {100 * high:+.1f} pt), p = {test['p_value']:.2g}, repaired"
    )
    assert document["checked"] is True
    # the discordant counts, recomputed in float64 from the written weight on the confirmation rows
    written = torch.load(document["output"], weights_only=True)["fc.weight"].double()
    data = np.load(val)
    confirm = selection.split_rows(torch.ones(200, dtype=torch.bool), 0).numpy()
    x, y, bias = data["features"][confirm], data["labels"][confirm], head.bias.float().double().numpy()
    before = (x @ head.weight.float().double().numpy().T + bias).argmax(1) == y
    after = (x @ written.numpy().T + bias).argmax(1) == y
    assert (test["discordant_gains"], test["discordant_losses"]) == (
        int((after & ~before).sum()),
        int((before & ~after).sum()),
    )
    explicit = run(
        *[
            "repair",
            paths["model"],
            "-f",
            paths["features"],
            "--k",
            document["k_chosen"],
            "--targets",
            "paper",
        ],
        *["--dry-run", "--json"],
    )
    assert json.loads(explicit.stdout)["singular_values_after"] == document["singular_values_after"]
    human = run(*args, "--targets", "paper", "--dry-run")
    text = " ".join(human.stdout.split())
    assert "decision: " + document["decision"] in text and "exact one-sided McNemar" in text


def test_auto_without_validation_holds_out_training_samples(tmp_path: Path) -> None:
    head = make_head(n=600, q=16, l=8, seed=22)
    paths = save_problem(tmp_path, head)
    args = ["repair", paths["model"], "-f", paths["features"], "--k", "auto", "--dry-run", "--json"]
    first, second = run(*args), run(*args)
    assert first.exit_code == 3, first.output  # rows the network trained on confirm nothing
    document = json.loads(first.stdout)
    assert document == json.loads(second.stdout)  # seeded
    assert document["k_selection"] == "holdout" and document["test"]["data"] == "holdout"
    assert {"holdout_before", "holdout_after", "train_before", "train_after"} <= set(document["accuracy"])
    assert document["test"]["best_k"] == chosen_by_rule(document["k_curve"], "val_accuracy")
    held = int((torch.rand(600, generator=torch.Generator().manual_seed(0)) < 0.1).sum())
    assert document["test"]["confirmation_rows"] == held // 2
    assert document["test"]["selection_rows"] == held - held // 2
    assert document["test"]["best_k"] < document["rank"] == document["k_chosen"]  # would try, not applied
    assert document["outcome"] == "unconfirmed" and document["exit_code"] == 3 and document["output"] is None
    (warning,) = [w for w in document["warnings"] if w.startswith("--k auto without --val-features")]
    assert f"k = {document['test']['best_k']} would be tried" in warning and "cannot confirm" in warning
    assert "pass --val-features" in warning and "their labels may be noisy" in warning
    human = " ".join(run(*args[:-1]).output.split())
    assert "confirmed on held-out" not in human and "p-value" not in human
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
    assert result.exit_code == 3, result.output  # nothing confirmed, nothing written
    document = json.loads(result.stdout)
    assert document["k_chosen"] == document["rank"] == 5
    assert document["output"] is None and not (tmp_path / "model.lip.pt").exists()
    assert "no k beats the unrepaired layer" in result.output
    forced = run(*args, "--force-write", "--json")
    assert forced.exit_code == 0, forced.output  # --force-write wrote what it was asked to
    assert json.loads(forced.stdout)["forced"] and json.loads(forced.stdout)["outcome"] == "unconfirmed"
    original = torch.load(paths["model"], weights_only=True)
    copy = torch.load(tmp_path / "model.lip.pt", weights_only=True)
    assert all(torch.equal(copy[key], original[key]) for key in original)


def test_explicit_k_that_validation_shows_worse_is_refused(tmp_path: Path) -> None:
    head = make_head(n=300, q=10, l=5, seed=24)
    optimum = least_squares_head(head)
    # a trained-like head: the least-squares optimum scaled up, as cross-entropy training does
    head = Head(8 * optimum[:, :-1].contiguous(), 8 * optimum[:, -1].contiguous(), head.features, head.labels)
    paths = save_problem(tmp_path, head)
    np.savez(tmp_path / "val.npz", features=head.features.numpy(), labels=head.labels.numpy())
    result = run(
        *[
            "repair",
            paths["model"],
            "-f",
            paths["features"],
            "--val-features",
            tmp_path / "val.npz",
            "--k",
            1,
        ],
        *["--targets", "paper"],
    )
    assert result.exit_code == 4, result.output  # lower (here significantly): not written
    assert not (tmp_path / "model.lip.pt").exists()
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
            "--targets",
            "paper",
            "--dry-run",
            "--json",
        ).stdout
    )
    assert document["accuracy"]["val_after"] < document["accuracy"]["val_before"]
    test = document["test"]
    assert test["given_k"] and test["selection_rows"] == 0 and test["confirmation_rows"] == 300
    assert test["confirmed"] is None and document["k_chosen"] == 1
    assert test["accuracy_change"] == pytest.approx(
        document["accuracy"]["val_after"] - document["accuracy"]["val_before"]
    )
    gains, losses = test["discordant_gains"], test["discordant_losses"]
    n = gains + losses
    assert test["p_value_drop"] == pytest.approx(sum(math.comb(n, i) for i in range(losses, n + 1)) / 2**n)
    assert test["p_value_drop"] <= 0.05
    assert document["outcome"] == "refused" and document["exit_code"] == 4 and document["output"] is None
    warning = " ".join(result.stderr.split())
    assert "LOWERS validation accuracy" in warning and "significantly (p = " in warning
    assert "one-sided 95% upper bound" in warning and "significant gain" not in warning
    assert "on 300 rows" in warning and "not written (--force-write writes it" in warning
    forced = run(*result_args(paths, tmp_path), "--k", 1, "--targets", "paper", "--force-write")
    assert forced.exit_code == 0 and "written anyway (--force-write)" in " ".join(forced.stderr.split())
    written = torch.load(tmp_path / "model.lip.pt", weights_only=True)["fc.weight"]
    assert json.loads((tmp_path / "model.lip.pt.lip.json").read_text())["outcome"] == "refused"
    assert not torch.equal(written, torch.load(paths["model"], weights_only=True)["fc.weight"])
    assert document["decision"].startswith("k = 1: -") and "validation rows" in document["decision"]
    assert (
        "LOWERS" not in run("repair", paths["model"], "-f", paths["features"], "--k", 5, "--dry-run").stderr
    )


def result_args(paths: dict[str, Path], folder: Path) -> list[object]:
    return ["repair", paths["model"], "-f", paths["features"], "--val-features", folder / "val.npz"]


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
    assert result.exit_code == 3, result.output  # no validation rows: nothing confirmed
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
    assert "random sample of 120 of 500 rows" in " ".join(human.stdout.split())


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


def test_logit_scale_warns_when_the_head_points_away_from_the_labels(tmp_path: Path) -> None:
    head = make_head(n=300, q=12, l=6, seed=27)
    fitted = least_squares_head(head)
    warned = []
    for sign in (1, -1):  # the least-squares head, and the same head pointing away from the labels
        solution = sign * fitted
        turned = Head(solution[:, :-1].contiguous(), solution[:, -1].contiguous(), head.features, head.labels)
        folder = tmp_path / str(sign)
        folder.mkdir()
        paths = save_problem(folder, turned)
        args = ["repair", paths["model"], "-f", paths["features"], "--k", 2, "--targets", "logit-scale"]
        document = json.loads(run(*args, "--dry-run", "--json").stdout)
        assert (document["target_scale"] > 0) == (sign > 0)
        warned.append(any("do not rise with the labels" in warning for warning in document["warnings"]))
    assert warned == [False, True]


@pytest.mark.parametrize("value", ["0", "1", "-0.5", "1.5", "abc"])
def test_alpha_outside_zero_one_is_a_usage_error(tmp_path: Path, head, value: str) -> None:
    paths = save_problem(tmp_path, head)
    result = run("repair", paths["model"], "-f", paths["features"], "--k", "auto", "--alpha", value)
    assert result.exit_code == 2 and "--alpha" in result.stderr
    assert not (tmp_path / "model.lip.pt").exists()


def test_alpha_sets_the_level_and_the_minimum(tmp_path: Path) -> None:
    head = make_head(n=300, q=10, l=5, seed=27)
    paths = save_problem(tmp_path, head)
    small = make_head(n=12, q=10, l=5, seed=28)
    np.savez(tmp_path / "small.npz", features=small.features.numpy(), labels=small.labels.numpy())
    base = ["repair", paths["model"], "-f", paths["features"], "--val-features", tmp_path / "small.npz"]
    accepted = run(*base, "--k", "auto", "--dry-run", "--json")
    assert accepted.exit_code == json.loads(accepted.stdout)["exit_code"] in (0, 3), accepted.output
    assert json.loads(accepted.stdout)["test"]["alpha"] == 0.05
    refused = run(*base, "--k", "auto", "--alpha", "0.01")
    assert refused.exit_code == 1
    assert len(refused.stderr.strip().splitlines()) == 1
    assert "12 validation rows are too few" in refused.stderr
    assert "needs at least 14 at --alpha 0.01" in " ".join(refused.stderr.split())


def test_a_validation_set_too_small_to_split(tmp_path: Path, head) -> None:
    paths = save_problem(tmp_path, head)
    tiny = make_head(n=6, q=head.weight.shape[1], l=5, seed=29)
    np.savez(tmp_path / "tiny.npz", features=tiny.features.numpy(), labels=tiny.labels.numpy())
    args = ["repair", paths["model"], "-f", paths["features"], "--val-features", tmp_path / "tiny.npz"]
    result = run(*args, "--k", "auto")
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "6 validation rows are too few" in result.stderr and "at least 10" in result.stderr
    assert not (tmp_path / "model.lip.pt").exists()
    given = run(*args, "--k", "2", "--dry-run")  # a given k needs no split: checked on all 6 rows
    assert given.exit_code in (0, 4) and "too few" not in given.stderr


def test_a_holdout_too_small_to_split(tmp_path: Path) -> None:
    head = make_head(n=60, q=8, l=4, seed=30)
    paths = save_problem(tmp_path, head)
    result = run("repair", paths["model"], "-f", paths["features"], "--k", "auto")
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "held-out rows are too few" in result.stderr and "at least 10" in result.stderr
    assert (
        run("repair", paths["model"], "-f", paths["features"], "--k", "auto", "--holdout", "0.5").exit_code
        == 3
    )


def test_a_best_k_that_is_not_confirmed_writes_nothing(tmp_path: Path) -> None:
    head = make_head(n=300, q=10, l=5, seed=31)
    paths = save_problem(tmp_path, head)
    generator = torch.Generator().manual_seed(32)
    features = torch.randn(200, 10, generator=generator)
    labels = torch.randint(5, (200,), generator=generator)  # independent of the features: no k can help
    np.savez(tmp_path / "val.npz", features=features.numpy(), labels=labels.numpy())
    args = ["repair", paths["model"], "-f", paths["features"], "--val-features", tmp_path / "val.npz"]
    result = run(*args, "--k", "auto", "--targets", "paper", "--json")
    assert result.exit_code == 3, result.output
    document = json.loads(result.stdout)
    test = document["test"]
    assert test["best_k"] < document["rank"] and not test["confirmed"] and test["p_value"] > 0.05
    assert document["k_chosen"] == document["rank"] and document["output"] is None
    assert (
        document["decision"].startswith(f"best k = {test['best_k']} (")
        and "not confirmed" in document["decision"]
    )
    warning = " ".join(result.stderr.split())
    assert "nothing written (--force-write writes a copy)" in warning
    # the follow-up trap: re-running that k on these rows is not evidence, and what would settle it
    assert f"these rows chose k = {test['best_k']}, so --k {test['best_k']} on them is no evidence" in warning
    assert "--k auto on more validation rows can settle it" in warning
    assert not (tmp_path / "model.lip.pt").exists()


def test_one_rule_by_default_with_k_auto_and_with_a_given_k(tmp_path: Path) -> None:
    head = make_head(n=400, q=16, l=8, seed=21)
    paths = save_problem(tmp_path, head)
    val = write_val(tmp_path, head)
    args = ["repair", paths["model"], "-f", paths["features"], "--val-features", val, "--dry-run", "--json"]
    auto = json.loads(run(*args, "--k", "auto").stdout)
    assert auto["targets"] == auto["test"]["targets"] == lip.DEFAULT_TARGETS
    assert (
        auto["k_curve"] == json.loads(run(*args, "--k", "auto", "--targets", "logit-scale").stdout)["k_curve"]
    )
    given = json.loads(run(*args, "--k", 3).stdout)
    ruled = json.loads(run(*args, "--k", 3, "--targets", lip.DEFAULT_TARGETS).stdout)
    paper = json.loads(run(*args, "--k", 3, "--targets", "paper").stdout)
    assert (
        given["targets"] == lip.DEFAULT_TARGETS
        and given["singular_values_after"] == ruled["singular_values_after"]
    )
    assert paper["targets"] == "paper" and paper["singular_values_after"] != given["singular_values_after"]


def test_targets_auto_is_chosen_with_k(tmp_path: Path) -> None:
    head = make_head(n=400, q=16, l=8, seed=21)
    paths = save_problem(tmp_path, head)
    val = write_val(tmp_path, head)
    args = ["repair", paths["model"], "-f", paths["features"], "--val-features", val, "--dry-run"]
    result = run(*args, "--k", "auto", "--targets", "auto", "--json")
    assert result.exit_code == json.loads(result.stdout)["exit_code"] in (0, 3), result.output
    document = json.loads(result.stdout)
    assert document["test"]["targets_chosen"] and document["targets"] in ("paper", "logit-scale")
    assert document["targets"] == document["test"]["targets"]
    alone = json.loads(run(*args, "--k", "auto", "--targets", document["targets"], "--json").stdout)
    assert alone["test"]["best_k"] == document["test"]["best_k"] and alone["k_curve"] == document["k_curve"]
    given = run(*args, "--k", 3, "--targets", "auto")
    assert given.exit_code == 1 and "--targets auto" in given.stderr and "--k auto" in given.stderr


def test_a_sample_too_small_for_the_holdout_names_sample_rows(tmp_path: Path) -> None:
    """The held-out rows are sampled too: when --sample-rows, not --holdout, keeps too few of them,
    the error names --sample-rows (a larger --holdout would not help)."""
    head = make_head(n=600, q=8, l=4, seed=31)
    paths = save_problem(tmp_path, head)
    result = run("repair", paths["model"], "-f", paths["features"], "--k", "auto", "--sample-rows", 4)
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert "--sample-rows 4" in result.stderr and "at least 10" in result.stderr
    assert "larger --holdout" not in result.stderr


def row_positions(rows: torch.Tensor, every: torch.Tensor) -> list[int]:
    """Where each of `rows` lies among the rows of `every` (all distinct)."""
    return [int(torch.cdist(row[None], every).argmin()) for row in rows]


@pytest.mark.parametrize("first_component", [0, 2])
def test_one_pass_keeps_the_chosen_rows_in_order_and_fits_without_the_held_ones(
    tmp_path: Path, first_component: int
) -> None:
    head = make_head(n=300, q=10, l=6, seed=31)
    paths = save_problem(tmp_path, head)
    data = open_labelled_features(paths["features"], None)
    exact = {"compute_dtype": torch.float64, "first_component": first_component}
    stats = LapStatistics(head.weight, head.bias, **exact)
    holdout = 0.3 if first_component == 0 else 0.0
    fitted = statistics_pass(data, stats, chunk_rows=37, holdout=holdout, seed=4, sample_rows=50)
    features = head.features.to(torch.float32).double()  # as saved
    every = stats.full_projection(features)
    ((z, y),) = fitted.sample
    sampled = row_positions(z, every)
    assert len(sampled) == 50 and sampled == sorted(set(sampled))
    assert torch.equal(y, head.labels[sampled]) and torch.allclose(z, every[sampled])
    whole = LapStatistics(head.weight, head.bias, **exact)
    whole.update(features, head.labels)
    held = torch.rand(300, generator=torch.Generator().manual_seed(4)) < holdout
    rest = LapStatistics(head.weight, head.bias, **exact)
    rest.update(features[~held], head.labels[~held])
    for name in whole.sums:
        torch.testing.assert_close(fitted.stats.sums[name], whole.sums[name], msg=name)
        torch.testing.assert_close(fitted.fit_stats.sums[name], rest.sums[name], msg=name)
    assert fitted.fit_stats.samples == int((~held).sum())
    if holdout:
        parts = [
            row_positions(part[0][0], every) for part in (fitted.held_selection, fitted.held_confirmation)
        ]
        assert all(part == sorted(part) for part in parts) and not set(parts[0]) & set(parts[1])
        kept = set(parts[0]) | set(parts[1])  # the held-out rows' own sample
        assert kept <= set(held.nonzero().squeeze(1).tolist()) and len(kept) == min(50, int(held.sum()))
        assert len(parts[1]) == len(kept) // 2


def test_the_held_out_fit_in_float32_leaves_alone_directions_only_held_rows_excite(tmp_path: Path) -> None:
    """The fit that chooses k must be the fit of the rows not held out, also in float32: a direction
    those rows never excite keeps its value (LAP has no fit for it), however much the held rows
    excite it. Sums of all rows minus the held ones leave float32 rounding of the held rows there,
    which passes for an excited direction with a made-up value."""
    head = make_head(n=2000, q=16, l=10, seed=5)
    held = torch.rand(2000, generator=torch.Generator().manual_seed(2)) < 0.1  # as statistics_pass draws
    u = LapStatistics(head.weight, head.bias).svd.u
    generator = torch.Generator().manual_seed(7)
    features = torch.randn(2000, 16, generator=generator, dtype=torch.float64)
    # rows not held out lie in the span of the top 6 directions; held rows excite every direction
    features[~held] = (
        torch.randn(int((~held).sum()), 6, generator=generator, dtype=torch.float64) @ u[:, :6].T
    )
    head = Head(head.weight, head.bias, features.float().double(), head.labels)
    paths = save_problem(tmp_path, head)
    data = open_labelled_features(paths["features"], None)
    stats = LapStatistics(head.weight, head.bias)  # float32, the default
    fitted = statistics_pass(data, stats, chunk_rows=256, holdout=0.1, seed=2)
    rest = LapStatistics(head.weight, head.bias)
    for start in range(0, 2000, 256):
        rows = slice(start, start + 256)
        keep = ~held[rows]
        rest.update(head.features[rows][keep], head.labels[rows][keep])
    assert fitted.fit_stats.samples == rest.samples
    sigma, excited = fitted.fit_stats.fitted_singular_values()
    expected, expected_excited = rest.fitted_singular_values()
    assert not expected_excited[6:].any()
    assert torch.equal(excited, expected_excited)
    torch.testing.assert_close(sigma, expected, rtol=1e-4, atol=1e-6)


def test_provenance_records_what_judged_k(tmp_path: Path) -> None:
    """The sidecar names the validation files with their sha256, the seed, alpha, the split's sizes,
    the test's counts and p; `lip inspect` shows them."""
    import hashlib

    head = make_head(n=400, q=16, l=8, seed=21)
    paths = save_problem(tmp_path, head)
    val = write_val(tmp_path, head)
    args = ["repair", paths["model"], "-f", paths["features"], "--val-features", val, "--k", "auto"]
    document = json.loads(run(*args, "--targets", "paper", "--seed", "2", "--alpha", "0.04", "--json").stdout)
    assert document["outcome"] == "repaired", document["decision"]
    record = json.loads((tmp_path / "model.lip.pt.lip.json").read_text())
    test = document["test"]
    assert record["val_features"] == str(val) and record["val_labels"] == document["val_labels_source"]
    assert record["val_features_sha256"] == hashlib.sha256(val.read_bytes()).hexdigest()
    assert record["val_labels_sha256"] is None  # the labels are inside the features file
    assert (record["seed"], record["alpha"], record["outcome"], record["checked"]) == (
        2,
        0.04,
        "repaired",
        True,
    )
    assert (record["selection_rows"], record["confirmation_rows"]) == (100, 100)
    assert record["p_value"] == test["p_value"] and record["p_value_drop"] == test["p_value_drop"]
    assert (record["discordant_gains"], record["discordant_losses"]) == (
        test["discordant_gains"],
        test["discordant_losses"],
    )
    assert record["ci_accuracy_change"] == test["ci_accuracy_change"] and record["targets"] == "paper"
    shown = " ".join(run("inspect", tmp_path / "model.lip.pt").stdout.split())
    assert f"validation {val} (sha256 {record['val_features_sha256'][:12]}" in shown
    assert "100 selection / 100 test rows" in shown and "seed 2, alpha 0.04" in shown
    # a given k with its labels apart, and one that nothing checked
    np.save(tmp_path / "vx.npy", np.load(val)["features"])
    np.save(tmp_path / "vy.npy", np.load(val)["labels"])
    given = ["repair", paths["model"], "-f", paths["features"], "--k", "0", "--targets", "paper", "--force"]
    assert (
        run(*given, "--val-features", tmp_path / "vx.npy", "--val-labels", tmp_path / "vy.npy").exit_code == 0
    )
    record = json.loads((tmp_path / "model.lip.pt.lip.json").read_text())
    assert record["val_labels_sha256"] == hashlib.sha256((tmp_path / "vy.npy").read_bytes()).hexdigest()
    assert (
        record["outcome"] == "given" and record["selection_rows"] == 0 and record["confirmation_rows"] == 200
    )
    assert run(*given).exit_code == 0
    record = json.loads((tmp_path / "model.lip.pt.lip.json").read_text())
    assert record["outcome"] == "unchecked" and record["checked"] is False and record["val_features"] is None
    assert "not checked by any validation rows" in " ".join(
        run("inspect", tmp_path / "model.lip.pt").stdout.split()
    )
