"""collect_features: a forward hook that turns a model and a data loader into LAP's feature cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from typer.testing import CliRunner

from lip_cli import LipError, collect_features
from lip_cli.cli import app


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 12), nn.ReLU())
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def loader(n: int = 100, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, 8, generator=generator)
    labels = torch.randint(0, 5, (n,), generator=generator)
    return DataLoader(TensorDataset(inputs, labels), batch_size=32)


def test_features_reproduce_the_models_logits() -> None:
    torch.manual_seed(0)
    model = Net().train()
    features, labels = collect_features(model, loader())
    assert features.shape == (100, 12) and features.dtype == np.float32 and labels.shape == (100,)
    assert model.training and not model.fc._forward_hooks  # left as it was
    model.eval()
    with torch.inference_mode():
        inputs = torch.cat([batch[0] for batch in loader()])
        logits = model(inputs)
    weight, bias = model.fc.weight.detach(), model.fc.bias.detach()
    torch.testing.assert_close(torch.from_numpy(features) @ weight.T + bias, logits, rtol=1e-5, atol=1e-5)
    assert np.array_equal(labels, torch.cat([batch[1] for batch in loader()]).numpy())


def test_written_incrementally_then_repaired(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = Net()
    in_memory, _ = collect_features(model, loader())
    paths = collect_features(model, loader(), out=tmp_path / "feats.npy", dtype="float16")
    assert paths == (tmp_path / "feats.npy", tmp_path / "feats.labels.npy")
    written = np.load(paths[0])
    assert written.dtype == np.float16 and written.shape == (100, 12)
    np.testing.assert_allclose(written, in_memory, rtol=1e-3, atol=1e-3)
    with pytest.raises(LipError, match="already exists"):
        collect_features(model, loader(), out=tmp_path / "feats.npy")
    torch.save(model.state_dict(), tmp_path / "model.pt")
    result = CliRunner().invoke(
        app, ["repair", str(tmp_path / "model.pt"), "-f", str(paths[0]), "--k", "2", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["layer"] == "fc"


def test_hook_is_removed_after_an_exception(tmp_path: Path) -> None:
    model = Net().train()

    def failing_batches():
        yield next(iter(loader()))
        raise RuntimeError("data loader broke")

    with pytest.raises(RuntimeError, match="data loader broke"):
        collect_features(model, failing_batches(), out=tmp_path / "feats.npy")
    assert not model.fc._forward_hooks and model.training
    assert sorted(path.name for path in tmp_path.iterdir()) == []  # nothing half-written


def test_layer_choice_and_errors() -> None:
    model = Net()
    features, _ = collect_features(model, loader(), layer="body.3")
    assert features.shape == (100, 16)
    with pytest.raises(LipError, match="no module `head`"):
        collect_features(model, loader(), layer="head")
    with pytest.raises(LipError, match="not an nn.Linear"):
        collect_features(model, loader(), layer="body.1")


def _rank(rank: int, world: int, init: str, folder: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    model = Net()
    collect_features(model, loader(n=60, seed=10 + rank), out=Path(folder) / "feats.npy")
    if rank == 0:
        torch.save(model.state_dict(), Path(folder) / "model.pt")
    dist.destroy_process_group()


def test_one_shard_per_process_under_torch_distributed(tmp_path: Path) -> None:
    mp.spawn(_rank, args=(2, f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=2, join=True)
    names = sorted(path.name for path in tmp_path.glob("*.part-*.npy"))
    assert names == [
        "feats.labels.part-00000.npy",
        "feats.labels.part-00001.npy",
        "feats.part-00000.npy",
        "feats.part-00001.npy",
    ]
    result = CliRunner().invoke(
        app,
        [
            "repair",
            str(tmp_path / "model.pt"),
            "-f",
            str(tmp_path / "feats.part-*.npy"),
            "--labels",
            str(tmp_path / "feats.labels.part-*.npy"),
            "--k",
            "2",
            "--json",
            "--dry-run",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["samples"] == 120
