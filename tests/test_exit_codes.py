"""Exit codes a pipeline can branch on, and one JSON document on stdout for every outcome under --json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from conftest import Head, make_head, save_problem
from hypothesis import given, settings
from hypothesis import strategies as st
from test_k_auto import least_squares_head, write_val
from typer.testing import CliRunner

from lip_cli import __version__, demo, errors, selection
from lip_cli.cli import app
from lip_cli.errors import LipError, Terminated
from lip_cli.jobs import compare as compare_job
from lip_cli.jobs import features as features_job
from lip_cli.jobs import inspect as inspect_job
from lip_cli.jobs import repair as repair_job
from lip_cli.render import console

runner = CliRunner(env={"COLUMNS": "200"})
ROOT = Path(__file__).resolve().parents[1]


def run(*args: object):
    return runner.invoke(app, [str(arg) for arg in args])


def weight(path: Path) -> torch.Tensor:
    return torch.load(path, weights_only=True)["fc.weight"]


def helped(folder: Path) -> dict[str, Path]:
    """A random, untrained head that LAP improves a lot, with a validation set that confirms it."""
    head = make_head(n=400, q=16, l=8, seed=21)
    paths = save_problem(folder, head)
    return paths | {"val": write_val(folder, head)}


PAPER = ("--targets", "paper")  # the helped problem is a least-squares head: the paper's targets repair it


def repair_args(paths: dict[str, Path], *extra: object, val: bool = True) -> list[object]:
    args = ["repair", paths["model"], "-f", paths["features"], *extra]
    return args + (["--val-features", paths["val"]] if val else [])


def outcome_of(result) -> dict:
    document = json.loads(result.stdout)
    assert document["exit_code"] == result.exit_code, result.output
    return document


def test_a_confirmed_repair_exits_0_and_dry_run_exits_as_the_run_would(tmp_path: Path) -> None:
    paths = helped(tmp_path)
    dry = run(*repair_args(paths, "--k", "auto", *PAPER, "--dry-run", "--json"))
    assert dry.exit_code == 0 and outcome_of(dry)["outcome"] == "repaired"
    assert not (tmp_path / "model.lip.pt").exists()
    written = run(*repair_args(paths, "--k", "auto", *PAPER, "--json"))
    assert written.exit_code == 0 and outcome_of(written)["output"] == str(tmp_path / "model.lip.pt")
    assert not torch.equal(weight(tmp_path / "model.lip.pt"), weight(paths["model"]))


def test_auto_without_validation_rows_exits_3_and_writes_no_change(tmp_path: Path) -> None:
    paths = helped(tmp_path)  # the validation set would confirm a repair here; held-out rows may not
    for extra in ([], ["--dry-run"]):
        result = run(*repair_args(paths, "--k", "auto", *extra, "--json", val=False))
        assert result.exit_code == errors.EXIT_UNCONFIRMED == 3, result.output
        document = outcome_of(result)
        assert document["outcome"] == "unconfirmed" and document["output"] is None
        assert document["test"]["validation_rows_for_1pt_gain"] > 0
    assert not (tmp_path / "model.lip.pt").exists()
    forced = run(*repair_args(paths, "--k", "auto", "--force-write", "--json", val=False))
    assert forced.exit_code == 0 and outcome_of(forced)["forced"]
    assert torch.equal(weight(tmp_path / "model.lip.pt"), weight(paths["model"]))  # an unchanged copy


@pytest.mark.parametrize("seed", [40, 41, 42])
def test_auto_without_validation_rows_never_writes_a_changed_head(tmp_path: Path, seed: int) -> None:
    head = make_head(n=500, q=12, l=6, seed=seed)
    paths = save_problem(tmp_path, head)
    result = run("repair", paths["model"], "-f", paths["features"], "--k", "auto", "--force-write", "--json")
    assert result.exit_code == 0, result.output
    original, copy = (
        torch.load(path, weights_only=True) for path in (paths["model"], tmp_path / "model.lip.pt")
    )
    assert all(torch.equal(copy[key], original[key]) for key in original)


@settings(max_examples=200, deadline=None)
@given(
    data=st.data(),
    rank=st.integers(1, 30),
    counts=st.tuples(*[st.integers(0, 300)] * 4),
    alpha=st.floats(1e-6, 0.5),
)
def test_decisions_on_held_out_training_rows_never_change_the_head(
    data, rank: int, counts, alpha: float
) -> None:
    ks = sorted(set(data.draw(st.lists(st.integers(0, rank - 1), max_size=8))) | {rank})
    accuracies = data.draw(st.lists(st.floats(0, 1), min_size=len(ks), max_size=len(ks)))
    best = selection.best_k(ks, accuracies)
    with mock.patch.object(selection, "decision_power", lambda decision: None):  # not what this checks
        decision = selection.decide(
            ks, accuracies, 100, selection.PairedCounts(*counts), best, rank, alpha, "holdout"
        )
    assert decision.k == rank and not decision.confirmed and decision.outcome == selection.UNCONFIRMED
    assert "confirmed" not in decision.reason.replace("not confirmed", "")


def test_auto_that_confirms_nothing_exits_3_and_force_write_writes_a_copy(tmp_path: Path) -> None:
    head = make_head(n=300, q=10, l=5, seed=23)
    optimum = least_squares_head(head)
    head = Head(optimum[:, :-1].contiguous(), optimum[:, -1].contiguous(), head.features, head.labels)
    paths = save_problem(tmp_path, head) | {"val": write_val(tmp_path, head)}
    result = run(*repair_args(paths, "--k", "auto", "--json"))
    assert result.exit_code == 3 and outcome_of(result)["outcome"] == "unconfirmed"
    assert run(*repair_args(paths, "--k", "auto", "--force-write", "--dry-run")).exit_code == 0
    assert not (tmp_path / "model.lip.pt").exists()
    forced = run(*repair_args(paths, "--k", "auto", "--force-write"))
    assert forced.exit_code == 0 and torch.equal(weight(tmp_path / "model.lip.pt"), weight(paths["model"]))


def test_a_given_k_shown_worse_exits_4_and_force_write_writes_it(tmp_path: Path) -> None:
    head = make_head(n=300, q=10, l=5, seed=24)
    optimum = 8 * least_squares_head(head)  # a trained-like head: LAP at k = 1 costs accuracy
    head = Head(optimum[:, :-1].contiguous(), optimum[:, -1].contiguous(), head.features, head.labels)
    paths = save_problem(tmp_path, head) | {"val": tmp_path / "val.npz"}
    np.savez(paths["val"], features=head.features.numpy(), labels=head.labels.numpy())
    for extra in ([], ["--dry-run"]):
        result = run(*repair_args(paths, "--k", 1, "--targets", "paper", *extra, "--json"))
        assert result.exit_code == errors.EXIT_REFUSED == 4, result.output
        document = outcome_of(result)
        assert document["outcome"] == "refused" and document["output"] is None
        (line,) = [w for w in document["warnings"] if "LOWERS" in w]
        before, after = (f"{100 * document['accuracy'][key]:.2f}%" for key in ("val_before", "val_after"))
        assert (
            f"from {before} to {after} on 300 rows" in line
            and f"p = {document['test']['p_value_drop']:.2g}" in line
        )
    assert not (tmp_path / "model.lip.pt").exists()
    forced = run(*repair_args(paths, "--k", 1, "--targets", "paper", "--force-write", "--json"))
    assert forced.exit_code == 0 and outcome_of(forced)["forced"]
    assert not torch.equal(weight(tmp_path / "model.lip.pt"), weight(paths["model"]))


def test_a_given_k_is_written_as_asked_and_says_what_checked_it(tmp_path: Path) -> None:
    paths = helped(tmp_path)
    unchecked = run(*repair_args(paths, "--k", 2, "--json", val=False))
    assert unchecked.exit_code == 0
    document = outcome_of(unchecked)
    assert document["outcome"] == "unchecked" and document["test"] is None and document["checked"] is False
    assert "nothing checked it" in document["decision"]
    # what it can measure: the share of training rows whose predicted class changes, recomputed here
    features = torch.from_numpy(np.load(paths["features"])).double()
    bias = torch.load(paths["model"], weights_only=True)["fc.bias"].double()
    before, after = (
        features @ weight(path).double().T + bias for path in (paths["model"], tmp_path / "model.lip.pt")
    )
    changed = float((before.argmax(1) != after.argmax(1)).double().mean())
    assert document["train_prediction_rows"] == 400
    assert document["train_predictions_changed"] == pytest.approx(changed) and 0 < changed < 1
    # said before the run (at a terminal, ahead of the pass, as the progress is) and after it
    said: list[str] = []
    request = repair_job.RepairRequest(paths["model"], paths["features"], 2, dry_run=True)
    repair_job.repair_checkpoint(request, lambda task, done, total: said.append(task), said.append)
    assert said[0].startswith("--k 2 without --val-features: nothing will check this k")
    assert "statistics" in said[1:]
    dry_run = run(*repair_args(paths, "--k", 2, "--dry-run", val=False))
    dry = " ".join(dry_run.stderr.split())
    train = document["accuracy"]
    assert (
        f"nothing checked k = 2 (no --val-features): it changes the predicted class of {100 * changed:.1f}% "
        f"of 400 training rows, training accuracy {100 * train['train_before']:.2f}% -> "
        f"{100 * train['train_after']:.2f}%" in dry
    )
    assert "nothing checked it" in " ".join(dry_run.stdout.split())  # the summary, on stdout
    checked = run(*repair_args(paths, "--k", 0, "--targets", "paper", "--json", "--force"))  # gains on val
    assert checked.exit_code == 0 and outcome_of(checked)["outcome"] == "given"
    assert outcome_of(checked)["checked"] is True
    test = outcome_of(checked)["test"]
    assert test["smallest_detectable_gain"] > 0 and test["discordance"] > 0
    # checked for harm only: never "a significant gain", even where the one-sided p is below alpha
    assert test["p_value"] <= 0.05
    decision = outcome_of(checked)["decision"]
    assert "significant gain" not in decision and "no evidence of a gain" in decision
    assert "not lower on validation (one-sided 95% lower bound" in decision


def test_power_is_stated_for_auto_and_for_the_rank(tmp_path: Path) -> None:
    paths = helped(tmp_path)
    document = outcome_of(run(*repair_args(paths, "--k", "auto", *PAPER, "--dry-run", "--json")))
    test = document["test"]
    assert test["power_level"] == 0.8 and test["power_rows"] == test["confirmation_rows"] == 100
    assert test["discordance"] == (test["discordant_gains"] + test["discordant_losses"]) / 100
    assert 0 < test["smallest_detectable_gain"] <= test["discordance"]
    assert test["validation_rows_for_1pt_gain"] > 200  # two parts: twice the confirmation rows needed
    human = " ".join(run(*repair_args(paths, "--k", "auto", *PAPER, "--dry-run")).stdout.split())
    assert "or more 80% of the time" in human and "a 1-point gain needs about" in human


def failing(error: BaseException):
    def fail(*args: object, **kwargs: object) -> None:
        raise error

    return fail


def command_lines(folder: Path) -> dict[str, tuple[list[object], object, str]]:
    """Each command with --json: its arguments and the library function it calls first."""
    paths = save_problem(folder, make_head())
    (folder / "other.pt").write_bytes(paths["model"].read_bytes())
    return {
        "repair": (
            ["repair", paths["model"], "-f", paths["features"], "--k", 1],
            repair_job,
            "repair_checkpoint",
        ),
        "inspect": (["inspect", paths["model"]], inspect_job, "inspect_checkpoint"),
        "compare": (["compare", paths["model"], folder / "other.pt"], compare_job, "compare_series"),
        "features": (
            [
                "features",
                paths["model"],
                "--model",
                "python:x:y",
                "--data",
                paths["features"],
                "--out",
                folder / "o.npy",
            ],
            features_job,
            "extract_features",
        ),
        "demo": (["demo", folder / "demo"], demo, "make_demo"),
    }


@pytest.mark.parametrize("command", ["repair", "inspect", "compare", "features", "demo"])
@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (LipError("x.pt: something is wrong"), 1, "x.pt: something is wrong"),
        (KeyboardInterrupt(), 130, "interrupted; nothing was written"),
        (Terminated(), 143, "terminated; nothing was written"),
        (MemoryError(), 1, "out of memory; nothing was written"),
    ],
)
def test_every_failure_under_json_is_one_error_document(
    tmp_path: Path, monkeypatch, command: str, error: BaseException, code: int, message: str
) -> None:
    args, module, name = command_lines(tmp_path)[command]
    monkeypatch.setattr(module, name, failing(error))
    result = run(*args, "--json")
    assert result.exit_code == code, result.output
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: {message}")
    assert json.loads(result.stdout) == {
        "lip_version": __version__,
        "error": {"message": line.removeprefix("error: "), "exit_code": code},
    }
    assert run(*args).stdout == ""  # without --json stdout stays empty


@pytest.mark.parametrize("command", ["repair", "inspect", "compare", "features", "demo"])
def test_a_bad_command_line_under_json_is_one_error_document(tmp_path: Path, command: str) -> None:
    args, _, _ = command_lines(tmp_path)[command]
    result = run(*args, "--no-such-option", "--json")
    assert result.exit_code == errors.EXIT_USAGE == 2
    error = json.loads(result.stdout)["error"]
    assert error["exit_code"] == 2 and "--no-such-option" in error["message"]
    assert "--no-such-option" in result.stderr  # the usage stays on stderr for people
    bad_value = run("repair", args[1], "-f", tmp_path / "features.npy", "--k", "many", "--json")
    assert bad_value.exit_code == 2 and "'many'" in json.loads(bad_value.stdout)["error"]["message"]


def test_an_interrupt_after_the_document_leaves_one_document(tmp_path: Path, monkeypatch) -> None:
    args, _, _ = command_lines(tmp_path)["inspect"]
    printed = console.print_json

    def print_then_interrupt(document: dict) -> None:
        printed(document)
        if "error" not in document:
            raise KeyboardInterrupt

    monkeypatch.setattr(console, "print_json", print_then_interrupt)
    result = run(*args, "--json")
    assert result.exit_code == 130
    assert "layers" in json.loads(result.stdout)  # the run's own document, alone


def test_a_missing_checkpoint_under_json_from_a_shell(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lip_cli",
            "repair",
            "missing.pt",
            "--features",
            "f.npy",
            "--k",
            "3",
            "--json",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "COLUMNS": "200", "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    error = json.loads(result.stdout)["error"]
    assert error["exit_code"] == 1 and "no such file" in error["message"]
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_every_exit_code_is_in_the_table() -> None:
    table = (ROOT / "docs" / "exit-codes.md").read_text()
    codes = {value for name, value in vars(errors).items() if name.startswith("EXIT_")}
    assert codes == {0, 1, 2, 3, 4, 5, 130, 143}
    for code in codes:
        assert f"| {code} |" in table, code
    for outcome in errors.OUTCOME_EXIT_CODES:
        assert f"`{outcome}`" in table and errors.outcome_exit_code(outcome, forced=True) == 0


def test_usage_and_evidence_errors_come_before_already_exists(tmp_path: Path) -> None:
    """A leftover output and no --force: a k that validation refuses still exits 4, a k beyond the
    rank still names the rank, a given k with nothing to check it stops before the pass, and --k
    auto stops only when it comes to write a k it confirmed."""
    paths = helped(tmp_path)
    leftover = tmp_path / "model.lip.pt"
    leftover.write_bytes(b"an older run's output")
    refused = run(*repair_args(paths, "--k", 1, "--json"))  # k = 1 is lower on this validation set
    assert refused.exit_code == errors.EXIT_REFUSED == 4, refused.output
    assert outcome_of(refused)["outcome"] == "refused" and "already exists" not in refused.stdout
    beyond = run(*repair_args(paths, "--k", 99))
    error = beyond.stderr.strip().splitlines()[-1]
    assert beyond.exit_code == 1 and "must be between 0 and the rank of `fc.weight`, 8" in error
    beyond = run(*repair_args(paths, "--k", 99, val=False))
    assert beyond.exit_code == 1 and beyond.stderr.startswith("error: --k 99: must be between 0 and the rank")
    unchecked = run(*repair_args(paths, "--k", 2, val=False))
    assert unchecked.exit_code == 1 and "already exists; pass --force" in unchecked.stderr
    assert "nothing will check" not in unchecked.stderr  # refused before the pass and its note
    confirmed = run(*repair_args(paths, "--k", "auto", *PAPER))
    assert confirmed.exit_code == 1 and "already exists; pass --force" in confirmed.stderr
    assert "without --force the run stops there if it confirms a k" in confirmed.stderr
    assert leftover.read_bytes() == b"an older run's output"
