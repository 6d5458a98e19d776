"""The callbacks' core under torch.distributed (2 processes on gloo, as DDP runs them): each rank
streams its DistributedSampler share, the sums and counts meet in all_reduce, the padding the
sampler adds is left out, and every rank holds the head `lip repair --k auto` chooses on the same
rows. No framework is imported here: the spawned processes start in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from lip_cli.integrations.core import decide_in_memory, request_for, rows_of_this_process

CLASSES, WIDTH, TRAIN_ROWS, VAL_ROWS = 20, 32, 1000, 1001  # odd: the sampler pads one rank by a row


def data(rows: int, seed: int) -> TensorDataset:
    """Gaussian clusters, a fifth of the labels redrawn at random."""
    centres = torch.randn(CLASSES, WIDTH, generator=torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(CLASSES, (rows,), generator=generator)
    inputs = centres[labels] + torch.randn(rows, WIDTH, generator=generator)
    noisy = torch.rand(rows, generator=generator) < 0.2
    return TensorDataset(
        inputs, torch.where(noisy, torch.randint(CLASSES, (rows,), generator=generator), labels)
    )


def collapsed_head() -> nn.Linear:
    """The clusters' Bayes head with its tail after k = 8 shrunk 20-fold: LAP repairs it."""
    centres = torch.randn(CLASSES, WIDTH, generator=torch.Generator().manual_seed(5))
    u, s, vh = torch.linalg.svd(centres.T, full_matrices=False)
    head = nn.Linear(WIDTH, CLASSES)
    with torch.no_grad():
        head.weight.copy_(((u * torch.cat([s[:8], 0.05 * s[8:]])) @ vh).T)
        head.bias.copy_(-(centres**2).sum(1) / 2)
    return head


def _rank(rank: int, world: int, init: str, folder: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    model = nn.Sequential(collapsed_head())
    loaders = [
        DataLoader(dataset, batch_size=125, sampler=DistributedSampler(dataset, shuffle=False))
        for dataset in (data(TRAIN_ROWS, 1), data(VAL_ROWS, 2))
    ]
    run = lambda batch: ((lambda: model(batch[0])), batch[1])  # noqa: E731
    limits = (rows_of_this_process(loaders[0]), rows_of_this_process(loaders[1]))
    decision = decide_in_memory(model, request_for(), *loaders, run, limits)
    torch.save(model[0].weight.detach().clone(), Path(folder) / f"head-{rank}.pt")
    (Path(folder) / f"record-{rank}.json").write_text(json.dumps(decision.record))
    dist.barrier()
    dist.destroy_process_group()


def test_ranks_share_the_rows_and_hold_the_head_the_command_chooses(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from lip_cli.cli import app

    mp.spawn(_rank, args=(2, f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=2, join=True)
    heads = [torch.load(tmp_path / f"head-{rank}.pt", weights_only=True) for rank in (0, 1)]
    records = [json.loads((tmp_path / f"record-{rank}.json").read_text()) for rank in (0, 1)]
    assert torch.equal(heads[0], heads[1])  # rank 0's head on every rank
    assert records[0]["test"] == records[1]["test"]
    assert records[0]["train_rows"] == TRAIN_ROWS and records[0]["val_rows"] == VAL_ROWS  # no padded rows

    # the command on the same rows: the validation rows in the ranks' order, as torchrun reads a file
    train, val = data(TRAIN_ROWS, 1), data(VAL_ROWS, 2)
    order = torch.cat([torch.arange(0, VAL_ROWS, 2), torch.arange(1, VAL_ROWS, 2)])
    np.save(tmp_path / "train.npy", train.tensors[0].numpy())
    np.save(tmp_path / "train.labels.npy", train.tensors[1].numpy())
    np.save(tmp_path / "val.npy", val.tensors[0][order].numpy())
    np.save(tmp_path / "val.labels.npy", val.tensors[1][order].numpy())
    torch.save(
        {"fc." + name: value for name, value in collapsed_head().state_dict().items()}, tmp_path / "m.pt"
    )
    result = CliRunner().invoke(
        app,
        [
            "repair", str(tmp_path / "m.pt"), "--features", str(tmp_path / "train.npy"),
            "--val-features", str(tmp_path / "val.npy"), "--k", "auto", "--json", "--force-write",
            "--output", str(tmp_path / "repaired.pt"),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    command = json.loads(result.stdout)
    assert (records[0]["k"], records[0]["outcome"]) == (command["k"], command["outcome"]) == (8, "repaired")
    assert records[0]["test"] == command["test"]  # the same split, counts, p-value, interval, power
    written = torch.load(tmp_path / "repaired.pt", weights_only=True)["fc.weight"]
    torch.testing.assert_close(heads[0], written, rtol=1e-5, atol=1e-6)  # sums added in another order
