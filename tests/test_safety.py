"""Nothing lost, nothing leaked: provenance, atomic writes under interrupts, corrupt inputs."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import catches, make_head, save_problem
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from lip_cli import checkpoint as checkpoint_module
from lip_cli.cli import app
from lip_cli.lip import DEFAULT_TARGETS
from lip_cli.render import repair as repair_view

runner = CliRunner(env={"COLUMNS": "200"})


def run(*args: object):
    return runner.invoke(app, [str(arg) for arg in args])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_pt_provenance_sidecar(tmp_path: Path, head) -> None:
    paths = save_problem(tmp_path, head)
    result = run("repair", paths["model"], "-f", paths["features"], "--k", 2)
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "model.lip.pt.lip.json").read_text())
    assert record["k"] == 2 and record["layer"] == "fc" and record["targets"] == DEFAULT_TARGETS
    assert record["input_sha256"] == sha256(paths["model"])
    assert record["features_sha256"] == sha256(paths["features"])
    assert record["k_selection"] == "given" and "labels.npy" in record["labels"]
    inspected = run("inspect", tmp_path / "model.lip.pt")
    assert "written by lip" in inspected.stdout and "k = 2" in inspected.stdout
    assert run("inspect", paths["model"], "--json").stdout.count('"provenance": null') == 1
    # a stale sidecar is never overwritten silently
    (tmp_path / "model.lip.pt").unlink()
    again = run("repair", paths["model"], "-f", paths["features"], "--k", 2)
    assert again.exit_code == 1 and "model.lip.pt.lip.json: already exists" in again.stderr


def test_safetensors_provenance_in_metadata(tmp_path: Path) -> None:
    head = make_head(n=100, q=6, l=3, seed=51)
    save_file(
        {"fc.weight": head.weight.float(), "fc.bias": head.bias.float()}, str(tmp_path / "m.safetensors")
    )
    np.savez(tmp_path / "f.npz", features=head.features.numpy(), labels=head.labels.numpy())
    assert run("repair", tmp_path / "m.safetensors", "-f", tmp_path / "f.npz", "--k", 1).exit_code == 0
    with safe_open(str(tmp_path / "m.lip.safetensors"), framework="pt") as handle:
        record = json.loads(handle.metadata()["lip"])
    assert record["k"] == 1 and record["input_sha256"] == sha256(tmp_path / "m.safetensors")
    assert json.loads(run("inspect", tmp_path / "m.lip.safetensors", "--json").stdout)["provenance"] == record


def test_unwritable_output_folder(tmp_path: Path, head, monkeypatch) -> None:
    paths = save_problem(tmp_path, head)
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda path, mode: False if Path(path) == locked else real_access(path, mode)
    )
    result = run("repair", paths["model"], "-f", paths["features"], "--k", 1, "-o", locked / "out.pt")
    assert result.exit_code == 1 and "folder" in result.stderr and "is not writable" in result.stderr
    assert list(locked.iterdir()) == []


def repair_failing_in(tmp_path: Path, head, monkeypatch, module, name: str, error: BaseException):
    """`lip repair --k 1` with `module.name` raising `error` (after writing a few bytes, when it is
    the torch file writer, torch_pickle.patch_storages): the result, and the folder's entries before
    the run."""
    paths = save_problem(tmp_path, head)
    before = sorted(os.listdir(tmp_path))

    def failing(*args) -> None:
        if len(args) == 3 and isinstance(args[2], Path):
            args[2].write_bytes(b"partial bytes")
        raise error

    monkeypatch.setattr(module, name, failing)
    return run("repair", paths["model"], "-f", paths["features"], "--k", 1), before


def test_failure_while_writing_leaves_nothing(tmp_path: Path, head, monkeypatch) -> None:
    result, before = repair_failing_in(
        tmp_path, head, monkeypatch, checkpoint_module.torch_pickle, "patch_storages", KeyboardInterrupt()
    )
    assert result.exit_code == 130 and "interrupted" in result.stderr
    assert sorted(os.listdir(tmp_path)) == before


def test_an_interrupt_after_the_write_names_what_was_written(tmp_path: Path, head, monkeypatch) -> None:
    result, _ = repair_failing_in(
        tmp_path, head, monkeypatch, repair_view, "render_repair", KeyboardInterrupt()
    )
    assert result.exit_code == 130
    written = [tmp_path / "model.lip.pt", tmp_path / "model.lip.pt.lip.json"]
    assert result.stderr == f"error: interrupted after writing {written[0]}, {written[1]}\n"
    assert all(path.exists() for path in written)
    again = run("inspect", tmp_path / "model.pt", "--json")  # the next command starts with a clean slate
    assert again.exit_code == 0


@pytest.mark.parametrize(
    "error", [MemoryError(), MemoryError("cannot allocate"), torch.OutOfMemoryError("CUDA out of memory")]
)
def test_out_of_memory_is_one_line_and_leaves_nothing(tmp_path: Path, head, monkeypatch, error) -> None:
    result, before = repair_failing_in(
        tmp_path, head, monkeypatch, checkpoint_module.torch_pickle, "patch_storages", error
    )
    assert result.exit_code == 1 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: out of memory")
    assert "nothing was written: a smaller --chunk-rows" in result.stderr
    assert sorted(os.listdir(tmp_path)) == before


def test_out_of_memory_after_the_write_names_what_was_written(tmp_path: Path, head, monkeypatch) -> None:
    result, _ = repair_failing_in(tmp_path, head, monkeypatch, repair_view, "render_repair", MemoryError())
    assert result.exit_code == 1 and f"wrote only {tmp_path / 'model.lip.pt'}" in result.stderr


def test_other_runtime_errors_are_not_taken_for_memory(tmp_path: Path, head, monkeypatch) -> None:
    result, _ = repair_failing_in(
        tmp_path, head, monkeypatch, checkpoint_module.torch_pickle, "patch_storages", RuntimeError("a bug")
    )
    assert result.exit_code != 0 and isinstance(result.exception, RuntimeError)


def interrupted_runs(tmp_path: Path, number: int, delays: tuple[float, ...]) -> int:
    """Send signal `number` to real runs after each delay: each ends cleanly (or finishes first),
    none leaves a partial file, the inputs stay as they were. Returns how many were interrupted."""
    rng = np.random.default_rng(0)
    features = rng.standard_normal((200_000, 64), dtype=np.float32)
    np.save(tmp_path / "features.npy", features)
    np.save(tmp_path / "labels.npy", rng.integers(0, 50, 200_000))
    torch.save({"fc.weight": torch.randn(50, 64)}, tmp_path / "model.pt")
    inputs = {name: sha256(tmp_path / name) for name in ("features.npy", "labels.npy", "model.pt")}
    command = [
        sys.executable,
        "-m",
        "lip_cli",
        "repair",
        str(tmp_path / "model.pt"),
        "-f",
        str(tmp_path / "features.npy"),
        "--k",
        "5",
        "--chunk-rows",
        "64",
        "--force",
    ]
    code, line = {signal.SIGINT: (130, "interrupted"), signal.SIGTERM: (143, "terminated")}[number]
    interrupted = 0
    for delay in delays:
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # a shell's background job starts with SIGINT ignored, and Python keeps it so
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        while not catches(process.pid, signal.SIGTERM) and process.poll() is None:
            time.sleep(0.001)  # lip's first line has run (see conftest.catches)
        time.sleep(delay)
        process.send_signal(number)
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode in (0, code), (process.returncode, stderr)
        assert "Traceback" not in stderr
        assert stdout == "" or (tmp_path / "model.lip.pt").exists()  # the report follows the write
        leftovers = [name for name in os.listdir(tmp_path) if name.startswith(".")]
        assert leftovers == []
        if process.returncode == code:
            interrupted += 1
            if (tmp_path / "model.lip.pt").exists():  # the interrupt came after the rename
                assert stderr.startswith(f"error: {line} after writing ") and "model.lip.pt" in stderr
            else:
                assert stderr.strip() == f"error: {line}; nothing was written"
            (tmp_path / "model.lip.pt").unlink(missing_ok=True)
        else:
            assert torch.load(tmp_path / "model.lip.pt", weights_only=True)["fc.weight"].shape == (50, 64)
    assert {name: sha256(tmp_path / name) for name in inputs} == inputs
    return interrupted


def test_sigint_during_a_run_leaves_nothing_behind(tmp_path: Path) -> None:
    """Start-up, the streaming pass, and (likely) after the end."""
    assert interrupted_runs(tmp_path, signal.SIGINT, (0.3, 0.8, 1.4, 3.5)) >= 1


def test_sigterm_ends_a_run_like_sigint(tmp_path: Path) -> None:
    """SIGTERM: exit 143, one line, no temporary file left, at start-up and during the pass."""
    assert interrupted_runs(tmp_path, signal.SIGTERM, (0.5, 1.4)) >= 1


def valid_files(folder: Path) -> dict[str, bytes]:
    head = make_head(n=40, q=6, l=3, seed=52)
    paths = save_problem(folder, head)
    save_file({"fc.weight": head.weight.float(), "fc.bias": head.bias.float()}, str(folder / "m.safetensors"))
    np.savez(folder / "f.npz", features=head.features.numpy(), labels=head.labels.numpy())
    torch.save({"features": head.features.float(), "labels": head.labels}, folder / "f.pt")
    save_file({"features": head.features.float(), "labels": head.labels}, str(folder / "f.safetensors"))
    names = {
        "model.pt": paths["model"],
        "m.safetensors": folder / "m.safetensors",
        "features.npy": paths["features"],
        "f.npz": folder / "f.npz",
        "f.pt": folder / "f.pt",
        "f.safetensors": folder / "f.safetensors",
    }
    return {name: path.read_bytes() for name, path in names.items()}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupt_files_give_one_line_errors(tmp_path_factory, data) -> None:
    folder = tmp_path_factory.mktemp("fuzz")
    files = valid_files(folder)
    name = data.draw(st.sampled_from(sorted(files)))
    content = bytearray(files[name])
    how = data.draw(st.sampled_from(["truncate", "flip", "random", "append"]))
    if how == "truncate":
        content = content[: data.draw(st.integers(0, len(content) - 1))]
    elif how == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            position = data.draw(st.integers(0, len(content) - 1))
            content[position] ^= 1 << data.draw(st.integers(0, 7))
    elif how == "random":
        content = bytearray(data.draw(st.binary(min_size=1, max_size=400)))
    else:
        content += data.draw(st.binary(min_size=1, max_size=64))
    (folder / name).write_bytes(bytes(content))
    is_model = name in ("model.pt", "m.safetensors")
    model = folder / name if is_model else folder / "model.pt"
    features = folder / ("features.npy" if is_model else name)
    before = set(os.listdir(folder))
    result = run("repair", model, "-f", features, "--k", 1, "--force", "--layer", "fc")
    assert result.exit_code in (0, 1), (name, how, result.output, result.exception)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    if result.exit_code == 1:
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
        assert set(os.listdir(folder)) == before


FLAKY_EXIT = """
import sys
from lip_cli import cli
from lip_cli.jobs import repair as repair_job


def interrupted_run(*args, **kwargs):
    # An interrupt that lands inside a string exec (dataclasses and namedtuples are built that way
    # during imports) sets CPython's "unhandled KeyboardInterrupt" flag; under `python -m`, a
    # process that then exits normally is ended by SIGINT (-2) instead of its exit code.
    try:
        exec("raise KeyboardInterrupt")
    except KeyboardInterrupt:
        pass
    raise KeyboardInterrupt


repair_job.repair_checkpoint = interrupted_run
sys.argv = ["lip", *sys.argv[1:]]
cli.main()
"""


def test_an_interrupt_exits_130_even_after_one_inside_an_exec(tmp_path: Path, head) -> None:
    """The flaky -2 of the SIGINT test, made deterministic: the exit code is still 130."""
    paths = save_problem(tmp_path, head)
    (tmp_path / "flaky").mkdir()
    (tmp_path / "flaky" / "__main__.py").write_text(FLAKY_EXIT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "flaky", "repair", paths["model"], "-f", paths["features"], "--k", "1"]
    done = subprocess.run(list(map(str, command)), capture_output=True, text=True, env=env, timeout=120)
    assert (done.returncode, done.stderr) == (130, "error: interrupted; nothing was written\n")
