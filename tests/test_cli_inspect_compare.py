"""`lip inspect` and `lip compare` end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_head, save_problem
from typer.testing import CliRunner

from lip_cli.cli import app

runner = CliRunner(env={"COLUMNS": "200"})


def run(*args: object):
    return runner.invoke(app, [str(arg) for arg in args])


def numpy_singular_values(weight: torch.Tensor) -> np.ndarray:
    return np.linalg.svd(weight.double().numpy(), compute_uv=False)


def test_inspect_table_of_every_2d_weight(tmp_path: Path, head) -> None:
    paths = save_problem(tmp_path, head)
    result = run("inspect", paths["model"], "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    names = [layer["name"] for layer in document["layers"]]
    assert names == ["body", "fc"]
    fc = document["layers"][1]
    assert fc["is_classifier"] and not document["layers"][0]["is_classifier"]
    values = numpy_singular_values(head.weight.float())
    assert fc["shape"] == [5, 12] and fc["rank"] == 5
    assert fc["spectral_norm"] == pytest.approx(values[0], rel=1e-6)
    assert fc["stable_rank"] == pytest.approx((values**2).sum() / values[0] ** 2, rel=1e-6)
    assert fc["top10_energy"] == pytest.approx(values[0] ** 2 / (values**2).sum(), rel=1e-6)
    assert document["other_tensors"] == 2
    human = run("inspect", paths["model"])
    assert human.exit_code == 0 and "fc ◀" in human.stdout and human.stderr == ""


def test_inspect_layer_spectrum(tmp_path: Path, head) -> None:
    paths = save_problem(tmp_path, head)
    result = run("inspect", paths["model"], "--layer", "body", "--json")
    assert result.exit_code == 0, result.output
    layer = json.loads(result.stdout)["layer"]
    state = torch.load(paths["model"], weights_only=True)
    values = numpy_singular_values(state["body.weight"])
    np.testing.assert_allclose(layer["singular_values"], values, rtol=1e-6)
    energy = np.cumsum(values**2) / (values**2).sum()
    np.testing.assert_allclose(layer["cumulative_energy"], energy, rtol=1e-6)
    assert layer["k_for_energy"]["0.9"] == int(np.argmax(energy >= 0.9 - 1e-12) + 1)
    human = run("inspect", paths["model"], "--layer", "fc", "--top", "3")
    assert human.exit_code == 0 and "top 3 of 5 singular values" in human.stdout


def test_inspect_k_curve_agrees_with_repair(tmp_path: Path, head) -> None:
    """Under the default targets and under each --targets, inspect's curve is what repair measures
    at that k, and both documents name the rule."""
    from lip_cli.lip import DEFAULT_TARGETS

    paths = save_problem(tmp_path, head)
    curves = {}
    for targets in (None, "paper", "logit-scale"):
        chosen = [] if targets is None else ["--targets", targets]
        result = run("inspect", paths["model"], "-f", paths["features"], *chosen, "--json")
        assert result.exit_code == 0, result.output
        document = json.loads(result.stdout)
        assert document["targets"] == (targets or DEFAULT_TARGETS)
        curve = {point["k"]: point["train_accuracy"] for point in document["k_curve"]}
        assert sorted(curve) == [0, 1, 2, 3, 4, 5]
        assert document["layer"]["name"] == "fc" and document["samples"] == 300
        for k in (1, 3):
            repaired = run(
                "repair", paths["model"], "-f", paths["features"], "--k", k, *chosen, "--dry-run", "--json"
            )
            report = json.loads(repaired.stdout)
            assert report["targets"] == document["targets"]
            assert curve[k] == pytest.approx(report["accuracy"]["train_after"], abs=1e-9)
        assert curve[5] == pytest.approx(report["accuracy"]["train_before"], abs=1e-9)
        curves[targets] = curve
    assert curves[None] == curves[DEFAULT_TARGETS] and curves["paper"] != curves["logit-scale"]
    refused = run("inspect", paths["model"], "--targets", "paper")
    assert refused.exit_code == 2 and "--features" in refused.output


def write_pair(folder: Path) -> tuple[Path, Path]:
    clean = make_head(n=10, q=12, l=6, seed=1)
    rotated = clean.weight.clone()
    rotated[[0, 1]] = rotated[[1, 0]]  # permute classes: same spectrum, rotated right singular vectors
    torch.save({"fc.weight": clean.weight.float(), "fc.bias": clean.bias.float()}, folder / "a.pt")
    torch.save({"fc.weight": rotated.float(), "fc.bias": clean.bias.float()}, folder / "b.pt")
    return folder / "a.pt", folder / "b.pt"


def test_compare(tmp_path: Path) -> None:
    a, b = write_pair(tmp_path)
    same = json.loads(run("compare", a, a, "--json").stdout)
    assert all(abs(value - 1.0) < 1e-9 for row in same["phi"]["values"] for value in row)
    assert all(angle < 1e-4 for angle in same["largest_principal_angle_degrees"].values())
    assert same["ratio"] == pytest.approx([1.0] * 6)
    result = run("compare", a, b, "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["layer"] == "fc" and document["phi"]["sizes"] == [1, 2, 5, 6]
    np.testing.assert_allclose(document["a"]["singular_values"], document["b"]["singular_values"], rtol=1e-6)
    assert document["phi"]["values"][-1][-1] == pytest.approx(1.0)  # full spans are equal
    assert document["phi"]["values"][0][0] < 1.0 - 1e-6  # the top direction moved
    human = run("compare", a, b)
    assert human.exit_code == 0 and "subspace similarity" in human.stdout


def test_compare_rejects_different_shapes(tmp_path: Path) -> None:
    a, _ = write_pair(tmp_path)
    torch.save({"fc.weight": torch.randn(6, 8)}, tmp_path / "c.pt")
    result = run("compare", a, tmp_path / "c.pt")
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "only layers of the same shape compare" in result.stderr
    result = run("compare", a, tmp_path / "c.pt", "--layer", "head")
    assert result.exit_code == 1 and "no layer `head`" in result.stderr


def test_plots_are_valid_png(tmp_path: Path, head) -> None:
    image = pytest.importorskip("matplotlib.image")
    paths = save_problem(tmp_path, head)
    a, b = write_pair(tmp_path)
    runs = {
        "table.png": ["inspect", paths["model"]],
        "layer.png": ["inspect", paths["model"], "-f", paths["features"]],
        "compare.png": ["compare", a, b],
    }
    for name, args in runs.items():
        result = run(*args, "--plot", tmp_path / name)
        assert result.exit_code == 0, result.output
        pixels = image.imread(tmp_path / name)
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    again = run("compare", a, b, "--plot", tmp_path / "compare.png")
    assert again.exit_code == 1 and "pass --force" in again.stderr


def test_plot_without_matplotlib_says_how_to_install(tmp_path: Path, monkeypatch) -> None:
    a, b = write_pair(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = run("compare", a, b, "--plot", tmp_path / "x.png")
    assert result.exit_code == 1
    assert "pip install 'lip-cli[plot]'" in result.stderr
    assert not (tmp_path / "x.png").exists()


def test_inspect_bad_input(tmp_path: Path, head) -> None:
    paths = save_problem(tmp_path, head)
    for args, message in [
        (["inspect", tmp_path / "none.pt"], "no such file"),
        (["inspect", paths["model"], "--layer", "nope"], "no layer `nope`"),
        (["inspect", paths["model"], "--labels", paths["labels"]], "--labels needs --features"),
        (
            ["inspect", paths["model"], "--layer", "body", "-f", paths["features"]],
            "the features have 12 columns",
        ),
    ]:
        result = run(*args)
        assert result.exit_code == 1, result.output
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
        assert message in result.stderr
