"""Writes that cannot damage anything: special files never replaced, the output check held at the
moment of writing, outputs published together or not at all, every write failure one line.

Each case runs in the invariant harness of test_paths (every entry of the sandbox hashed before and
after: only declared outputs may change, a refusal is one line with exit 1 and changes nothing).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_head, save_problem
from safetensors.torch import save_file
from test_paths import changed, hf_folder, run, sandboxed, snapshot

from lip_cli import files, writes
from lip_cli import lip as lip_module
from lip_cli.demo import DemoSettings, demo_model, make_demo
from lip_cli.errors import LipError


@pytest.fixture
def sandbox(tmp_path: Path) -> Path:
    """work/ holds a .pt problem (and an HF folder), victim/ a file that must never change."""
    head = make_head(n=120, q=6, l=3, seed=3)
    (tmp_path / "work").mkdir()
    (tmp_path / "victim").mkdir()
    save_problem(tmp_path / "work", head)
    hf_folder(tmp_path / "work" / "hf", head)
    (tmp_path / "victim" / "secret.txt").write_text("not yours\n")
    return tmp_path


def repair_args(work: Path, output: Path, *extra: object) -> list[object]:
    return ["repair", work / "model.pt", "-f", work / "features.npy", "--k", 1, "-o", output, *extra]


def special(path: Path, kind: str) -> None:
    if kind == "fifo":
        os.mkfifo(path)
    else:
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(str(path))


def leftovers(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.startswith("."))


# D1: a FIFO, socket or device at an output is never replaced, not even with --force


@pytest.mark.parametrize("kind", ["fifo", "socket"])
def test_force_never_replaces_a_special_file_at_an_output(sandbox: Path, kind: str) -> None:
    work = sandbox / "work"
    special(work / "out.pt", kind)
    special(work / "plot.png", kind)
    shown = "a FIFO" if kind == "fifo" else "a socket"
    sandboxed(sandbox, repair_args(work, work / "out.pt", "--force"), [], 1, f"out.pt: is {shown}")
    args = ["inspect", work / "model.pt", "--plot", work / "plot.png", "--force"]
    sandboxed(sandbox, args, [], 1, f"plot.png: is {shown}")
    args = ["repair", work / "model.pt", "-f", work / "features.npy", "--k", 1, "--plot", work / "plot.png"]
    sandboxed(sandbox, [*args, "--force"], [], 1, f"plot.png: is {shown}")
    assert all(not (work / name).is_file() for name in ("out.pt", "plot.png"))


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")
def test_force_never_replaces_a_device_node(sandbox: Path) -> None:
    work = sandbox / "work"
    os.mknod(work / "null.png", 0o666 | 0o020000, os.makedev(1, 3))
    args = ["inspect", work / "model.pt", "--plot", work / "null.png", "--force"]
    sandboxed(sandbox, args, [], 1, "null.png: is a character device")


def test_a_fifo_at_a_feature_cache_or_a_demo_file_is_refused(sandbox: Path) -> None:
    work = sandbox / "work"
    (work / "cache").mkdir()
    os.mkfifo(work / "cache" / "f.labels.npy")
    np.save(work / "inputs.npy", np.zeros((4, 64), dtype=np.float32))
    args = ["features", work / "model.pt", "--model", "python:lip_cli.demo:demo_model", "--data"]
    args += [
        work / "inputs.npy",
        "--labels",
        work / "labels.npy",
        "--out",
        work / "cache" / "f.npy",
        "--force",
    ]
    sandboxed(sandbox, args, [], 1, "f.labels.npy: is a FIFO")
    (work / "demo").mkdir()
    os.mkfifo(work / "demo" / "model.pt")
    sandboxed(sandbox, ["demo", work / "demo", "--force"], [], 1, "model.pt: is a FIFO")


# D4: the check holds at the moment of writing


def during_the_pass(monkeypatch, action) -> None:
    """Run `action` while `lip repair` computes, after its path check."""
    real = lip_module.repair

    def repair(*args, **kwargs):
        action()
        return real(*args, **kwargs)

    monkeypatch.setattr(lip_module, "repair", repair)


def test_a_file_that_appears_at_the_output_during_the_run_is_kept(sandbox: Path, monkeypatch) -> None:
    work = sandbox / "work"
    during_the_pass(monkeypatch, lambda: (work / "out.pt").write_text("user data\n"))
    result = run(*repair_args(work, work / "out.pt"))
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.output
    assert "out.pt: appeared while lip ran" in result.stderr and "nothing was written" in result.stderr
    assert (work / "out.pt").read_text() == "user data\n"
    assert not (work / "out.pt.lip.json").exists() and leftovers(work) == []


def test_a_folder_that_appears_at_an_hf_output_during_the_run_is_kept(sandbox: Path, monkeypatch) -> None:
    work = sandbox / "work"

    def user_folder() -> None:
        (work / "out").mkdir()
        (work / "out" / "thesis.tex").write_text("years of work\n")

    during_the_pass(monkeypatch, user_folder)
    result = run("repair", work / "hf", "-f", work / "features.npy", "--k", 1, "-o", work / "out")
    assert result.exit_code == 1 and "out: appeared while lip ran" in result.stderr, result.output
    assert os.listdir(work / "out") == ["thesis.tex"] and leftovers(work) == []


def test_with_force_only_the_entry_seen_at_the_start_is_replaced(sandbox: Path, monkeypatch) -> None:
    work = sandbox / "work"
    (work / "out.pt").write_text("old output\n")

    def swap() -> None:  # another program puts a new file there: not what --force was given for
        (work / "out.pt").unlink()
        (work / "out.pt").write_text("new user data\n")

    during_the_pass(monkeypatch, swap)
    result = run(*repair_args(work, work / "out.pt", "--force"))
    assert result.exit_code == 1 and "out.pt: changed while lip ran" in result.stderr
    assert (work / "out.pt").read_text() == "new user data\n" and leftovers(work) == []


def test_two_writers_to_one_output_exactly_one_wins_and_nothing_mixes(tmp_path: Path) -> None:
    """Both checked the output while it was absent; the first to publish wins, the second is refused
    with its pair (checkpoint + provenance) unpublished."""
    out = tmp_path / "out.pt"
    pair = (out, tmp_path / "out.pt.lip.json")
    files.check_paths([], [files.Output(path) for path in pair], force=False)
    first, second = contextlib.ExitStack(), contextlib.ExitStack()
    for stack, text in ((first, "k=7"), (second, "k=3")):
        for temporary in stack.enter_context(writes.atomic_outputs(*pair)):
            temporary.write_text(text)
    first.close()  # the first run publishes its pair
    with pytest.raises(LipError, match="out.pt: appeared while lip ran"):
        second.close()
    assert [path.read_text() for path in pair] == ["k=7", "k=7"]
    assert sorted(os.listdir(tmp_path)) == ["out.pt", "out.pt.lip.json"]


def test_two_concurrent_runs_to_one_output_exactly_one_succeeds(sandbox: Path) -> None:
    """Real processes: whichever order they check and publish in, one run writes its own checkpoint
    with its own provenance, the other fails with one line."""
    work = sandbox / "work"
    expected = {}
    for k in (1, 2):  # what each run alone writes
        assert run(*repair_args(work, work / f"alone{k}.pt", "--k", k)).exit_code == 0
        expected[k] = torch.load(work / f"alone{k}.pt", weights_only=True)["fc.weight"]
    command = [sys.executable, "-m", "lip_cli", *map(str, repair_args(work, work / "out.pt"))]
    runs = [subprocess.Popen([*command, "--k", k], stderr=subprocess.PIPE, text=True) for k in ("1", "2")]
    results = [(process.wait(timeout=120), process.stderr.read()) for process in runs]
    for process in runs:
        process.stderr.close()
    assert sorted(code for code, _ in results) == [0, 1], results
    failed = next(stderr for code, stderr in results if code == 1)
    assert failed.count("\n") == 1 and failed.startswith("error: ") and "out.pt" in failed, failed
    assert "already exists" in failed or "appeared while lip ran" in failed, failed
    record = json.loads((work / "out.pt.lip.json").read_text())
    weight = torch.load(work / "out.pt", weights_only=True)["fc.weight"]
    assert torch.equal(weight, expected[record["k"]])  # the checkpoint and its provenance: one run's
    assert leftovers(work) == []


def test_k_auto_with_an_existing_output_refuses_only_when_it_writes(tmp_path: Path) -> None:
    head = make_head(n=400, q=16, l=8, seed=21)  # LAP helps a lot: k is confirmed
    paths = save_problem(tmp_path, head)
    val = make_head(n=200, q=16, l=8, seed=99)
    np.savez(tmp_path / "val.npz", features=val.features.numpy(), labels=val.labels.numpy())
    (tmp_path / "model.lip.pt").write_text("an earlier output\n")
    before = snapshot(tmp_path)
    result = run(
        "repair",
        paths["model"],
        "-f",
        paths["features"],
        "--val-features",
        tmp_path / "val.npz",
        "--k",
        "auto",
        "--targets",
        "paper",  # a least-squares head: the paper's targets repair it
    )
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and lines[0].startswith("warning: ") and "already exists" in lines[0]
    assert lines[-1].startswith("error: ") and "model.lip.pt: already exists; pass --force" in lines[-1]
    assert "nothing was written" in lines[-1]
    assert changed(before, snapshot(tmp_path)) == set()


# D3: a folder replaced with --force is exchanged in one step


def lip_folder(sandbox: Path, k: int) -> None:
    work = sandbox / "work"
    args = ["repair", work / "hf", "-f", work / "features.npy", "--k", k, "-o", work / "out", "--force"]
    assert run(*args).exit_code == 0


@pytest.mark.parametrize("where", ["_exchange", "_remove"])
def test_an_interrupt_while_a_folder_is_replaced_leaves_old_or_new_and_says_which(
    sandbox: Path, monkeypatch, where: str
) -> None:
    work = sandbox / "work"
    lip_folder(sandbox, 1)
    (work / "out" / "extra").mkdir()
    real = getattr(writes, where)

    def interrupted(*args):  # Ctrl-C in the middle of the swap, or of removing the old folder
        signal.raise_signal(signal.SIGINT)
        return real(*args)

    monkeypatch.setattr(writes, where, interrupted)
    args = ["repair", work / "hf", "-f", work / "features.npy", "--k", 2, "-o", work / "out", "--force"]
    # Python's own Ctrl-C handler: a shell's background job (a CI runner's, say) starts with SIGINT
    # ignored, and Python keeps it so, which would make the raised signal a no-op
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        result = run(*args)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert result.exit_code == 130 and result.stderr == f"error: interrupted after writing {work / 'out'}\n"
    assert json.loads((work / "out" / "lip.json").read_text())["k"] == 2
    assert not (work / "out" / "extra").exists() and leftovers(work) == []


# D8 / D10: what is written together lands together


def test_a_provenance_that_cannot_be_written_leaves_no_checkpoint(sandbox: Path, monkeypatch) -> None:
    work = sandbox / "work"
    real = Path.write_text

    def full(self, *args, **kwargs):
        if self.name.startswith(".out.pt.lip.json."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    sandboxed(sandbox, repair_args(work, work / "out.pt"), [], 1, "out.pt: cannot be written (No space left")


@pytest.mark.parametrize("existing", [False, True])
def test_a_provenance_that_cannot_be_put_in_place_takes_the_checkpoint_back(
    sandbox: Path, monkeypatch, existing: bool
) -> None:
    work = sandbox / "work"
    if existing:  # an earlier output replaced with --force comes back as it was
        assert run(*repair_args(work, work / "out.pt", "--force")).exit_code == 0
    real = writes.publish

    def immutable(temporary: Path, output: Path) -> bool:
        if output.name.endswith(".lip.json"):
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), str(output))
        return real(temporary, output)

    monkeypatch.setattr(writes, "publish", immutable)
    args = repair_args(work, work / "out.pt", "--k", 2, "--force")
    sandboxed(sandbox, args, [], 1, "out.pt.lip.json: cannot be written (Operation not permitted)")


def test_a_shard_named_like_the_record_is_never_overwritten(sandbox: Path) -> None:
    work = sandbox / "work"
    head = make_head(n=120, q=6, l=3, seed=3)
    folder = work / "odd"
    folder.mkdir()
    save_file({"fc.weight": head.weight.float(), "fc.bias": head.bias.float()}, str(folder / "lip.json"))
    index = {"metadata": {}, "weight_map": {"fc.weight": "lip.json", "fc.bias": "lip.json"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    args = ["repair", folder, "-f", work / "features.npy", "--k", 1, "-o", work / "o1"]
    sandboxed(sandbox, args, [], 1, "names a weight file lip.json")


# D11: --dry-run writes nothing


def test_dry_run_with_a_plot_is_refused_before_any_work(sandbox: Path) -> None:
    work = sandbox / "work"
    before = snapshot(sandbox)
    args = ["repair", work / "model.pt", "-f", work / "features.npy", "--k", 1, "--dry-run"]
    result = run(*args, "--plot", work / "p.png")
    assert result.exit_code == 2 and "--dry-run writes nothing" in " ".join(result.output.split())
    assert changed(before, snapshot(sandbox)) == set()


# D2: an interrupt while torch writes a zip archive


def test_an_interrupt_inside_the_torch_writer_stays_an_interrupt(sandbox: Path, monkeypatch) -> None:
    """A library's clean-up that raises its own RuntimeError while the interrupt unwinds (as torch's
    zip writer did from __exit__): still an interrupt."""
    from lip_cli import torch_pickle

    work = sandbox / "work"

    def save(source, updates, destination) -> None:
        destination.write_bytes(b"PK\x03\x04partial")
        try:
            raise KeyboardInterrupt
        finally:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 896 vs 790")

    monkeypatch.setattr(torch_pickle, "patch_storages", save)
    before = snapshot(sandbox)
    result = run(*repair_args(work, work / "out.pt"))
    assert result.exit_code == 130 and result.stderr == "error: interrupted; nothing was written\n"
    assert changed(before, snapshot(sandbox)) == set()


def test_a_real_signal_while_a_zip_checkpoint_is_written(tmp_path: Path) -> None:
    """SIGTERM as the temporary checkpoint appears: without the fix, 6 of 6 such runs ended with
    exit 1 and torch's RuntimeError (Ctrl-C inside torch.save is the test above)."""
    torch.manual_seed(0)
    state = {
        "body.weight": torch.randn(10_000_000),
        "fc.weight": torch.randn(10, 32),
        "fc.bias": torch.zeros(10),
    }
    torch.save(state, tmp_path / "big.pt")
    np.save(tmp_path / "f.npy", np.random.default_rng(0).standard_normal((400, 32), dtype=np.float32))
    np.save(tmp_path / "labels.npy", np.random.default_rng(1).integers(0, 10, 400))
    command = ["repair", tmp_path / "big.pt", "-f", tmp_path / "f.npy", "--k", 5, "-o", tmp_path / "out.pt"]
    process = subprocess.Popen(
        [sys.executable, "-m", "lip_cli", *map(str, command)], stderr=subprocess.PIPE, text=True
    )
    while process.poll() is None and not any(name.endswith(".tmp") for name in os.listdir(tmp_path)):
        pass  # the temporary checkpoint exists: torch.save is (about to be) writing it
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode in (0, 143) and "Traceback" not in stderr, stderr
    if process.returncode == 143 and (tmp_path / "out.pt").exists():
        assert stderr.startswith("error: terminated after writing ") and stderr.count("\n") == 1
    elif process.returncode == 143:
        assert stderr == "error: terminated; nothing was written\n"
    assert leftovers(tmp_path) == []


