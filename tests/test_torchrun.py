"""torchrun: ranks share the pass over a sharded cache, the sums meet in all_reduce, rank 0 reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import make_head
from typer.testing import CliRunner

from lip_cli import LapStatistics
from lip_cli.cli import app

runner = CliRunner(env={"COLUMNS": "200"})


def torchrun(*args: object, processes: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    return subprocess.run(
        [*command, "-m", "lip_cli", *map(str, args)], capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    head = make_head(n=900, q=16, l=6, seed=71)
    torch.save(
        {"body.weight": torch.randn(16, 3), "fc.weight": head.weight.float(), "fc.bias": head.bias.float()},
        tmp_path / "model.pt",
    )
    (tmp_path / "feats").mkdir()
    (tmp_path / "labs").mkdir()
    for index, part in enumerate(np.array_split(np.arange(900), 4)):
        np.save(tmp_path / "feats" / f"part-{index}.npy", head.features.numpy()[part].astype(np.float32))
        np.save(tmp_path / "labs" / f"part-{index}.npy", head.labels.numpy()[part])
    val = make_head(n=200, q=16, l=6, seed=72)
    np.savez(tmp_path / "val.npz", features=val.features.numpy(), labels=val.labels.numpy())
    return tmp_path


@pytest.mark.parametrize("k", ["3", "auto"])
def test_two_ranks_equal_one_process(sharded: Path, k: str) -> None:
    args = [
        "repair",
        sharded / "model.pt",
        "-f",
        sharded / "feats",
        "--labels",
        sharded / "labs",
        "--k",
        k,
        "--chunk-rows",
        "100",
        "--targets",
        "paper",  # auto confirms a change on these shards with the paper's targets: both ranks write it
        "--json",
        *(["--force-write"] if k == "auto" else []),  # auto without validation rows writes no change
    ]
    single = runner.invoke(app, [*map(str, args), "-o", str(sharded / "one.pt")])
    assert single.exit_code == 0, single.output
    distributed = torchrun(*args, "-o", sharded / "two.pt")
    assert distributed.returncode == 0, distributed.stderr
    one, two = json.loads(single.stdout), json.loads(distributed.stdout)  # rank 1 printed nothing
    assert two["k_chosen"] == one["k_chosen"] and two["accuracy"] == one["accuracy"]
    # float32 products: the two ranks' chunks round differently, the sums agree to float32 rounding
    np.testing.assert_allclose(two["singular_values_after"], one["singular_values_after"], rtol=1e-6)
    torch.testing.assert_close(
        torch.load(sharded / "two.pt", weights_only=True)["fc.weight"],
        torch.load(sharded / "one.pt", weights_only=True)["fc.weight"],
        rtol=1e-6,
        atol=1e-7,
    )
    assert json.loads((sharded / "two.pt.lip.json").read_text())["k"] == one["k_chosen"]


def test_validation_set_is_shared_too(sharded: Path) -> None:
    args = [
        "repair",
        sharded / "model.pt",
        "-f",
        sharded / "feats",
        "--labels",
        sharded / "labs",
        "--k",
        "auto",
        "--val-features",
        sharded / "val.npz",
        "--json",
        "--dry-run",
    ]
    single = json.loads(runner.invoke(app, list(map(str, args))).stdout)
    distributed = torchrun(*args)
    assert distributed.returncode == 0, distributed.stderr
    assert json.loads(distributed.stdout)["k_curve"] == single["k_curve"]


def test_a_bad_shard_on_one_rank_fails_every_rank(sharded: Path) -> None:
    bad = np.load(sharded / "feats" / "part-3.npy")  # the last shard: read by rank 1 only
    bad[5, 0] = np.nan
    np.save(sharded / "feats" / "part-3.npy", bad)
    result = torchrun(
        "repair", sharded / "model.pt", "-f", sharded / "feats", "--labels", sharded / "labs", "--k", "3"
    )
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "hold NaN or Inf" in errors[0]
    assert not (sharded / "model.lip.pt").exists()


def _rank(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    head = make_head(n=500, q=10, l=4, seed=73)
    stats = LapStatistics(head.weight, head.bias, compute_dtype=torch.float64)
    part = slice(rank * 250, (rank + 1) * 250)
    stats.update(head.features[part], head.labels[part])
    stats.all_reduce()
    if rank == 0:
        torch.save({name: value for name, value in stats.sums.items()} | {"samples": stats.samples}, out)
    dist.destroy_process_group()


def test_accumulator_all_reduce_in_a_training_loop(tmp_path: Path) -> None:
    out = tmp_path / "sums.pt"
    mp.spawn(_rank, args=(2, f"file://{tmp_path / 'rendezvous'}", str(out)), nprocs=2, join=True)
    head = make_head(n=500, q=10, l=4, seed=73)
    whole = LapStatistics(head.weight, head.bias, compute_dtype=torch.float64)
    whole.update(head.features, head.labels)
    reduced = torch.load(out, weights_only=True)
    assert reduced["samples"] == 500
    for name, value in whole.sums.items():
        torch.testing.assert_close(reduced[name], value, rtol=1e-10, atol=1e-10)
