"""Inputs lip cannot read, or that used to end in a traceback: one line on stderr and exit 1, or
(for valid inputs with odd names, keys or magnitudes) a normal run."""

from __future__ import annotations

import ctypes
import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lip_cli import __version__
from lip_cli.cli import app
from lip_cli.errors import EXIT_UNCONFIRMED
from lip_cli.render import console
from tests.conftest import make_head, save_problem

runner = CliRunner(env={"COLUMNS": "400"})


def run(*args: object):
    return runner.invoke(app, [str(arg) for arg in args])


def one_line(result, expected: str) -> None:
    """Exit 1 with exactly one line on stderr (no traceback: SystemExit is what the CLI raised)."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    assert result.stderr.strip().splitlines() == [f"error: {expected}"]


@pytest.fixture
def problem(tmp_path: Path) -> dict[str, Path]:
    return save_problem(tmp_path, make_head(n=200, q=12, l=10))


def _drop_file_capabilities() -> None:
    """In the child before exec: remove CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding
    set, so that even root is held to file modes (PR_CAPBSET_DROP)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        if libc.prctl(24, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_unreadable_inputs_without_file_capabilities(tmp_path: Path, problem) -> None:
    """A mode-000 checkpoint, labels file and file inside a model folder, in a real process that
    file modes bind: exit 1 and one line each (was a boxed usage error, or a late traceback from
    the background hash)."""
    (tmp_path / "locked.pt").write_bytes(problem["model"].read_bytes())
    (tmp_path / "hf").mkdir()
    from safetensors.torch import save_file

    save_file(torch.load(problem["model"], weights_only=True), str(tmp_path / "hf" / "model.safetensors"))
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "hf2" / "extra").mkdir(parents=True)  # a folder os.walk cannot list is not skipped
    (tmp_path / "hf2" / "model.safetensors").write_bytes((tmp_path / "hf" / "model.safetensors").read_bytes())
    for path in (tmp_path / "locked.pt", tmp_path / "hf" / "config.json", tmp_path / "hf2" / "extra"):
        path.chmod(0)
    features = problem["features"]
    runs = [
        ["inspect", "locked.pt"],
        ["repair", "locked.pt", "-f", features, "--k", "3", "-o", "out.pt"],
        ["repair", problem["model"], "-f", features, "--labels", "locked.pt", "--k", "3", "--dry-run"],
        ["repair", "hf", "-f", features, "--labels", problem["labels"], "--k", "3", "-o", "hf.out"],
        ["repair", "hf2", "-f", features, "--labels", problem["labels"], "--k", "3", "-o", "hf.out"],
    ]
    script = (
        "import json, sys\nfrom lip_cli.cli import app\n"
        "for arguments in json.loads(sys.argv[1]):\n"
        "    print(f'exit {app(arguments, standalone_mode=False)}', file=sys.stderr)\n"
    )
    commands = json.dumps([[str(part) for part in arguments] for arguments in runs])
    try:
        process = subprocess.run(
            [sys.executable, "-c", script, commands],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
            preexec_fn=_drop_file_capabilities,
            env={**os.environ, "COLUMNS": "400"},
        )
    except subprocess.SubprocessError as error:  # no CAP_SETPCAP here: modes bind anyway unless root
        if os.geteuid() == 0:
            pytest.skip(f"cannot drop file capabilities here ({error})")
        raise
    assert process.returncode == 0, process.stderr
    denied = "permission denied; lip cannot read it"
    assert process.stderr.strip().splitlines() == [
        f"error: locked.pt: {denied}",
        "exit 1",
        f"error: locked.pt: {denied}",
        "exit 1",
        f"error: locked.pt: {denied}",
        "exit 1",
        f"error: hf/config.json: {denied}",
        "exit 1",
        f"error: hf2/extra: {denied}",
        "exit 1",
    ]
    assert not (tmp_path / "out.pt").exists() and not (tmp_path / "hf.out").exists()


def test_symlink_loops_are_named(tmp_path: Path, problem) -> None:
    os.symlink("loop.pt", tmp_path / "loop.pt")
    loop = tmp_path / "loop.pt"
    message = f"{loop}: is a symlink loop (its links never reach a file)"
    one_line(run("inspect", loop), message)
    one_line(
        run("repair", problem["model"], "-f", problem["features"], "--k", 3, "-o", loop, "--force"), message
    )
    one_line(
        run("repair", problem["model"], "-f", problem["features"], "--k", 3, "--plot", loop),
        message,
    )


