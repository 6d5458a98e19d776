"""lip in CI (docs/ci.md): the workflows' shell steps run as written on the demo pair, the gate's
exit codes, the baseline file, the markdown summary and the JUnit reports read back with a real
JUnit parser (junitparser) and checked against the shape GitHub, GitLab and Jenkins read."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import junitparser
import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from lip_cli.cli import app

ROOT = Path(__file__).resolve().parent.parent
CI_PAGE = ROOT / "docs" / "ci.md"
runner = CliRunner(env={"COLUMNS": "100"})
SHELL_ONLY = re.compile(r"[&;<>()$`|*?]")  # what only bash can run
CLEAN, NOISY = "pair/noise-0/model.pt", "pair/noise-0.4/model.pt"


def page_block(first_line: str) -> str:
    """The fenced block of docs/ci.md whose first line is `first_line`."""
    for block in re.findall(r"^```\w*\n(.*?)^```", CI_PAGE.read_text(), re.MULTILINE | re.DOTALL):
        if block.splitlines()[0] == first_line:
            return block
    raise AssertionError(f"docs/ci.md: no block starting {first_line!r}")


def shell_env(tmp: Path, summary: Path) -> dict[str, str]:
    """`lip` and `python` on PATH run this interpreter on this checkout; one torch thread (the demo's
    tiny training is many times faster so on a busy machine)."""
    shims = tmp / "bin"
    shims.mkdir(exist_ok=True)
    for name, command in {"lip": f'"{sys.executable}" -m lip_cli', "python": f'"{sys.executable}"'}.items():
        (shims / name).write_text(f'#!/bin/sh\nexec {command} "$@"\n')
        (shims / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{shims}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = str(ROOT)
    env["GITHUB_STEP_SUMMARY"] = str(summary)
    return env


def run_step(script: str, folder: Path, env: dict[str, str]) -> tuple[int, str]:
    """A step as GitHub's and GitLab's bash run it (-e, pipefail); a step that is one plain `lip`
    command (continuation lines joined) runs in this process instead, as bash would pass its words,
    on one torch thread: the same run, without a second interpreter's start-up."""
    command = script.replace("\\\n", " ").strip()
    if command.startswith("lip ") and "\n" not in command and not SHELL_ONLY.search(command):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        old = os.getcwd()
        os.chdir(folder)
        try:
            result = runner.invoke(
                app, shlex.split(command)[1:], env={"GITHUB_STEP_SUMMARY": env["GITHUB_STEP_SUMMARY"]}
            )
        finally:
            os.chdir(old)
            torch.set_num_threads(threads)
        return result.exit_code, result.output
    done = subprocess.run(
        ["bash", "-eo", "pipefail", "-c", script],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    return done.returncode, done.stdout + done.stderr


@pytest.fixture(scope="session")
def github_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The GitHub workflow's steps, as written, in a fresh folder (all but `install lip`)."""
    workflow = yaml.safe_load(page_block("# .github/workflows/lip-gate.yml"))
    steps = workflow["jobs"]["gate"]["steps"]
    scripts = [step["run"] for step in steps if "run" in step and step.get("name") != "install lip"]
    assert len(scripts) == len([step for step in steps if "run" in step]) - 1
    folder = tmp_path_factory.mktemp("github")
    tools = tmp_path_factory.mktemp("tools")
    summary = tools / "summary.md"
    env = shell_env(tools, summary)
    for script in scripts:
        code, output = run_step(script, folder, env)
        assert code == 0, f"docs/ci.md: {script}\nexit {code}\n{output}"
    (folder / "summary.md").write_text(summary.read_text())
    return folder


def junit_cases(path: Path) -> list[tuple[str, str]]:
    """(name, result) of every test case, read by junitparser; the XML has the shape CI reads."""
    root = ElementTree.parse(path).getroot()
    assert root.tag == "testsuites" and [child.tag for child in root] == ["testsuite"]
    for case in root.iter("testcase"):
        assert case.get("classname") and case.get("name")
        assert [child.tag for child in case] in ([], ["failure"], ["error"], ["skipped"])
        assert all(child.get("message") for child in case)
    cases = []
    for suite in junitparser.JUnitXml.fromfile(str(path)):
        counted = (suite.tests, suite.failures, suite.errors, suite.skipped)
        results = [(case.name, type(case.result[0]).__name__ if case.result else "passed") for case in suite]
        kinds = [kind for _, kind in results]
        assert counted == (len(results), kinds.count("Failure"), kinds.count("Error"), kinds.count("Skipped"))
        cases += results
    return cases


def test_github_workflow_gates_the_demo_pair(github_run: Path) -> None:
    assert junit_cases(github_run / "clean.xml") == [("phi@5 >= 0.9", "passed"), ("angle@5 <= 30", "passed")]
    assert junit_cases(github_run / "noisy.xml") == [
        ("phi@5 >= 0.9", "Failure"),
        ("angle@5 <= 30", "Failure"),
    ]
    summary = (github_run / "summary.md").read_text()
    sections = re.findall(r"^### (.*)$", summary, re.MULTILINE)
    assert sections == ["lip compare: gate passed", "lip compare: gate failed"]
    assert "| phi@5 >= 0.9 | lip.compare.model | 0.7542 | ❌ failed" in summary


def test_gitlab_job_runs_on_the_cached_pair(github_run: Path, tmp_path: Path) -> None:
    """The GitLab script as written, on a folder that holds the demo pair (its cache): nothing trained."""
    job = yaml.safe_load(page_block("# .gitlab-ci.yml"))["lip-gate"]
    assert job["artifacts"]["reports"]["junit"] == "*.xml"
    folder = tmp_path / "project"
    shutil.copytree(github_run, folder)
    summary = tmp_path / "summary.md"
    env = shell_env(tmp_path, summary)
    before = (folder / NOISY).stat().st_mtime_ns
    for line in job["script"]:
        code, output = run_step(line, folder, env)
        assert code == 0, f"docs/ci.md: {line}\nexit {code}\n{output}"
    assert (folder / NOISY).stat().st_mtime_ns == before
    assert junit_cases(folder / "clean.xml") == [("phi@5 >= 0.9", "passed")]
    assert junit_cases(folder / "noisy.xml") == [("phi@5 >= 0.9", "Failure")]
    assert summary.read_text().count("### lip compare") == 2


def lip(*args: object, env: dict[str, str] | None = None):
    return runner.invoke(app, [str(arg) for arg in args], env=env)


def compare_json(*args: object) -> tuple[int, dict]:
    result = lip("compare", *args, "--json", "--no-step-summary")
    assert result.stdout, (result.exit_code, result.stderr, repr(result.exception))
    return result.exit_code, json.loads(result.stdout)


@pytest.fixture(scope="session")
def validation(github_run: Path) -> dict[str, Path]:
    """Each demo model's own features of the same validation rows (`lip features`)."""
    found = {}
    for model in (CLEAN, NOISY):
        out = github_run / Path(model).parent / "val" / "features.npy"
        if not out.exists():
            data = github_run / Path(model).parent / "val"
            result = lip(
                "features", github_run / model, "--model", "python:lip_cli.demo:demo_model", "--data",
                data / "inputs.npy", "--labels", data / "targets.npy", "--out", out,
            )  # fmt: skip
            assert result.exit_code == 0, result.output
        found[model] = out
    return found


def test_the_page_figures_are_the_demo_pair(
    github_run: Path, validation: dict[str, Path], monkeypatch
) -> None:
    """Every figure of docs/ci.md's table, from the run (phi, angle, effective rank, accuracy, size)."""
    monkeypatch.chdir(github_run)
    page = CI_PAGE.read_text()
    accuracy = ["--val-features", validation[CLEAN], "--val-features"]
    code, same = compare_json(CLEAN, CLEAN, *accuracy, validation[CLEAN])
    assert code == 0
    code, noisy = compare_json(CLEAN, NOISY, *accuracy, validation[NOISY])
    assert code == 0  # no threshold given: a comparison, not a gate
    k5 = noisy["phi"]["sizes"].index(5)
    a_rank = noisy["a"]["effective_rank"]
    rows = [
        f"| phi(5, 5) | {same['phi']['values'][k5][k5]:.3f} | {noisy['phi']['values'][k5][k5]:.3f} |",
        f"| largest principal angle, top 5 | {same['largest_principal_angle_degrees']['5']:.1f} degrees | "
        f"{noisy['largest_principal_angle_degrees']['5']:.1f} degrees |",
        f"| effective rank (A = {a_rank:.2f}) | change "
        f"{100 * (same['b']['effective_rank'] - a_rank) / a_rank:.2f}% | change "
        f"{100 * (noisy['b']['effective_rank'] - a_rank) / a_rank:.2f}% |",
        f"| validation accuracy ({same['accuracy']['rows']:,} clean rows) | "
        f"{100 * same['accuracy']['accuracy_change']:+.1f} pt | "
        f"{100 * noisy['accuracy']['accuracy_change']:+.1f} pt, p < 1e-100 |".replace("+-", "-"),
    ]
    missing = [row for row in rows if row.replace("-0.00%", "0.00%") not in page]
    assert not missing, "docs/ci.md: the table's rows from this run:\n" + "\n".join(missing)
    assert noisy["accuracy"]["p_value_drop"] < 1e-100
    size = (github_run / "trusted.baseline").stat().st_size
    assert f"it is {size / 1000:.1f} kB" in page


def test_a_baseline_gives_the_checkpoints_results(github_run: Path, monkeypatch) -> None:
    """compare against the trusted checkpoint and against its baseline file: identical metrics; the
    file is recognised by its bytes (renamed .pt), its provenance names the source's sha256."""
    import hashlib

    monkeypatch.chdir(github_run)
    shutil.copy(github_run / "trusted.baseline", github_run / "renamed.pt")
    code_a, from_checkpoint = compare_json(CLEAN, NOISY, "--fail-below", "phi@5=0.9")
    code_b, from_baseline = compare_json("renamed.pt", NOISY, "--fail-below", "phi@5=0.9")
    assert code_a == code_b == 5
    record = from_baseline.pop("reference_baseline")
    assert record["source_sha256"] == hashlib.sha256((github_run / CLEAN).read_bytes()).hexdigest()
    assert record["source"] == CLEAN
    for document in (from_checkpoint, from_baseline):
        document.pop("checkpoint_a")
        for check in document["gate"]["checks"]:
            check.pop("comparison")  # the label: the compared file's stem, told apart from the reference's
    from_checkpoint.pop("reference_baseline")
    assert from_checkpoint == from_baseline


def test_the_accuracy_gate(
    github_run: Path, validation: dict[str, Path], tmp_path: Path, monkeypatch
) -> None:
    """A significant drop fails (5); the same heads on 30 rows cannot tell (3); the head with itself
    passes (0); a baseline has no accuracy (1)."""
    monkeypatch.chdir(github_run)
    gate = ("--fail-below", "accuracy=-0.01")
    pair = ("--val-features", validation[CLEAN], "--val-features", validation[NOISY])
    code, document = compare_json(CLEAN, NOISY, *pair, *gate)
    assert code == 5 and document["gate"]["checks"][0]["verdict"] == "failed"
    few = []
    for model, path in validation.items():
        folder = tmp_path / Path(model).parent.name
        folder.mkdir()
        np.save(folder / "features.npy", np.load(path)[:30])
        np.save(folder / "features.labels.npy", np.load(path.with_name("features.labels.npy"))[:30])
        few.append(folder / "features.npy")
    code, document = compare_json(CLEAN, CLEAN, "--val-features", few[0], "--val-features", few[0], *gate)
    assert code == 3 and document["gate"]["verdict"] == "too few rows"
    assert "too few rows to tell" in document["gate"]["checks"][0]["detail"]
    code, document = compare_json(CLEAN, CLEAN, "--val-features", validation[CLEAN], "--val-features",
                                  validation[CLEAN], *gate)  # fmt: skip
    assert code == 0 and document["accuracy"]["gained"] == document["accuracy"]["lost"] == 0
    code, document = compare_json("trusted.baseline", NOISY, *pair, *gate)
    assert code == 1 and "holds no weights" in document["error"]["message"]
    code, document = compare_json(CLEAN, NOISY, "--val-features", validation[CLEAN], "--val-features", few[1])
    assert code == 1 and "same validation rows" in document["error"]["message"]


@pytest.mark.parametrize(
    ("option", "spec", "says"),
    [
        ("--fail-below", "phi=0.9", "subspace size"),
        ("--fail-below", "phi@5=1.5", "[0, 1]"),
        ("--fail-above", "angle@5=100", "[0, 90]"),
        ("--fail-below", "rank@5=1", "unknown metric"),
        ("--fail-below", "phi@5=0.9%", "only effective-rank and energy"),
        ("--fail-above", "accuracy=-0.01", "--fail-below"),
        ("--fail-below", "phi@5", "METRIC=VALUE"),
        ("--fail-below", "accuracy=-0.01", "needs --val-features"),
    ],
)
def test_bad_thresholds_are_usage_errors(
    github_run: Path, option: str, spec: str, says: str, monkeypatch
) -> None:
    monkeypatch.chdir(github_run)
    result = lip("compare", CLEAN, NOISY, option, spec)
    assert result.exit_code == 2 and says in " ".join(result.output.split()), result.output


def test_failures_reach_the_junit_file_and_the_summary(github_run: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(github_run)
    summary = tmp_path / "summary.md"
    env = {"GITHUB_STEP_SUMMARY": str(summary)}
    result = lip("compare", CLEAN, tmp_path / "missing.pt", "--junit", tmp_path / "r.xml", env=env)
    assert result.exit_code == 1
    assert junit_cases(tmp_path / "r.xml") == [("run", "Error")]
    assert (
        "### lip compare: error" in summary.read_text() and "missing.pt: no such file" in summary.read_text()
    )
    result = lip("compare", CLEAN, NOISY, "--fail-below", "phi@20=0.5", env=env)
    assert result.exit_code == 1 and "beyond the 10 singular vectors" in result.output
    before = summary.read_text()
    assert lip("compare", CLEAN, CLEAN, "--no-step-summary", env=env).exit_code == 0
    assert summary.read_text() == before
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # never opened: a FIFO would block the run
    result = lip("compare", CLEAN, CLEAN, env={"GITHUB_STEP_SUMMARY": str(fifo)})
    assert result.exit_code == 0 and "not a regular file" in result.stderr
    result = lip("compare", CLEAN, NOISY, "--junit", tmp_path / "r.xml")
    assert result.exit_code == 1 and "already exists" in result.output


@pytest.fixture(scope="session")
def noisy_train(github_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The noisy demo model's training features."""
    train = tmp_path_factory.mktemp("train") / "train.npy"
    data = github_run / "pair/noise-0.4/train"
    result = lip(
        "features", github_run / NOISY, "--model", "python:lip_cli.demo:demo_model",
        "--data", data / "inputs.npy", "--labels", data / "targets.npy", "--out", train,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return train


def test_repair_junit_is_its_decision(
    github_run: Path, validation: dict[str, Path], noisy_train: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(github_run)
    args = ("repair", NOISY, "-f", noisy_train, "--val-features", validation[NOISY], "--dry-run", "--junit")
    assert lip(*args, tmp_path / "given.xml", "--k", "3").exit_code == 4
    assert junit_cases(tmp_path / "given.xml") == [("decision: refused", "Failure")]
    assert lip(*args, tmp_path / "auto.xml", "--k", "auto").exit_code == 3
    assert junit_cases(tmp_path / "auto.xml") == [("decision: unconfirmed", "Skipped")]
    assert lip(*args, tmp_path / "bad.xml", "--k", "99").exit_code == 1
    assert junit_cases(tmp_path / "bad.xml") == [("run", "Error")]


def test_compare_before_and_after_a_repair_matches_by_vector(
    github_run: Path, noisy_train: Path, tmp_path: Path, monkeypatch
) -> None:
    """After --k 3, by rank phi(5, 5) falls and the angle at 5 is 90 degrees; compare says the
    repaired head holds the reference's vectors and gives its values by vector."""
    monkeypatch.chdir(github_run)
    repaired = tmp_path / "repaired.pt"
    assert lip("repair", NOISY, "-f", noisy_train, "--k", "3", "-o", repaired).exit_code == 0
    code, document = compare_json(NOISY, repaired)
    assert code == 0
    assert document["largest_principal_angle_degrees"]["5"] > 89
    same = document["same_vectors"]
    assert same is not None and same["order"][:3] == [1, 2, 3] and same["order"] != list(range(1, 11))
    assert same["ratio"][:3] == pytest.approx([1.0, 1.0, 1.0], abs=1e-6)
    sorted_b = sorted(same["singular_values_b"], reverse=True)
    assert sorted_b == pytest.approx(document["b"]["singular_values"], rel=1e-12)
    result = lip("compare", NOISY, repaired, "--no-step-summary")
    assert "holds the reference's right singular vectors" in " ".join(result.output.split())
    for other in (NOISY, CLEAN):  # the same head, an unrelated one: nothing to match
        assert compare_json(NOISY, other)[1]["same_vectors"] is None


def test_each_metric_is_measured_as_documented(github_run: Path, monkeypatch) -> None:
    """The gate's values against numpy float64 from the JSON's own spectra and vectors' measures."""
    monkeypatch.chdir(github_run)
    gates = [
        "--fail-below",
        "energy@3=-0.5",
        "--fail-above",
        "effective-rank=50%",
        "--fail-above",
        "angle@4=90",
    ]
    code, document = compare_json(CLEAN, NOISY, *gates, "--fail-below", "phi@3=0")
    assert code == 0
    a, b = (np.array(document[side]["singular_values"]) for side in ("a", "b"))
    values = {check["metric"]: check["value"] for check in document["gate"]["checks"]}

    def entropy_rank(s: np.ndarray) -> float:
        p = s / s.sum()
        return float(np.exp(-(p * np.log(p)).sum()))

    assert values["energy"] == pytest.approx(
        (b[:3] ** 2).sum() / (b**2).sum() - (a[:3] ** 2).sum() / (a**2).sum()
    )
    assert values["effective-rank"] == pytest.approx(
        100 * (entropy_rank(b) - entropy_rank(a)) / entropy_rank(a)
    )
    k3 = document["phi"]["sizes"].index(2)  # phi@3 is not in the table's sizes: the matrix's own entry
    assert 0 <= values["phi"] <= 1 and values["phi"] != document["phi"]["values"][k3][k3]
    assert 0 < values["angle"] < 90
    code, document = compare_json(CLEAN, NOISY, "--fail-below", f"energy@3={values['energy'] + 1e-9}")
    assert code == 5 and document["gate"]["checks"][0]["verdict"] == "failed"


def test_a_baseline_is_no_checkpoint_to_inspect_or_repair(
    github_run: Path, validation: dict[str, Path], monkeypatch
) -> None:
    monkeypatch.chdir(github_run)
    train = validation[CLEAN]  # any features: the checkpoint is refused first
    for args in (["inspect", "trusted.baseline"], ["repair", "trusted.baseline", "-f", train, "--k", "3"]):
        result = lip(*args)
        assert result.exit_code == 1 and "a lip baseline" in result.output, result.output
    result = lip("compare", CLEAN, "trusted.baseline", "--layer", "body.0")
    assert result.exit_code == 1 and "a baseline of `fc`, not of --layer body.0" in result.output