# D13: inputs and outputs compared by device and inode


def in_private_mounts(script: str, cwd: Path) -> subprocess.CompletedProcess:
    """`script` in its own mount namespace as root, or skip where that is not allowed."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("no private mount namespace here")
    lip = f"{sys.executable} -m lip_cli"
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", textwrap.dedent(script).replace("LIP", lip)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )


def test_a_bind_mount_of_the_input_folder_is_the_input_folder(sandbox: Path) -> None:
    work = sandbox / "work"
    (work / "mnt").mkdir()
    before = snapshot(sandbox)
    done = in_private_mounts(
        """
        mount --bind hf mnt || exit 99
        LIP repair hf -f features.npy --k 1 -o mnt/out
        """,
        work,
    )
    if done.returncode == 99:
        pytest.skip("bind mounts are not allowed here")
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "lies inside the input folder" in done.stderr
    assert changed(before, snapshot(sandbox)) == set()


# D9: every writer, on a full, read-only or refusing file system


def npy_features(work: Path) -> list[object]:
    torch.save({"state_dict": demo_model().state_dict()}, work / "demo.pt")
    np.save(work / "inputs.npy", np.zeros((8, 64), dtype=np.float32))
    np.save(work / "targets.npy", np.zeros(8, dtype=np.int64))
    args = ["features", work / "demo.pt", "--model", "python:lip_cli.demo:demo_model", "--data"]
    return [*args, work / "inputs.npy", "--labels", work / "targets.npy", "--out", work / "cache" / "f.npy"]


WRITERS = {
    "pt": lambda work: repair_args(work, work / "out.pt"),
    "safetensors": lambda work: [
        "repair",
        work / "hf" / "model.safetensors",
        "-f",
        work / "features.npy",
        "--k",
        1,
        "-o",
        work / "o.safetensors",
    ],
    "hf-folder": lambda work: [
        "repair",
        work / "hf",
        "-f",
        work / "features.npy",
        "--k",
        1,
        "-o",
        work / "out",
    ],
    "png": lambda work: ["inspect", work / "model.pt", "--plot", work / "p.png", "--json"],
    "features": npy_features,
}
FAULTS = {"ENOSPC": errno.ENOSPC, "EROFS": errno.EROFS, "EPERM": errno.EPERM}


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("writer", WRITERS)
def test_a_failing_file_system_is_one_line_for_every_writer(
    sandbox: Path, monkeypatch, writer: str, fault: str
) -> None:
    work = sandbox / "work"
    (work / "cache").mkdir()
    if writer == "png":
        pytest.importorskip("matplotlib")
    args = WRITERS[writer](work)
    number = FAULTS[fault]
    if fault == "ENOSPC":  # the data does not fit: fsync (or the write before it) fails
        target, name = os, "fsync"
    else:  # the file system refuses to put the file in place
        target, name = writes, "_rename_no_replace"

    def failing(*args, **kwargs):
        raise OSError(number, os.strerror(number), *([str(args[-1])] if name != "fsync" else []))

    monkeypatch.setattr(target, name, failing)
    sandboxed(sandbox, args, [], 1, f"cannot be written ({os.strerror(number)}); nothing was written")


@pytest.mark.parametrize("fault", FAULTS)
def test_a_failing_file_system_leaves_no_demo_folder(tmp_path: Path, monkeypatch, fault: str) -> None:
    number = FAULTS[fault]

    def failing(*args, **kwargs):
        raise OSError(number, os.strerror(number))

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(LipError, match=f"cannot be written .{os.strerror(number)}.; nothing was written"):
        make_demo(
            tmp_path / "a" / "demo", settings=DemoSettings(train_samples=200, val_samples=100, epochs=1)
        )
    assert os.listdir(tmp_path) == []


FULL_TMPFS_RUNS = """
import json, sys
from typer.testing import CliRunner
from lip_cli.cli import app
features = ["features", "demo.pt", "--model", "python:lip_cli.demo:demo_model", "--data", "inputs.npy"]
runs = [["repair", "model.pt", "-f", "features.npy", "--k", "1", "-o", "full/o.pt"],
        ["repair", "hf", "-f", "features.npy", "--k", "1", "-o", "full/out"],
        ["repair", "hf/model.safetensors", "-f", "features.npy", "--k", "1", "-o", "full/o.safetensors"],
        [*features, "--labels", "targets.npy", "--out", "full/f.npy"],
        ["inspect", "model.pt", "--json", "--plot", "full/p.png"]]
