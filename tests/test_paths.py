"""The path policy: nothing lost, nothing written outside what a command declares as its outputs.

Each case builds a hostile layout in a sandbox (tmp_path) beside a `victim/` folder, runs a command
in-process, and compares every entry of the sandbox (file contents, link targets, kinds) before and
after: only the declared outputs may change, and a refusal is one line with exit 1.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_head, save_problem
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from typer.testing import CliRunner

from lip_cli import files
from lip_cli.cli import app
from lip_cli.digests import BackgroundDigests, Cancelled
from lip_cli.errors import LipError

runner = CliRunner(env={"COLUMNS": "200"})


def run(*args: object):
    return runner.invoke(app, [str(arg) for arg in args])


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under `root`, links not followed and special files not read."""
    entries = {}
    for top, dirs, names in os.walk(root):
        for name in dirs + names:
            path = Path(top) / name
            mode = path.lstat().st_mode
            if path.is_symlink():
                entries[str(path.relative_to(root))] = "link " + os.readlink(path)
            elif os.path.isfile(path):
                entries[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                entries[str(path.relative_to(root))] = "dir" if os.path.isdir(path) else f"mode {mode:o}"
    return entries


def changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {name for name in before.keys() | after.keys() if before.get(name) != after.get(name)}


def declared(names: set[str], outputs: list[str]) -> bool:
    """Whether every changed entry is a declared output or lies inside one (a folder output)."""
    return all(any(name == out or name.startswith(out + os.sep) for out in outputs) for name in names)


def sandboxed(root: Path, args: list[object], outputs: list[str], exit_code: int, message: str = ""):
    """Run `lip args` and check the invariant: exit code, one-line error, only `outputs` changed."""
    before = snapshot(root)
    result = run(*args)
    after = snapshot(root)
    assert result.exit_code == exit_code, (result.exit_code, result.output)
    if exit_code == 1:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert message in lines[0], lines[0]
        assert changed(before, after) == set(), changed(before, after)
    else:
        assert declared(changed(before, after), outputs), (changed(before, after), outputs)
    return result


@pytest.fixture
def sandbox(tmp_path: Path) -> Path:
    """work/ holds a .pt problem, victim/ a file that must never change."""
    (tmp_path / "work").mkdir()
    (tmp_path / "victim").mkdir()
    save_problem(tmp_path / "work", make_head(n=120, q=6, l=3, seed=3))
    (tmp_path / "victim" / "secret.txt").write_text("not yours\n")
    return tmp_path


def hf_folder(folder: Path, head, sharded: bool = False) -> Path:
    """A Hugging Face folder: config.json with model.safetensors, or two shards and an index."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"num_labels": head.weight.shape[0]}))
    body = {"body.weight": torch.randn(head.weight.shape[1], 7)}
    fc = {"fc.weight": head.weight.float(), "fc.bias": head.bias.float()}
    if not sharded:
        save_file(body | fc, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    save_file(body, str(folder / "model-1.safetensors"), metadata={"format": "pt"})
    save_file(fc, str(folder / "model-2.safetensors"), metadata={"format": "pt"})
    weight_map = {"body.weight": "model-1.safetensors", "fc.weight": "model-2.safetensors"}
    weight_map["fc.bias"] = "model-2.safetensors"
    write_index(folder, weight_map)
    return folder


def write_index(folder: Path, weight_map: dict[str, str]) -> None:
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.fixture
def hf_sandbox(tmp_path: Path) -> Path:
    """work/hf (sharded) with work/features.npy and labels.npy; victim/ holds a copy of a shard."""
    head = make_head(n=120, q=6, l=3, seed=4)
    (tmp_path / "victim").mkdir()
    hf_folder(tmp_path / "work" / "hf", head, sharded=True)
    np.save(tmp_path / "work" / "features.npy", head.features.numpy().astype(np.float32))
    np.save(tmp_path / "work" / "labels.npy", head.labels.numpy())
    hf_folder(tmp_path / "victim" / "other", head)
    (tmp_path / "victim" / "secret.txt").write_text("not yours\n")
    return tmp_path


def repair_hf(root: Path, *extra: object) -> list[object]:
    work = root / "work"
    return ["repair", work / "hf", "-f", work / "features.npy", "--k", 1, "-o", work / "out", *extra]


# item 1: index entries stay inside their folder


@pytest.mark.parametrize("entry", ["../../victim/other/model.safetensors", "ABSOLUTE", "sub/../../x"])
def test_index_entry_outside_the_folder_is_refused(hf_sandbox: Path, entry: str) -> None:
    target = str(hf_sandbox / "victim" / "other" / "model.safetensors") if entry == "ABSOLUTE" else entry
    folder = hf_sandbox / "work" / "hf"
    write_index(folder, {"body.weight": "model-1.safetensors", "fc.weight": target, "fc.bias": target})
    sandboxed(hf_sandbox, repair_hf(hf_sandbox), [], 1, "points outside the folder")


def test_index_entry_linking_out_is_refused(hf_sandbox: Path) -> None:
    folder = hf_sandbox / "work" / "hf"
    (folder / "model-2.safetensors").unlink()
    (folder / "model-2.safetensors").symlink_to(hf_sandbox / "victim" / "other" / "model.safetensors")
    sandboxed(hf_sandbox, repair_hf(hf_sandbox), [], 1, "is a link out of the folder")
    sandboxed(hf_sandbox, ["inspect", folder], [], 1, "is a link out of the folder")


def test_hub_cache_snapshot_links_to_its_blobs_are_read(tmp_path: Path) -> None:
    """The Hugging Face cache keeps files in blobs/ and links to them from snapshots/<revision>/."""
    head = make_head(n=120, q=6, l=3, seed=5)
    repo = tmp_path / "models--x--y"
    staging = hf_folder(tmp_path / "staging", head)
    (repo / "blobs").mkdir(parents=True)
    snapshot_folder = repo / "snapshots" / "abc123"
    snapshot_folder.mkdir(parents=True)
    for index, name in enumerate(sorted(os.listdir(staging))):
        (staging / name).rename(repo / "blobs" / f"blob{index}")
        (snapshot_folder / name).symlink_to(Path("../../blobs") / f"blob{index}")
    np.save(tmp_path / "features.npy", head.features.numpy().astype(np.float32))
    np.save(tmp_path / "labels.npy", head.labels.numpy())
    result = sandboxed(
        tmp_path,
        ["repair", snapshot_folder, "-f", tmp_path / "features.npy", "--k", 1, "-o", tmp_path / "out"],
        ["out"],
        0,
    )
    assert result.exit_code == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "lip.json", "model.safetensors"]
    assert not any(path.is_symlink() for path in (tmp_path / "out").iterdir())


# item 3: copying a folder never follows a link out of it, never reads a special file


@pytest.mark.parametrize("kind", ["dev-zero", "secret", "folder", "dot", "fifo", "dangling"])
def test_hostile_entries_of_a_copied_folder_are_refused(hf_sandbox: Path, kind: str) -> None:
    folder = hf_sandbox / "work" / "hf"
    entry = folder / "extra"
    if kind == "dev-zero":
        entry.symlink_to("/dev/zero")
    elif kind == "secret":
        entry.symlink_to(hf_sandbox / "victim" / "secret.txt")
    elif kind == "folder":
        entry.symlink_to(hf_sandbox / "victim")
    elif kind == "dot":
        entry.symlink_to(".")
    elif kind == "fifo":
        os.mkfifo(entry)
    else:
        entry.symlink_to(hf_sandbox / "nowhere")
    message = {"folder": "link to a folder", "dot": "link to a folder", "fifo": "is a FIFO"}
    message |= {"dangling": "is a link out of the folder", "secret": "is a link out of the folder"}
    expected = message.get(kind, "is a link out of the folder")
    sandboxed(hf_sandbox, repair_hf(hf_sandbox), [], 1, expected)


def test_links_inside_a_copied_folder_are_copied_as_files(hf_sandbox: Path) -> None:
    folder = hf_sandbox / "work" / "hf"
    (folder / "sub").mkdir()
    (folder / "sub" / "notes.txt").write_text("kept\n")
    (folder / "notes-link.txt").symlink_to("sub/notes.txt")
    sandboxed(hf_sandbox, repair_hf(hf_sandbox), ["work/out"], 0)
    out = hf_sandbox / "work" / "out"
    assert (out / "notes-link.txt").read_text() == "kept\n" and not (out / "notes-link.txt").is_symlink()
    assert (out / "sub" / "notes.txt").read_text() == "kept\n"


# items 2 and 5: outputs never hold, equal or lie inside an input, nor another output


def test_output_folder_holding_the_inputs_is_refused(hf_sandbox: Path) -> None:
    (hf_sandbox / "work" / "thesis.tex").write_text("years of work\n")
    work = hf_sandbox / "work"
    args = ["repair", work / "hf", "-f", work / "features.npy", "--k", 1, "-o", work, "--force"]
    sandboxed(hf_sandbox, args, [], 1, "would hold the input")


def test_output_dot_from_inside_the_folder_is_refused(hf_sandbox: Path, monkeypatch) -> None:
    monkeypatch.chdir(hf_sandbox / "work")
    args = ["repair", "hf", "-f", "features.npy", "--k", 1, "-o", ".", "--force"]
    sandboxed(hf_sandbox, args, [], 1, "would hold the input")


def test_output_inside_the_input_folder_is_refused(hf_sandbox: Path) -> None:
    work = hf_sandbox / "work"
    args = ["repair", work / "hf", "-f", work / "features.npy", "--k", 1, "-o", work / "hf" / "out"]
    sandboxed(hf_sandbox, args, [], 1, "lies inside the input folder")


@pytest.mark.parametrize("content", ["empty", "lip", "other"])
def test_force_replaces_only_an_empty_or_lip_folder(hf_sandbox: Path, content: str) -> None:
    out = hf_sandbox / "work" / "out"
    out.mkdir()
    if content == "lip":
        (out / "lip.json").write_text("{}")
        (out / "model.safetensors").write_text("old")
    elif content == "other":
        (out / "photos.zip").write_text("irreplaceable")
    if content == "other":
        sandboxed(hf_sandbox, repair_hf(hf_sandbox, "--force"), [], 1, "lip did not write")
    else:
        sandboxed(hf_sandbox, repair_hf(hf_sandbox, "--force"), ["work/out"], 0)
        assert json.loads((out / "lip.json").read_text())["k"] == 1


PT_OUTPUTS = {"--output": "out.pt", "--plot": "plot.png"}


def pt_args(work: Path, outputs: dict[str, str], *extra: object) -> list[object]:
    args: list[object] = ["repair", work / "model.pt", "-f", work / "features.npy", "--k", 1]
    args += ["--labels", work / "features.labels.npy", "--val-features", work / "val.npy"]
    args += ["--val-labels", work / "val_labels.npy"]
    for option, name in outputs.items():
        args += [option, work / name]
    return args + list(extra)


def add_validation(work: Path) -> None:
    head = make_head(n=60, q=6, l=3, seed=6)
    np.save(work / "val.npy", head.features.numpy().astype(np.float32))
    np.save(work / "val_labels.npy", head.labels.numpy())


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_colliding_outputs_are_refused_and_nothing_changes(tmp_path_factory, data) -> None:
    """Any output option aimed at any input or at another output: exit 1, the sandbox unchanged."""
    root = tmp_path_factory.mktemp("collide")
    work = root / "work"
    work.mkdir()
    save_problem(work, make_head(n=80, q=6, l=3, seed=7))
    add_validation(work)
    option = data.draw(st.sampled_from(sorted(PT_OUTPUTS)))
    inputs = ["model.pt", "features.npy", "features.labels.npy", "val.npy", "val_labels.npy"]
    other_outputs = [name for key, name in PT_OUTPUTS.items() if key != option] + ["out.pt.lip.json"]
    target = data.draw(st.sampled_from(inputs + other_outputs + ["."]))
    outputs = dict(PT_OUTPUTS) | {option: target}
    sandboxed(root, pt_args(work, outputs, "--force"), [], 1)


def test_distinct_outputs_are_written(sandbox: Path) -> None:
    pytest.importorskip("matplotlib")
    work = sandbox / "work"
    add_validation(work)
    outputs = ["work/out.pt", "work/out.pt.lip.json", "work/plot.png"]
    sandboxed(sandbox, pt_args(work, PT_OUTPUTS, "--force-write"), outputs, 0)  # k = 1 is refused without


def test_output_suffix_must_match_the_format(sandbox: Path) -> None:
    work = sandbox / "work"
    args = ["repair", work / "model.pt", "-f", work / "features.npy", "--k", 1, "-o", work / "x.safetensors"]
    sandboxed(sandbox, args, [], 1, "written as .pt or .pth or .ckpt or .bin or .tar or .pkl; give it")


def test_a_safetensors_output_keeps_its_ending(sandbox: Path) -> None:
    work = sandbox / "work"
    state = torch.load(work / "model.pt", weights_only=True)
    save_file({key: value.contiguous() for key, value in state.items()}, str(work / "m.safetensors"))
    args = ["repair", work / "m.safetensors", "-f", work / "features.npy", "--k", 1, "-o", work / "x.pt"]
    sandboxed(sandbox, args, [], 1, "written as .safetensors")


def test_a_torch_output_may_take_any_framework_name(sandbox: Path) -> None:
    work = sandbox / "work"
    args = ["repair", work / "model.pt", "-f", work / "features.npy", "--k", 1, "-o", work / "out.ckpt"]
    sandboxed(sandbox, args, ["work/out.ckpt", "work/out.ckpt.lip.json"], 0)


def test_features_labels_written_onto_an_input_are_refused(sandbox: Path) -> None:
    """--out x.npy writes x.labels.npy: never the labels it reads, not even with --force."""
    work = sandbox / "work"
    np.save(work / "inputs.npy", np.zeros((4, 64), dtype=np.float32))
    args = ["features", work / "model.pt", "--model", "python:lip_cli.demo:demo_model"]
    args += [
        "--data",
        work / "inputs.npy",
        "--labels",
        work / "features.labels.npy",
        "--out",
        work / "features.npy",
    ]
    sandboxed(sandbox, [*args, "--force"], [], 1, "features.labels.npy: output is the same file as an input")


@pytest.mark.parametrize("command", ["inspect", "compare"])
def test_plot_onto_an_input_is_refused(sandbox: Path, command: str) -> None:
    model = sandbox / "work" / "model.pt"
    args = [command, model] + ([model] if command == "compare" else []) + ["--plot", model, "--force"]
    sandboxed(sandbox, args, [], 1, "same file as an input")


# links as outputs: replaced with --force, never written through


def test_dangling_link_output_needs_force_and_is_replaced_not_followed(sandbox: Path) -> None:
    work = sandbox / "work"
    (work / "out.pt").symlink_to(sandbox / "victim" / "created-outside.pt")
    args = ["repair", work / "model.pt", "-f", work / "features.npy", "--k", 1, "-o", work / "out.pt"]
    sandboxed(sandbox, args, [], 1, "dangling link")
    sandboxed(sandbox, [*args, "--force"], ["work/out.pt", "work/out.pt.lip.json"], 0)
    assert not (work / "out.pt").is_symlink() and not (sandbox / "victim" / "created-outside.pt").exists()


def test_link_output_to_an_outside_file_is_replaced_not_written_through(sandbox: Path) -> None:
    work = sandbox / "work"
    (work / "out.pt").symlink_to(sandbox / "victim" / "secret.txt")
    args = ["repair", work / "model.pt", "-f", work / "features.npy", "--k", 1, "-o", work / "out.pt"]
    sandboxed(sandbox, [*args, "--force"], ["work/out.pt", "work/out.pt.lip.json"], 0)
    assert (sandbox / "victim" / "secret.txt").read_text() == "not yours\n"


@pytest.mark.parametrize("link", ["model.pt", "train"])
def test_demo_never_writes_through_a_link_out_of_its_folder(sandbox: Path, link: str) -> None:
    folder = sandbox / "work" / "demo"
    folder.mkdir()
    (folder / link).symlink_to(sandbox / "victim" / ("model.pt" if link == "model.pt" else ""))
    refusal = "already holds model.pt" if link == "model.pt" else "is a link out of the folder"
    sandboxed(sandbox, ["demo", folder], [], 1, refusal)
    sandboxed(sandbox, ["demo", folder, "--force"], [], 1, "is a link out of the folder")


# item 4: only regular files are read, and nothing hangs after a refusal


@pytest.mark.parametrize("which", ["features", "checkpoint", "labels"])
@pytest.mark.parametrize("special", ["fifo", "dev-zero"])
def test_special_inputs_are_refused_before_anything_reads_them(sandbox: Path, which: str, special: str):
    work = sandbox / "work"
    path = (
        work / {"features": "features.npy", "checkpoint": "model.pt", "labels": "features.labels.npy"}[which]
    )
    path.unlink()
    if special == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    args = [
        "repair",
        work / "model.pt",
        "-f",
        work / "features.npy",
        "--k",
        1,
        "-l",
        work / "features.labels.npy",
    ]
    expected = "is a FIFO" if special == "fifo" else "is a character device (a link to /dev/zero)"
    sandboxed(sandbox, args, [], 1, expected)
    sandboxed(sandbox, ["inspect", work / "model.pt", "-f", work / "features.npy"], [], 1, expected)


def test_compare_and_features_refuse_special_inputs(sandbox: Path) -> None:
    work = sandbox / "work"
    os.mkfifo(work / "fifo.pt")
    sandboxed(sandbox, ["compare", work / "model.pt", work / "fifo.pt"], [], 1, "is a FIFO")
    args = ["features", work / "fifo.pt", "--model", "python:lip_cli.demo:demo_model"]
    args += ["--data", work / "features.npy", "--labels", work / "labels.npy", "--out", work / "f.npy"]
    sandboxed(sandbox, args, [], 1, "is a FIFO")


def test_a_special_input_never_hangs_the_process(sandbox: Path) -> None:
    """The real process: it refuses the FIFO and exits at once (no background read blocks the exit)."""
    work = sandbox / "work"
    (work / "features.npy").unlink()
    os.mkfifo(work / "features.npy")
    command = [sys.executable, "-m", "lip_cli", "repair", work / "model.pt", "-f", work / "features.npy"]
    done = subprocess.run([*map(str, command), "--k", "1"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "is a FIFO" in done.stderr and done.stderr.count("\n") == 1


def test_background_digests_stop_when_dropped() -> None:
    started, finished = threading.Event(), threading.Event()

    def endless(stop: threading.Event) -> str:
        started.set()
        while not stop.wait(0.01):
            pass
        finished.set()
        raise Cancelled("stopped")

    digests = BackgroundDigests()
    future = digests.submit(endless)
    assert started.wait(10)
    del digests
    gc.collect()
    assert finished.wait(10) and isinstance(future.exception(timeout=10), Cancelled)


def test_glob_characters_in_a_real_file_name(sandbox: Path) -> None:
    work = sandbox / "work"
    (work / "features.npy").rename(work / "feats[1].npy")
    (work / "features.labels.npy").rename(work / "feats[1].labels.npy")
    args = ["repair", work / "model.pt", "-f", work / "feats[1].npy", "--k", 1, "-o", work / "out.pt"]
    sandboxed(sandbox, args, ["work/out.pt", "work/out.pt.lip.json"], 0)


def test_member_refuses_what_leaves_the_folder(tmp_path: Path) -> None:
    (tmp_path / "inside").mkdir()
    (tmp_path / "inside" / "a.bin").write_bytes(b"1")
    assert files.member(tmp_path / "inside", "a.bin") == tmp_path / "inside" / "a.bin"
    for name in ("", "/etc/passwd", "../x", "a/../../x", "..\\x"):
        with pytest.raises(LipError, match="points outside the folder"):
            files.member(tmp_path / "inside", name)


def test_sigterm_handler_is_only_in_the_process(sandbox: Path) -> None:
    """In-process runs (the Python API, CliRunner) keep the caller's SIGTERM handler."""
    before = signal.getsignal(signal.SIGTERM)
    run("inspect", sandbox / "work" / "model.pt")
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_special_file_named_like_an_image_is_refused_before_any_read(tmp_path: Path) -> None:
    from lip_cli.models import ImageFolderData

    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "a.png").write_bytes(b"not really a png")
    os.mkfifo(tmp_path / "cats" / "b.png")
    with pytest.raises(LipError, match="b.png: is a FIFO"):
        ImageFolderData(tmp_path)


