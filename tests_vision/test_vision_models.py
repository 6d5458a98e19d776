"""`lip features` on torchvision, timm and Hugging Face image classifiers (tiny, random, made here),
over image folders written here: nothing is downloaded. Runs in the vision environment (make test)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
import transformers
from PIL import Image
from typer.testing import CliRunner

from lip_cli import collect_features
from lip_cli.cli import app
from lip_cli.models import BuiltModel, ImageFolderData, eval_transform

runner = CliRunner(env={"COLUMNS": "200"})
CLASSES = ("cat", "dog", "fox")


def run(*args: object):
    return runner.invoke(app, [str(arg) for arg in args])


@pytest.fixture
def images(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for index, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for number in range(4):
            pixels = rng.integers(0, 256, (40 + 4 * index, 36, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{number}.png")
    return root


def expected_logits(model: torch.nn.Module, kind: str, root: Path, image_size: int | None) -> torch.Tensor:
    """The model's own logits on the same images, through the same evaluation transform."""
    dataset = ImageFolderData(root, eval_transform(BuiltModel(model, kind, "", 3), image_size, None, None))
    batch = torch.stack([dataset[index][0] for index in range(len(dataset))])
    with torch.inference_mode():
        output = model.eval()(batch)
    return output.logits if hasattr(output, "logits") else output


def check_invariant(folder: Path, layer: torch.nn.Linear, logits: torch.Tensor) -> None:
    features = torch.from_numpy(np.load(folder / "feats.npy"))
    torch.testing.assert_close(
        features @ layer.weight.detach().T + layer.bias.detach(), logits, rtol=1e-4, atol=1e-4
    )
    assert np.array_equal(np.load(folder / "feats.labels.npy"), np.repeat(np.arange(3), 4))
    assert json.loads((folder / "feats.classes.json").read_text()) == list(CLASSES)


def test_torchvision_resnet18(tmp_path: Path, images: Path) -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "r18.pt")
    result = run(
        "features",
        tmp_path / "r18.pt",
        "--model",
        "torchvision:resnet18",
        "--data",
        images,
        "--out",
        tmp_path / "feats.npy",
        "--image-size",
        32,
        "--batch-size",
        5,
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["feature_dim"] == 512
    check_invariant(tmp_path, model.fc, expected_logits(model, "torchvision", images, 32))
    repaired = run("repair", tmp_path / "r18.pt", "-f", tmp_path / "feats.npy", "--k", 2, "--json")
    assert repaired.exit_code == 0, repaired.output
    assert json.loads(repaired.stdout)["layer"] == "module.fc"


def test_timm_model_uses_its_data_config(tmp_path: Path, images: Path) -> None:
    torch.manual_seed(1)
    model = timm.create_model("test_vit", pretrained=False, num_classes=3)
    torch.save(model.state_dict(), tmp_path / "vit.pt")
    result = run(
        "features",
        tmp_path / "vit.pt",
        "--model",
        "timm:test_vit",
        "--data",
        images,
        "--out",
        tmp_path / "feats.npy",
        "--num-workers",
        2,
    )
    assert result.exit_code == 0, result.output
    check_invariant(tmp_path, model.get_classifier(), expected_logits(model, "timm", images, None))


def test_hugging_face_image_classifier(tmp_path: Path, images: Path) -> None:
    torch.manual_seed(2)
    config = transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
    )
    model = transformers.ViTForImageClassification(config).eval()
    model.save_pretrained(tmp_path / "vit-hf")
    result = run(
        "features",
        tmp_path / "vit-hf",
        "--model",
        f"hf:{tmp_path / 'vit-hf'}",
        "--data",
        images,
        "--out",
        tmp_path / "feats.npy",
        "--image-size",
        32,
    )
    assert result.exit_code == 0, result.output
    check_invariant(tmp_path, model.classifier, expected_logits(model, "hf", images, 32))
    repaired = run("repair", tmp_path / "vit-hf", "-f", tmp_path / "feats.npy", "--k", 1, "--json")
    assert repaired.exit_code == 0, repaired.output
    reloaded = transformers.ViTForImageClassification.from_pretrained(json.loads(repaired.stdout)["output"])
    assert reloaded.classifier.weight.shape == (3, 16)


def test_bad_images_and_models(tmp_path: Path, images: Path) -> None:
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / "r18.pt")
    base = ["features", tmp_path / "r18.pt", "--out", tmp_path / "feats.npy", "--image-size", 32]
    (images / "dog" / "broken.png").write_bytes(b"not a png at all")
    (tmp_path / "empty").mkdir()
    cases = [
        (["--model", "torchvision:resnet18", "--data", images], "broken.png: unreadable image"),
        (
            ["--model", "torchvision:resnet18", "--data", images, "--num-workers", 2],
            "broken.png: unreadable image",
        ),
        (["--model", "torchvision:resnet18", "--data", tmp_path / "empty"], "no images in class sub-folders"),
        (["--model", "torchvision:not_a_net", "--data", images], "torchvision has no model 'not_a_net'"),
        (["--model", "timm:not_a_net", "--data", images], "timm has no model 'not_a_net'"),
        (["--model", "torchvision:resnet34", "--data", images], "does not fit the architecture"),
    ]
    for extra, message in cases:
        result = run(*base, *extra)
        assert result.exit_code == 1, (extra, result.output)
        assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
        assert not (tmp_path / "feats.npy").exists() and not (tmp_path / "feats.labels.npy").exists()


def test_hooks_are_gone_after_an_exception_inside_the_model(images: Path) -> None:
    model = torchvision.models.resnet18(num_classes=3)
    calls = []

    def explode(module, args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom inside the model")

    model.layer1.register_forward_pre_hook(explode)
    dataset = ImageFolderData(images, eval_transform(BuiltModel(model, "torchvision", "", 3), 32, None, None))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)
    with pytest.raises(RuntimeError, match="boom"):
        collect_features(model, loader)
    assert not model.fc._forward_hooks and model.training
