"""Sharded feature caches: globs and folders of shards, paired with their labels and checked."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from conftest import make_head, save_problem
from typer.testing import CliRunner

from lip_cli.cli import app

runner = CliRunner(env={"COLUMNS": "200"})


def run(*args: object):
    return runner.invoke(app, [str(arg) for arg in args])


def split(tmp_path: Path, head, sizes=(70, 130, 100)) -> dict:
    paths = save_problem(tmp_path, head)
    features = np.load(paths["features"])
    labels = np.load(paths["labels"])
    (tmp_path / "feats").mkdir()
    (tmp_path / "labs").mkdir()
    (tmp_path / "packed").mkdir()
    start = 0
    for index, size in enumerate(sizes):
        part = slice(start, start + size)
        np.save(tmp_path / "feats" / f"part-{index:03d}.npy", features[part])
        np.save(tmp_path / "labs" / f"part-{index:03d}.npy", labels[part])
        np.savez(tmp_path / "packed" / f"part-{index:03d}.npz", features=features[part], labels=labels[part])
        start += size
    return paths


def repaired(*args: object) -> tuple[dict, torch.Tensor]:
    result = run("repair", *args, "--k", 2, "--json", "--force", "--chunk-rows", 64)
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    return document, torch.load(document["output"], weights_only=True)["fc.weight"]


def test_shards_give_the_single_file_result(tmp_path: Path, head) -> None:
    paths = split(tmp_path, head)
    _, reference = repaired(paths["model"], "-f", paths["features"], "-o", tmp_path / "one.pt")
    cases = {
        "glob + label glob": [
            "-f",
            tmp_path / "feats" / "part-*.npy",
            "--labels",
            tmp_path / "labs" / "part-*.npy",
        ],
        "folder + label folder": ["-f", tmp_path / "feats", "--labels", tmp_path / "labs"],
        "folder + one labels file": ["-f", tmp_path / "feats", "--labels", paths["labels"]],
        "containers with labels": ["-f", tmp_path / "packed"],
    }
    for index, (case, args) in enumerate(cases.items()):
        document, weight = repaired(paths["model"], *args, "-o", tmp_path / f"out{index}.pt")
        assert document["samples"] == 300, case
        torch.testing.assert_close(weight, reference, rtol=1e-6, atol=1e-7), case
    assert document["labels_source"] == "each shard's labels array"


def test_bad_pairs_name_the_shard(tmp_path: Path, head) -> None:
    paths = split(tmp_path, head)
    np.save(tmp_path / "labs" / "part-001.npy", np.zeros(5, dtype=np.int64))
    result = run("repair", paths["model"], "-f", tmp_path / "feats", "--labels", tmp_path / "labs", "--k", 1)
    assert result.exit_code == 1 and "part-001.npy: 5 labels but shard" in result.stderr
    np.save(tmp_path / "feats" / "part-002.npy", np.zeros((100, 7), dtype=np.float32))
    result = run("repair", paths["model"], "-f", tmp_path / "feats", "--k", 1, "--labels", paths["labels"])
    assert result.exit_code == 1 and "part-002.npy: shard is (7,)" in result.stderr
    (tmp_path / "labs" / "part-002.npy").unlink()
    result = run("repair", paths["model"], "-f", tmp_path / "feats", "--labels", tmp_path / "labs", "--k", 1)
    assert result.exit_code == 1 and "2 label shards for 3 feature shards" in result.stderr
    result = run("repair", paths["model"], "-f", tmp_path / "feats", "--k", 1)
    assert result.exit_code == 1 and "shard holds no labels array" in result.stderr
    result = run("repair", paths["model"], "-f", tmp_path / "nothing-*.npy", "--k", 1)
    assert result.exit_code == 1 and "no file matches" in result.stderr


def test_a_nan_in_one_shard_fails_cleanly(tmp_path: Path) -> None:
    head = make_head(n=300, q=12, l=5, seed=61)
    paths = split(tmp_path, head)
    bad = np.load(tmp_path / "feats" / "part-001.npy")
    bad[3, 3] = np.inf
    np.save(tmp_path / "feats" / "part-001.npy", bad)
    result = run("repair", paths["model"], "-f", tmp_path / "feats", "--labels", tmp_path / "labs", "--k", 1)
    assert result.exit_code == 1 and "hold NaN or Inf" in result.stderr
    assert not (tmp_path / "model.lip.pt").exists()


def test_a_shard_folder_never_reads_a_link_out_of_it(tmp_path: Path, head) -> None:
    """A shard of a folder cache that links out of the folder is refused, naming it."""
    paths = split(tmp_path, head)
    outside = tmp_path / "elsewhere.npz"
    (tmp_path / "packed" / "part-002.npz").rename(outside)
    (tmp_path / "packed" / "part-002.npz").symlink_to(outside)
    result = run("repair", paths["model"], "-f", tmp_path / "packed", "--k", 2, "--dry-run")
    assert result.exit_code == 1, result.output
    assert "part-002.npz" in result.stderr and "link out of the folder" in result.stderr


def test_a_special_file_matching_a_shard_glob_is_refused_not_skipped(tmp_path: Path, head) -> None:
    """A FIFO matching the glob was dropped silently: the repair ran on the other shards only."""
    paths = split(tmp_path, head)
    (tmp_path / "packed" / "part-002.npz").unlink()
    os.mkfifo(tmp_path / "packed" / "part-002.npz")
    result = run("repair", paths["model"], "-f", tmp_path / "packed" / "part-*.npz", "--k", 2, "--dry-run")
    assert result.exit_code == 1, result.output
    assert "part-002.npz: is a FIFO" in result.stderr