@pytest.mark.parametrize("command", ["repair", "inspect"])
def test_an_output_where_an_input_sidecar_would_be_is_refused(sandbox: Path, command: str) -> None:
    """`model.pt.lip.json` is read as model.pt's provenance even while it does not exist: a figure
    written there would make model.pt unreadable to lip afterwards."""
    work = sandbox / "work"
    args: list[object] = [command, work / "model.pt", "--plot", work / "model.pt.lip.json"]
    if command == "repair":
        args += ["-f", work / "features.npy", "--k", 1]
    sandboxed(sandbox, args, [], 1, "model.pt.lip.json")


def test_a_folder_named_like_lip_record_inside_a_model_folder_is_refused(hf_sandbox: Path) -> None:
    """`lip.json` is where lip writes its record in the output folder: a folder of that name in the
    input gave a traceback once the work was done; now one line before it."""
    (hf_sandbox / "work" / "hf" / "lip.json").mkdir()
    (hf_sandbox / "work" / "hf" / "lip.json" / "notes.txt").write_text("mine\n")
    sandboxed(hf_sandbox, repair_hf(hf_sandbox), [], 1, "lip.json: is a folder")


# E6, E7 of the adversarial pass of 2026-12-02 (faults-2026-12-02.md)


def test_dot_dot_after_a_link_means_what_the_system_means(tmp_path: Path, monkeypatch) -> None:
    """E7: `lnk/../x` is the file beside the link's target, for the check and for the write."""
    from lip_cli import files, writes

    monkeypatch.chdir(tmp_path)
    (tmp_path / "elsewhere" / "sub").mkdir(parents=True)
    (tmp_path / "lnk").symlink_to("elsewhere/sub")
    (tmp_path / "elsewhere" / "x.npy").write_text("old")
    with pytest.raises(LipError, match="already exists; pass --force"):
        files.check_paths([], [files.Output(Path("lnk/../x.npy"))], force=False)
    files.check_paths([], [files.Output(Path("lnk/../x.npy"))], force=True)
    with writes.atomic_output(Path("lnk/../x.npy")) as temporary:
        temporary.write_text("new")
    assert (tmp_path / "elsewhere" / "x.npy").read_text() == "new" and not (tmp_path / "x.npy").exists()
    (tmp_path / "user.pt").write_text("user file")  # lexically lnk/../user.pt, physically not
    files.check_paths([], [files.Output(Path("lnk/../user.pt"))], force=False)
    with writes.atomic_output(Path("lnk/../user.pt")) as temporary:
        temporary.write_text("lip")
    assert (tmp_path / "user.pt").read_text() == "user file"
    assert (tmp_path / "elsewhere" / "user.pt").read_text() == "lip"


