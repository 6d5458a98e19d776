"""`lip repair` end to end on real files: formats, outputs, labels, errors."""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_head, save_problem
from reference import paper_lip
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from lip_cli.cli import app

runner = CliRunner(env={"COLUMNS": "200"})


def run(*args: object):
    return runner.invoke(app, [str(arg) for arg in args])


def expected_weight(head, k: int, features: np.ndarray | None = None) -> np.ndarray:
    features = head.features.numpy().astype(np.float32) if features is None else features
    bias = None if head.bias is None else head.bias.numpy().astype(np.float32)
    return paper_lip(head.weight.numpy().astype(np.float32), bias, features, head.labels.numpy(), k)


def assert_close_relative(actual: torch.Tensor, expected: np.ndarray, tolerance: float = 1e-6) -> None:
    error = np.linalg.norm(actual.double().numpy() - expected) / np.linalg.norm(expected)
    assert error < tolerance


def test_pt_state_dict(tmp_path: Path, head) -> None:
    paths = save_problem(tmp_path, head)
    before = paths["model"].read_bytes()
    result = run("repair", paths["model"], "--features", paths["features"], "--k", 2, "--targets", "paper")
    assert result.exit_code == 0, result.output
    # stderr holds only the warning that nothing checked this k (the note before the pass shows at a
    # terminal only, as the progress does)
    warnings = result.stderr.splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("warning: nothing checked k = 2")
    output = tmp_path / "model.lip.pt"
    assert f"wrote {output}" in " ".join(result.stdout.split())
    assert paths["model"].read_bytes() == before
    original = torch.load(paths["model"], weights_only=True)
    repaired = torch.load(output, weights_only=True)
    assert list(repaired) == list(original)
    for key in original:
        if key != "fc.weight":
            assert torch.equal(repaired[key], original[key]) and repaired[key].dtype == original[key].dtype
    assert repaired["fc.weight"].dtype == torch.float32
    assert_close_relative(repaired["fc.weight"], expected_weight(head, 2))
    assert "labels.npy beside the features" in " ".join(result.stdout.split())