def test_dot_and_root_as_outputs_are_refused_in_one_line(tmp_path: Path, problem, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    for output in (".", "/"):
        result = run("repair", problem["model"], "-f", problem["features"], "--k", 3, "-o", output)
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
        assert result.stderr.startswith(f"error: {output}: the output is written as .pt")


def test_deeply_nested_json_anywhere_lip_reads_json(tmp_path: Path, problem) -> None:
    nested = "[" * 100_000 + "]" * 100_000
    (tmp_path / "model.pt.lip.json").write_text(nested)
    result = run("inspect", problem["model"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.stderr.startswith(f"error: {problem['model']}: its lip provenance record is unreadable")
    header = nested.encode()
    (tmp_path / "nested.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    result = run("inspect", tmp_path / "nested.safetensors")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "not a readable .safetensors checkpoint" in result.stderr
    result = run("repair", problem["model"], "-f", tmp_path / "nested.safetensors", "--k", 3, "--dry-run")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "unknown array format" in result.stderr


def test_values_nested_deep_are_kept_as_they_were(tmp_path: Path, problem) -> None:
    """The walk holds nesting on its own stack and lip never pickles again: 300 levels come back
    byte for byte (the old design refused them, as torch.save could not write them back)."""
    import zipfile

    state = torch.load(problem["model"], weights_only=True)
    deep: dict = {}
    level = deep
    for _ in range(300):
        level["n"] = {}
        level = level["n"]
    torch.save({"state_dict": state, "deep": deep}, tmp_path / "deep.pt")
    result = run("repair", tmp_path / "deep.pt", "-f", problem["features"], "--k", 3, "-o", tmp_path / "o.pt")
    assert result.exit_code == 0, result.output
    with zipfile.ZipFile(tmp_path / "deep.pt") as before, zipfile.ZipFile(tmp_path / "o.pt") as after:
        assert before.read("deep/data.pkl") == after.read("o/data.pkl".replace("o/", "deep/"))
    assert torch.load(tmp_path / "o.pt", weights_only=True)["deep"] == deep


def test_non_string_state_dict_keys_are_kept_and_skipped(tmp_path: Path, problem) -> None:
    state = torch.load(problem["model"], weights_only=True)
    state[0] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "intkey.pt")
    assert run("inspect", tmp_path / "intkey.pt").exit_code == 0
    result = run(
        "repair", tmp_path / "intkey.pt", "-f", problem["features"], "--k", 3, "-o", tmp_path / "o.pt"
    )
    assert result.exit_code == 0, result.output
    assert torch.equal(torch.load(tmp_path / "o.pt", weights_only=True)[0], torch.zeros(3, 3))


@pytest.mark.parametrize("rows", [2**40, 2**62, 2**63])
def test_chunk_rows_past_the_data_cost_only_the_data(problem, rows: int) -> None:
    result = run(
        "repair",
        problem["model"],
        "-f",
        problem["features"],
        "--k",
        "auto",
        "--dry-run",
        "--chunk-rows",
        rows,
    )
    assert result.exit_code == EXIT_UNCONFIRMED, result.output  # auto without validation rows


def test_torch_cpu_allocation_failure_is_the_out_of_memory_line(problem, monkeypatch) -> None:
    from lip_cli.jobs import repair as repair_job

    def fail(*args, **kwargs):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] . DefaultCPUAllocator: can't allocate memory: you tried "
            "to allocate 8796093022208 bytes. Error code 12 (Cannot allocate memory)"
        )

    monkeypatch.setattr(repair_job, "statistics_pass", fail)
    result = run("repair", problem["model"], "-f", problem["features"], "--k", 3, "--dry-run")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.stderr.startswith("error: out of memory (") and result.stderr.count("\n") == 1


def test_tiny_weights_give_finite_json(tmp_path: Path) -> None:
    weight = torch.randn(10, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 1e-170
    torch.save({"fc.weight": weight}, tmp_path / "tiny.pt")
    result = run("inspect", tmp_path / "tiny.pt", "--json")
    assert result.exit_code == 0, result.output
    layer = json.loads(result.stdout, parse_constant=lambda name: pytest.fail(f"{name} in JSON"))["layers"][0]
    singular = torch.linalg.svdvals(weight / 1e-170)
    assert layer["stable_rank"] == pytest.approx(float((singular**2).sum() / singular[0] ** 2), rel=1e-12)


def test_json_documents_never_hold_nan(capsys) -> None:
    console.print_json({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -float("inf"), "e": 2}})
    document = json.loads(capsys.readouterr().out)
    assert document.pop("lip_version") == __version__
    assert document == {"a": None, "b": [1.0, None], "c": {"d": None, "e": 2}}


def test_a_valid_checkpoint_with_a_name_near_the_limit(tmp_path: Path, problem) -> None:
    """Its sidecar name would pass 255 bytes: there can be none, so there is none to read."""
    long = tmp_path / ("a" * 250 + ".pt")
    long.write_bytes(problem["model"].read_bytes())
    assert run("inspect", long).exit_code == 0
    result = run("repair", long, "-f", problem["features"], "--k", 3, "-o", tmp_path / "short.pt")
    assert result.exit_code == 0, result.output


def test_a_huge_label_id_names_the_labels_file(tmp_path: Path, problem) -> None:
    labels = np.load(problem["labels"])
    labels[5] = 2**40
    np.save(tmp_path / "huge.npy", labels)
    result = run(
        "repair", problem["model"], "-f", problem["features"], "--labels", tmp_path / "huge.npy", "--k", 3
    )
    one_line(
        result,
        f"{tmp_path / 'huge.npy'}: holds class id {2**40}, but the widest layer taking 12 inputs has 10 "
        "classes",
    )


def test_a_lying_labels_header_in_lip_features_names_the_file(tmp_path: Path) -> None:
    from lip_cli.demo import demo_model

    model = demo_model()
    width = next(module for module in model.modules() if isinstance(module, torch.nn.Linear)).in_features
    np.save(tmp_path / "inputs.npy", np.zeros((10, width), dtype=np.float32))
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<i8", "fortran_order": False, "shape": (2**40,)})
    (tmp_path / "lie.npy").write_bytes(header.getvalue() + bytes(80))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    result = run(
        "features",
        tmp_path / "model.pt",
        "--model",
        "python:lip_cli.demo:demo_model",
        "--data",
        tmp_path / "inputs.npy",
        "--labels",
        tmp_path / "lie.npy",
        "--out",
        tmp_path / "x.npy",
    )
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert result.stderr.startswith(f"error: {tmp_path / 'lie.npy'}: not a readable .npy file")
    assert "out of memory" not in result.stderr