def _swap_race(tmp_path: Path, delay: float) -> tuple[str, list[str]]:
    """`ra/rb/x.npy` checked, then made and written while another thread puts a link to a victim
    folder where `ra` is missing: what happened, and what the victim folder holds."""
    import threading
    import time

    from lip_cli import files, writes

    work, victim = tmp_path / "work", tmp_path / "victim"
    work.mkdir()
    victim.mkdir()
    output = work / "ra" / "rb" / "x.npy"
    files.check_paths([], [files.Output(output, parents=True)], force=False)

    def swap() -> None:
        time.sleep(delay)
        with contextlib.suppress(OSError):
            (work / "ra").symlink_to(victim)

    thread = threading.Thread(target=swap)
    thread.start()
    outcome = "wrote"
    try:
        with files.new_folders(output), writes.atomic_output(output) as temporary:
            temporary.write_bytes(b"x" * 1000)
    except LipError as error:
        outcome = str(error)
    thread.join()
    return outcome, sorted(os.listdir(victim))


def test_a_folder_swapped_for_a_link_after_the_check_is_never_written_through(tmp_path: Path) -> None:
    """E6: in 30 races (the link put before, between and after the folders are made), nothing ever
    lands in the victim folder: lip writes where it checked, or refuses in one line."""
    import shutil

    outcomes = set()
    for trial in range(30):
        folder = tmp_path / str(trial)
        folder.mkdir()
        outcome, in_victim = _swap_race(folder, delay=(trial % 10) * 0.0002)
        assert in_victim == [], (trial, outcome)
        assert outcome == "wrote" or "changed while lip ran" in outcome or "where lip checked it" in outcome
        outcomes.add(outcome.split(":")[-1][:20])
        shutil.rmtree(folder)


def test_a_link_put_after_the_check_is_refused(tmp_path: Path) -> None:
    from lip_cli import files

    (tmp_path / "victim").mkdir()
    output = tmp_path / "ra" / "rb" / "x.npy"
    files.check_paths([], [files.Output(output, parents=True)], force=False)
    (tmp_path / "ra").symlink_to(tmp_path / "victim")
    with pytest.raises(LipError, match="a folder above it changed while lip ran"), files.new_folders(output):
        pass
    assert os.listdir(tmp_path / "victim") == []