for args in runs[: int(sys.argv[1])]:
    result = CliRunner().invoke(app, args)
    print(json.dumps([result.exit_code, result.stderr]))
"""


def test_a_full_tmpfs_is_one_line_and_leaves_nothing(sandbox: Path) -> None:
    """A real file system with no room left, for the checkpoint, the model folder and the figure."""
    work = sandbox / "work"
    (work / "full").mkdir()
    (work / "runs.py").write_text(FULL_TMPFS_RUNS)
    npy_features(work)  # demo.pt, inputs.npy and targets.npy for lip features
    names = ["o.pt", "out", "o.safetensors", "f.npy", "p.png"][: 5 if _has_matplotlib() else 4]
    done = in_private_mounts(
        f"""
        mount -t tmpfs -o size=64k tmpfs full || exit 99
        head -c 100000 /dev/zero > full/filler 2>/dev/null  # fills it: the last block too
        {sys.executable} runs.py {len(names)}
        ls -A full
        """,
        work,
    )
    if done.returncode == 99:
        pytest.skip("tmpfs cannot be mounted here")
    lines = done.stdout.strip().splitlines()
    assert len(lines) == len(names) + 1 and lines[-1] == "filler", done.stdout + done.stderr
    for line, name in zip(lines[:-1], names, strict=True):
        code, message = json.loads(line)
        assert code == 1 and message.count("\n") == 1 and message.startswith("error: "), line
        assert f"full/{name}: cannot be written (No space left on device); nothing was written" in message


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("renameat2", [True, False])
def test_publication_holds_with_and_without_renameat2(tmp_path: Path, monkeypatch, renameat2: bool) -> None:
    """The portable fallback (link(2), a move aside with interrupts held) keeps the same rules."""
    if not renameat2:
        monkeypatch.setattr(writes, "_renameat2", lambda source, target, flags: False)
    file, folder = tmp_path / "out.pt", tmp_path / "out"
    file.write_text("old")
    folder.mkdir()
    (folder / "lip.json").write_text("{}")
    files.check_paths([], [files.Output(file), files.Output(folder, folder=True)], force=True)
    with writes.atomic_output(file) as temporary:
        temporary.write_text("new")
    with writes.atomic_folder(folder) as temporary:
        (temporary / "lip.json").write_text('{"new": 1}')
    assert file.read_text() == "new" and json.loads((folder / "lip.json").read_text()) == {"new": 1}
    assert sorted(os.listdir(tmp_path)) == ["out", "out.pt"]
    file.unlink()
    files.check_paths([], [files.Output(file)], force=True)
    with pytest.raises(LipError, match="appeared while lip ran"), writes.atomic_output(file) as temporary:
        file.write_text("the user's")
        temporary.write_text("lip's")
    files.check_paths([], [files.Output(file)], force=True)
    with pytest.raises(LipError, match="changed while lip ran"), writes.atomic_output(file) as temporary:
        file.unlink()
        file.write_text("another program's, longer")
    assert file.read_text() == "another program's, longer" and sorted(os.listdir(tmp_path)) == [
        "out",
        "out.pt",
    ]
