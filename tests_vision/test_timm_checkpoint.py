"""A training checkpoint written by timm's own CheckpointSaver (`model_best.pth.tar`, with `args`, an
argparse.Namespace), repaired by lip and loaded back by timm's load_checkpoint. Runs in the vision
environment; a tiny random timm model, nothing downloaded."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import timm
import torch
from reference import paper_lip
from timm.utils import CheckpointSaver
from typer.testing import CliRunner

from lip_cli.cli import app

runner = CliRunner(env={"COLUMNS": "200"})


def test_timm_checkpoint_saver_output_repairs_and_loads_back(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=4).eval()
    images = torch.randn(80, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 4, (80,), generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    args = argparse.Namespace(model="test_resnet", lr=0.01, epochs=2, num_classes=4)
    saver = CheckpointSaver(model, optimizer, args=args, checkpoint_dir=str(tmp_path), max_history=2)
    for epoch, metric in enumerate((40.0, 55.0)):
        model.train()
        loss = torch.nn.functional.cross_entropy(model(images[:16]), labels[:16])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.eval()
        saver.save_checkpoint(epoch, metric=metric)
    best = tmp_path / "model_best.pth.tar"
    assert best.exists()
    with torch.inference_mode():
        features = model.forward_head(model.forward_features(images), pre_logits=True)
    np.save(tmp_path / "features.npy", features.numpy())
    np.save(tmp_path / "labels.npy", labels.numpy())

    result = runner.invoke(
        app,
        [
            "repair",
            str(best),
            "-f",
            str(tmp_path / "features.npy"),
            "--k",
            "2",
            "--targets",
            "paper",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    output = Path(json.loads(result.stdout)["output"])
    assert output == tmp_path / "model_best.lip.pth.tar"

    loaded = timm.create_model("test_resnet", num_classes=4)
    timm.models.load_checkpoint(loaded, str(output), use_ema=False)
    expected = paper_lip(
        model.fc.weight.detach().numpy(), model.fc.bias.detach().numpy(), features.numpy(), labels.numpy(), 2
    )
    weight = loaded.fc.weight.detach().double().numpy()
    assert np.linalg.norm(weight - expected) / np.linalg.norm(expected) < 1e-5
    for key, value in model.state_dict().items():
        if key != "fc.weight":
            assert torch.equal(loaded.state_dict()[key], value), key
    with torch.serialization.safe_globals([argparse.Namespace]):
        before = torch.load(best, weights_only=True)
        after = torch.load(output, weights_only=True)
    assert after["args"] == args and after["metric"] == before["metric"] and after["saver"] == before["saver"]
    assert after["optimizer"]["param_groups"] == before["optimizer"]["param_groups"]