def test_nested_pt_keeps_every_other_entry(tmp_path: Path, head) -> None:
    save_problem(tmp_path, head)
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    container = {"epoch": 7, "state_dict": OrderedDict(state), "optimizer": {"lr": 0.1, "m": torch.ones(3)}}
    torch.save(container, tmp_path / "nested.pt")
    result = run(
        "repair",
        tmp_path / "nested.pt",
        "-f",
        tmp_path / "features.npy",
        "--k",
        3,
        "--targets",
        "paper",
        "-o",
        tmp_path / "out.pth",
    )
    assert result.exit_code == 0, result.output
    out = torch.load(tmp_path / "out.pth", weights_only=True)
    assert out["epoch"] == 7 and out["optimizer"]["lr"] == 0.1
    assert torch.equal(out["optimizer"]["m"], torch.ones(3))
    assert isinstance(out["state_dict"], OrderedDict)
    assert torch.equal(out["state_dict"]["body.weight"], state["body.weight"])
    assert_close_relative(out["state_dict"]["fc.weight"], expected_weight(head, 3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_safetensors_keeps_metadata_and_dtypes(tmp_path: Path, dtype: torch.dtype) -> None:
    head = make_head(n=200, q=10, l=4, seed=11)
    tensors = {
        "backbone.weight": torch.randn(10, 3).to(dtype),
        "classifier.weight": head.weight.to(dtype),
        "classifier.bias": head.bias.to(dtype),
        "steps": torch.tensor([5], dtype=torch.int64),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt", "origin": "test"})
    np.savez(tmp_path / "train.npz", features=head.features.numpy(), labels=head.labels.numpy())
    result = run(
        "repair",
        tmp_path / "model.safetensors",
        "-f",
        tmp_path / "train.npz",
        "--k",
        1,
        "--targets",
        "paper",
        "--json",
    )
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["layer"] == "classifier" and document["labels_source"].startswith("the features file")
    with safe_open(str(tmp_path / "model.lip.safetensors"), framework="pt") as handle:
        assert handle.metadata()["origin"] == "test"
        out = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    assert set(out) == set(tensors)
    for key in ("backbone.weight", "classifier.bias", "steps"):
        assert torch.equal(out[key], tensors[key]) and out[key].dtype == tensors[key].dtype
    assert out["classifier.weight"].dtype == dtype
    expected = paper_lip(
        tensors["classifier.weight"].double().numpy(),
        tensors["classifier.bias"].double().numpy(),
        head.features.numpy(),
        head.labels.numpy(),
        1,
    )
    tolerance = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
    assert_close_relative(out["classifier.weight"], expected, tolerance)


def test_json_document(tmp_path: Path, head) -> None:
    paths = save_problem(tmp_path, head)
    np.savez(tmp_path / "val.npz", features=head.features.numpy()[:50], labels=head.labels.numpy()[:50])
    result = run(
        "repair",
        paths["model"],
        "-f",
        paths["features"],
        "--k",
        2,
        "--val-features",
        tmp_path / "val.npz",
        "--targets",
        "paper",
        "--json",
        "--force-write",  # k = 2 is lower on these 50 rows: refused without it
    )
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["outcome"] == "refused" and document["forced"] and document["checked"]
    assert document["test"]["ci_level"] == pytest.approx(0.9)
    for key in (
        "layer",
        "k",
        "rank",
        "singular_values_before",
        "singular_values_after",
        "accuracy",
        "output",
    ):
        assert key in document
    assert document["layer"] == "fc" and document["k"] == 2 and document["rank"] == 5
    assert set(document["accuracy"]) == {"train_before", "train_after", "val_before", "val_after"}
    assert document["output"] == str(tmp_path / "model.lip.pt")
    assert document["singular_values_before"][:2] == document["singular_values_after"][:2]
    logits = head.features.float() @ head.weight.float().T + head.bias.float()
    train_before = (logits.argmax(1) == head.labels).double().mean().item()
    assert document["accuracy"]["train_before"] == pytest.approx(train_before)
    assert document["accuracy"]["val_before"] == pytest.approx(
        (logits[:50].argmax(1) == head.labels[:50]).double().mean().item()
    )
    repaired = torch.load(document["output"], weights_only=True)["fc.weight"]
    after_logits = head.features.float() @ repaired.T + head.bias.float()
    assert document["accuracy"]["train_after"] == pytest.approx(
        (after_logits.argmax(1) == head.labels).double().mean().item()
    )


def test_labels_option_and_label_matrix(tmp_path: Path, head) -> None:
    paths = save_problem(tmp_path, head)
    one_hot = np.eye(5, dtype=np.float32)[head.labels.numpy()]
    np.save(tmp_path / "targets.npy", one_hot)
    result = run(
        "repair",
        paths["model"],
        "-f",
        paths["features"],
        "--labels",
        tmp_path / "targets.npy",
        "--k",
        2,
        "--targets",
        "paper",
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["labels_source"] == f"--labels {tmp_path / 'targets.npy'}"
    out = torch.load(tmp_path / "model.lip.pt", weights_only=True)["fc.weight"]
    assert_close_relative(out, expected_weight(head, 2))


def test_features_in_pt_and_safetensors_containers(tmp_path: Path, head) -> None:
    paths = save_problem(tmp_path, head)
    torch.save({"features": head.features.float(), "labels": head.labels}, tmp_path / "feats.pt")
    save_file({"features": head.features.float(), "labels": head.labels}, str(tmp_path / "feats.safetensors"))
    reference = None
    for name in ("feats.pt", "feats.safetensors"):
        output = tmp_path / f"out-{name}.pt"
        result = run("repair", paths["model"], "-f", tmp_path / name, "--k", 2, "-o", output)
        assert result.exit_code == 0, result.output
        weight = torch.load(output, weights_only=True)["fc.weight"]
        reference = weight if reference is None else reference
        assert torch.equal(weight, reference)


def test_never_overwrites_without_force(tmp_path: Path, head) -> None:
    paths = save_problem(tmp_path, head)
    (tmp_path / "model.lip.pt").write_bytes(b"precious")
    result = run("repair", paths["model"], "-f", paths["features"], "--k", 2)
    assert result.exit_code == 1
    assert "already exists; pass --force" in result.stderr
    assert (tmp_path / "model.lip.pt").read_bytes() == b"precious"
    result = run("repair", paths["model"], "-f", paths["features"], "--k", 2, "--force")
    assert result.exit_code == 0, result.output
    assert torch.load(tmp_path / "model.lip.pt", weights_only=True)["fc.weight"].shape == (5, 12)


def test_dry_run_writes_nothing(tmp_path: Path, head) -> None:
    paths = save_problem(tmp_path, head)
    listing = sorted(os.listdir(tmp_path))
    result = run("repair", paths["model"], "-f", paths["features"], "--k", 2, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["output"] is None
    assert sorted(os.listdir(tmp_path)) == listing


def test_human_report_shows_the_summary(tmp_path: Path, head) -> None:
    paths = save_problem(tmp_path, head)
    result = run("repair", paths["model"], "-f", paths["features"], "--k", 2)
    assert result.exit_code == 0, result.output
    text = result.stdout
    for expected in (
        "fc",
        "k / rank",
        "2 / 5",
        "energy kept by top k",
        "effective rank",
        "before",
        "after",
        "training",
    ):
        assert expected in text


def test_ambiguous_layer_lists_candidates_and_layer_option_resolves(tmp_path: Path) -> None:
    head = make_head(n=200, q=12, l=5, seed=12)
    torch.save(
        {"proj_a.weight": head.weight.float(), "proj_b.weight": head.weight.float() * 2},
        tmp_path / "two.pt",
    )
    np.save(tmp_path / "features.npy", head.features.numpy())
    np.save(tmp_path / "labels.npy", head.labels.numpy())
    result = run("repair", tmp_path / "two.pt", "-f", tmp_path / "features.npy", "--k", 2)
    assert result.exit_code == 1
    assert (
        "several layers" in result.stderr
        and "proj_a (5x12)" in result.stderr
        and "proj_b (5x12)" in result.stderr
    )
    result = run(
        "repair",
        tmp_path / "two.pt",
        "-f",
        tmp_path / "features.npy",
        "--k",
        2,
        "--layer",
        "proj_b",
        "--json",
    )
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["layer"] == "proj_b" and document["bias_key"] is None


def error_cases(tmp_path: Path, head) -> dict[str, tuple[list[object], str]]:
    paths = save_problem(tmp_path, head)
    model, features = paths["model"], paths["features"]
    (tmp_path / "random.pt").write_bytes(os.urandom(300))
    (tmp_path / "empty.npy").write_bytes(b"")
    (tmp_path / "truncated.npy").write_bytes(features.read_bytes()[:200])
    np.save(tmp_path / "short_labels.npy", head.labels.numpy()[:10])
    np.save(tmp_path / "big_labels.npy", np.full(head.labels.shape, 9))
    np.save(tmp_path / "negative_labels.npy", np.full(head.labels.shape, -1))
    nan_features = head.features.numpy().astype(np.float32)
    nan_features[17, 3] = np.nan
    np.save(tmp_path / "nan.npy", nan_features)
    np.save(tmp_path / "wide.npy", np.zeros((head.features.shape[0], 99), dtype=np.float32))
    for name in ("nan", "wide"):
        np.save(tmp_path / f"{name}.labels.npy", head.labels.numpy())
    state = torch.load(model, weights_only=True)
    state["fc.weight"] = state["fc.weight"].clone()
    state["fc.weight"][0, 0] = float("inf")
    torch.save(state, tmp_path / "inf.pt")
    return {
        "missing checkpoint": (
            ["repair", tmp_path / "nope.pt", "-f", features, "--k", 1],
            "nope.pt: no such file",
        ),
        "random bytes": (
            ["repair", tmp_path / "random.pt", "-f", features, "--k", 1],
            "not a readable .pt checkpoint",
        ),
        "empty features": (
            ["repair", model, "-f", tmp_path / "empty.npy", "--k", 1],
            "empty.npy: file is empty",
        ),
        "truncated features": (
            ["repair", model, "-f", tmp_path / "truncated.npy", "--k", 1],
            "truncated.npy",
        ),
        "label count": (
            ["repair", model, "-f", features, "-l", tmp_path / "short_labels.npy", "--k", 1],
            "10 labels but 300",
        ),
        "label range": (
            ["repair", model, "-f", features, "-l", tmp_path / "big_labels.npy", "--k", 1, "--layer", "fc"],
            "labels range over 9..9",
        ),
        "negative labels": (
            ["repair", model, "-f", features, "-l", tmp_path / "negative_labels.npy", "--k", 1],
            "labels range over -1..-1",
        ),
        "nan features": (
            ["repair", model, "-f", tmp_path / "nan.npy", "--k", 1],
            "rows 0-299 hold NaN or Inf",
        ),
        "inf weight": (
            ["repair", tmp_path / "inf.pt", "-f", features, "--k", 1],
            "`fc.weight` holds NaN or Inf",
        ),
        "k too large": (["repair", model, "-f", features, "--k", 6], "--k 6: must be between 0 and the rank"),
        "unknown layer": (
            ["repair", model, "-f", features, "--k", 1, "--layer", "head"],
            "no layer `head`; 2-D layers: body (12x7), fc (5x12)",
        ),
        "non-2-D layer": (["repair", model, "-f", features, "--k", 1, "--layer", "fc.bias"], "must be 2-D"),
        "wrong width": (
            ["repair", model, "-f", tmp_path / "wide.npy", "--k", 1],
            "no 2-D layer takes 99 inputs",
        ),
        "layer width": (
            ["repair", model, "-f", tmp_path / "wide.npy", "--k", 1, "--layer", "fc"],
            "the features have 99 columns",
        ),
        "missing output folder": (
            ["repair", model, "-f", features, "--k", 1, "-o", tmp_path / "no" / "out.pt"],
            "does not exist",
        ),
        "output is input": (
            ["repair", model, "-f", features, "--k", 1, "-o", model, "--force"],
            "same file as an input",
        ),
        "unknown format": (
            ["repair", tmp_path / "features.npy", "-f", features, "--k", 1],
            "unknown checkpoint format",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing checkpoint",
        "random bytes",
        "empty features",
        "truncated features",
        "label count",
        "label range",
        "negative labels",
        "nan features",
        "inf weight",
        "k too large",
        "unknown layer",
        "non-2-D layer",
        "wrong width",
        "layer width",
        "missing output folder",
        "output is input",
        "unknown format",
    ],
)
def test_bad_input_fails_with_one_line_and_leaves_nothing(tmp_path: Path, head, case: str) -> None:
    args, message = error_cases(tmp_path, head)[case]
    listing = {name: (tmp_path / name).stat().st_mtime_ns for name in os.listdir(tmp_path)}
    result = run(*args)
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.output
    assert {name: (tmp_path / name).stat().st_mtime_ns for name in os.listdir(tmp_path)} == listing


def test_pickled_code_never_runs(tmp_path: Path, head) -> None:
    paths = save_problem(tmp_path, head)
    marker = tmp_path / "MARKER"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    state = torch.load(paths["model"], weights_only=True)
    state["payload"] = Payload()
    torch.save(state, tmp_path / "evil.pt")
    result = run("repair", tmp_path / "evil.pt", "-f", paths["features"], "--k", 1)
    assert result.exit_code == 1
    assert "never runs pickled code" in result.stderr
    assert not marker.exists()


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert run("repair", tmp_path / "m.pt", "--k", 1).exit_code == 2  # --features missing
    assert run("repair", tmp_path / "m.pt", "-f", "x.npy", "--k", -1).exit_code == 2
    assert run("repair", tmp_path / "m.pt", "-f", "x.npy", "--k", 1, "--device", "tpu").exit_code == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(tmp_path: Path, head) -> None:
    paths = save_problem(tmp_path, head)
    for device in ("cpu", "cuda"):
        result = run(
            "repair",
            paths["model"],
            "-f",
            paths["features"],
            "--k",
            2,
            "--device",
            device,
            "-o",
            tmp_path / f"{device}.pt",
        )
        assert result.exit_code == 0, result.output
    cpu = torch.load(tmp_path / "cpu.pt", weights_only=True)["fc.weight"]
    cuda = torch.load(tmp_path / "cuda.pt", weights_only=True)["fc.weight"]
    torch.testing.assert_close(cuda, cpu, rtol=1e-5, atol=1e-6)


def test_cuda_requested_without_cuda_fails_cleanly(tmp_path: Path, head) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    paths = save_problem(tmp_path, head)
    result = run("repair", paths["model"], "-f", paths["features"], "--k", 2, "--device", "cuda")
    assert result.exit_code == 1 and "CUDA is not available" in result.stderr


def test_validation_labels_source_names_the_option_given(tmp_path: Path, head) -> None:
    """The validation labels came from --val-labels, and the summary and JSON say so."""
    paths = save_problem(tmp_path, head)
    np.save(tmp_path / "val_features.npy", head.features.numpy()[:60])
    np.save(tmp_path / "val_targets.npy", head.labels.numpy()[:60])
    args = ["repair", paths["model"], "-f", paths["features"], "--k", 2, "--dry-run", "--force-write"]
    args += ["--val-features", tmp_path / "val_features.npy", "--val-labels", tmp_path / "val_targets.npy"]
    result = run(*args, "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["val_labels_source"] == f"--val-labels {tmp_path / 'val_targets.npy'}"
    assert document["labels_source"] == f"{tmp_path / 'features.labels.npy'} beside the features"


def test_label_rows_with_no_class_are_counted_in_a_warning(tmp_path: Path) -> None:
    head = make_head(n=120, q=8, l=5, seed=41)
    paths = save_problem(tmp_path, head)
    candidates = np.eye(5, dtype=np.float32)[head.labels.numpy()]
    args = ["repair", paths["model"], "-f", paths["features"], "--k", 2, "--dry-run", "--json"]
    np.save(paths["labels"], candidates)
    assert not any("no class" in warning for warning in json.loads(run(*args).stdout)["warnings"])
    candidates[::10] = 0.0  # 12 empty candidate sets
    np.save(paths["labels"], candidates)
    warnings = json.loads(run(*args, "--chunk-rows", 50).stdout)["warnings"]
    assert any(warning.startswith("12 training rows have no class") for warning in warnings)
