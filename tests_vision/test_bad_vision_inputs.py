"""Issue 15, item 8 for torchvision: and timm: specs: a checkpoint that holds only the head is refused
(the backbone would stay random), with one line naming the missing keys, and nothing is written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from PIL import Image
from typer.testing import CliRunner

from lip_cli.cli import app

runner = CliRunner(env={"COLUMNS": "200"})


@pytest.fixture
def images(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (tmp_path / "images" / name).mkdir(parents=True)
        for number in range(2):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / name / f"{number}.png")
    return tmp_path / "images"


@pytest.mark.parametrize(
    ("spec", "build", "head"),
    [
        ("torchvision:resnet18", lambda: torchvision.models.resnet18(num_classes=2), "fc."),
        ("timm:test_vit", lambda: timm.create_model("test_vit", pretrained=False, num_classes=2), "head."),
    ],
    ids=["torchvision", "timm"],
)
def test_checkpoint_holding_only_the_head(tmp_path: Path, images: Path, spec: str, build, head: str) -> None:
    state = build().state_dict()
    head_only = {key: value for key, value in state.items() if key.startswith(head)}
    torch.save(head_only, tmp_path / "head.pt")
    result = runner.invoke(
        app,
        ["features", str(tmp_path / "head.pt"), "--model", spec, "--data", str(images)]
        + ["--out", str(tmp_path / "feats.npy"), "--image-size", "32"],
    )
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "head.pt" in lines[0] and f"{len(state) - len(head_only)} missing keys" in lines[0]
    assert not (tmp_path / "feats.npy").exists() and not (tmp_path / "feats.labels.npy").exists()
