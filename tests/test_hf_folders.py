"""Hugging Face model folders: single and sharded safetensors, checked with transformers itself."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import paper_lip
from typer.testing import CliRunner

from lip_cli.cli import app

transformers = pytest.importorskip("transformers")
runner = CliRunner(env={"COLUMNS": "200"})


def run(*args: object):
    """The command; a repair at a given k pinned to the paper's targets, which the reference computes."""
    words = [str(arg) for arg in args]
    if words[:1] == ["repair"] and "--targets" not in words and "auto" not in words:
        words += ["--targets", "paper"]
    return runner.invoke(app, words)


def tiny_classifier(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=5,
    )
    return transformers.BertForSequenceClassification(config).eval()


def features_and_logits(model, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The input of the classifier layer (forward hook) and the model's own logits."""
    captured = []
    hook = model.classifier.register_forward_hook(lambda module, args, output: captured.append(args[0]))
    try:
        with torch.inference_mode():
            logits = model(input_ids=inputs).logits
    finally:
        hook.remove()
    return captured[0], logits


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_repaired_folder_loads_with_transformers(tmp_path: Path, sharded: bool) -> None:
    model = tiny_classifier()
    folder = tmp_path / "bert"
    model.save_pretrained(folder, max_shard_size="4KB" if sharded else "1GB")
    assert (folder / "model.safetensors.index.json").exists() == sharded
    inputs = torch.randint(0, 64, (200, 8), generator=torch.Generator().manual_seed(1))
    features, logits = features_and_logits(model, inputs)
    labels = torch.randint(0, 5, (200,), generator=torch.Generator().manual_seed(2))
    np.save(tmp_path / "features.npy", features.numpy())
    np.save(tmp_path / "labels.npy", labels.numpy())
    before = {path.name: path.read_bytes() for path in folder.iterdir()}

    result = run("repair", folder, "-f", tmp_path / "features.npy", "--k", 2, "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    output = Path(document["output"])
    assert output == tmp_path / "bert.lip" and document["layer"] == "classifier"
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before  # input untouched

    written = {path.name: path.read_bytes() for path in output.iterdir()}
    changed = {name for name in before if written[name] != before[name]}
    if sharded:
        index = json.loads(before["model.safetensors.index.json"])
        assert changed == {index["weight_map"]["classifier.weight"]}
    else:
        assert changed == {"model.safetensors"}
    assert set(written) == set(before) | {"lip.json"}

    repaired_model = transformers.BertForSequenceClassification.from_pretrained(output).eval()
    weight = repaired_model.classifier.weight.detach()
    bias = repaired_model.classifier.bias.detach()
    _, repaired_logits = features_and_logits(repaired_model, inputs)
    torch.testing.assert_close(repaired_logits, features @ weight.T + bias, rtol=1e-5, atol=1e-5)
    expected = paper_lip(
        model.classifier.weight.detach().numpy(),
        model.classifier.bias.detach().numpy(),
        features.numpy(),
        labels.numpy(),
        2,
    )
    assert np.linalg.norm(weight.double().numpy() - expected) / np.linalg.norm(expected) < 1e-6
    unchanged = repaired_model.bert.embeddings.word_embeddings.weight
    assert torch.equal(unchanged, model.bert.embeddings.word_embeddings.weight)
    assert not torch.allclose(repaired_logits, logits)

    record = json.loads((output / "lip.json").read_text())
    assert record["k"] == 2 and record["layer"] == "classifier" and len(record["input_sha256"]) == 64
    inspected = run("inspect", output, "--json")
    assert json.loads(inspected.stdout)["provenance"]["k"] == 2


def test_folder_without_safetensors_weights(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    np.save(tmp_path / "f.npy", np.zeros((3, 2), dtype=np.float32))
    np.save(tmp_path / "labels.npy", np.zeros(3, dtype=np.int64))
    result = run("repair", tmp_path / "empty", "-f", tmp_path / "f.npy", "--k", 1)
    assert result.exit_code == 1 and "without model.safetensors" in result.stderr


def test_folder_with_a_single_file_and_an_index_repairs_what_transformers_loads(tmp_path: Path) -> None:
    """transformers loads model.safetensors before model.safetensors.index.json: both hold the
    repaired head afterwards, so from_pretrained gives it whichever it reads."""
    model = tiny_classifier()
    folder = tmp_path / "bert"
    model.save_pretrained(tmp_path / "single")
    model.save_pretrained(folder, max_shard_size="4KB")
    (folder / "model.safetensors").write_bytes((tmp_path / "single" / "model.safetensors").read_bytes())
    inputs = torch.randint(0, 64, (200, 8), generator=torch.Generator().manual_seed(1))
    features, _ = features_and_logits(model, inputs)
    labels = torch.randint(0, 5, (200,), generator=torch.Generator().manual_seed(2))
    np.save(tmp_path / "features.npy", features.numpy())
    np.save(tmp_path / "labels.npy", labels.numpy())

    result = run("repair", folder, "-f", tmp_path / "features.npy", "--k", 2, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    weight = model.classifier.weight.detach().numpy()
    expected = paper_lip(weight, model.classifier.bias.detach().numpy(), features.numpy(), labels.numpy(), 2)
    loaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "out").classifier.weight
    assert np.linalg.norm(loaded.detach().double().numpy() - expected) / np.linalg.norm(expected) < 1e-6
    from safetensors.torch import load_file

    shard = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][
        "classifier.weight"
    ]
    in_shard = load_file(tmp_path / "out" / shard)["classifier.weight"]
    assert torch.equal(in_shard, load_file(tmp_path / "out" / "model.safetensors")["classifier.weight"])


def test_inspect_dot_inside_a_model_folder(tmp_path: Path, monkeypatch) -> None:
    tiny_classifier().save_pretrained(tmp_path / "bert")
    monkeypatch.chdir(tmp_path / "bert")
    result = run("inspect", ".", "--json")
    assert result.exit_code == 0, result.output
    classifiers = [layer["name"] for layer in json.loads(result.stdout)["layers"] if layer["is_classifier"]]
    assert classifiers == ["classifier"]
