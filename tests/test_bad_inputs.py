"""Bad inputs (issue 15, items 6-10): each is refused with one line on stderr, exit 1, nothing written."""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_head, save_problem
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from typer.testing import CliRunner

from lip_cli.cli import app

runner = CliRunner(env={"COLUMNS": "200"})


def run(*args: object):
    return runner.invoke(app, [str(arg) for arg in args])


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with the sha256 of its bytes."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def refuses(folder: Path, *args: object, named: tuple[str, ...] = (), code: int = 1) -> str:
    """Run lip: exit `code`, one stderr line naming `named`, nothing on stdout (under --json: one
    error document with that line and code), no file in `folder` added or changed. Returns the line."""
    before = snapshot(folder)
    result = run(*args)
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    if "--json" in map(str, args):
        error = {"message": lines[0].removeprefix("error: "), "exit_code": code}
        assert json.loads(result.stdout)["error"] == error
    else:
        assert result.stdout == ""
    for name in named:
        assert name in lines[0], lines[0]
    assert snapshot(folder) == before
    return lines[0]


@pytest.fixture
def problem(tmp_path: Path) -> dict[str, Path]:
    return save_problem(tmp_path, make_head(n=200, q=12, l=10))


# item 6: nothing non-finite is written; overflow is named, not reported as unexcited directions


def test_labels_that_overflow_the_sums(tmp_path: Path, problem) -> None:
    labels = np.load(problem["labels"])
    np.save(tmp_path / "huge.npy", np.eye(10)[labels] * 1e308)
    message = refuses(
        tmp_path,
        "repair",
        problem["model"],
        "-f",
        problem["features"],
        "--labels",
        tmp_path / "huge.npy",
        "--k",
        3,
        "-o",
        tmp_path / "out.pt",
        named=("huge.npy", "labels are too large"),
    )
    assert "NaN" not in message
    refuses(
        tmp_path,
        "inspect",
        problem["model"],
        "--layer",
        "fc",
        "-f",
        problem["features"],
        "--labels",
        tmp_path / "huge.npy",
        named=("huge.npy", "labels are too large"),
    )


def test_features_that_overflow_float32_are_not_unexcited(tmp_path: Path, problem) -> None:
    features = np.load(problem["features"])
    features[:5] *= 1e20  # finite in float32, their squares are not
    np.save(tmp_path / "big.npy", features)
    args = ("repair", problem["model"], "-f", tmp_path / "big.npy", "--labels", problem["labels"], "--k", 3)
    message = refuses(
        tmp_path,
        *args,
        "--compute-dtype",
        "float32",
        "-o",
        tmp_path / "out.pt",
        named=("big.npy", "overflow float32", "--compute-dtype float64"),
    )
    assert "excited" not in message
    fixed = run(*args, "--compute-dtype", "float64", "--dry-run")
    assert fixed.exit_code == 0, fixed.output
    assert "never excited" not in fixed.stderr


def test_repaired_weight_that_overflows_its_dtype(tmp_path: Path, problem) -> None:
    state = torch.load(problem["model"], weights_only=True)
    state["fc.weight"] = state["fc.weight"].half()
    state["fc.bias"] = state["fc.bias"].half()
    torch.save(state, tmp_path / "half.pt")
    np.save(tmp_path / "tiny.npy", np.load(problem["features"]) * 1e-8)  # LAP's sigma grows as 1e8
    refuses(
        tmp_path,
        "repair",
        tmp_path / "half.pt",
        "-f",
        tmp_path / "tiny.npy",
        "--labels",
        problem["labels"],
        "--k",
        0,
        "-o",
        tmp_path / "out.pt",
        named=("half.pt", "fc.weight", "overflows float16"),
    )


# item 7: work bounded by what a file really holds


def write_npz(path: Path, members: dict[str, np.ndarray], junk_bytes: int = 0) -> None:
    """An .npz of `members`, plus a `junk` member of float32 zeros that deflates to almost nothing."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for key, array in members.items():
            buffer = io.BytesIO()
            np.save(buffer, array)
            archive.writestr(f"{key}.npy", buffer.getvalue())
        if junk_bytes:
            with archive.open("junk.npy", "w") as member:
                header = {"descr": "<f4", "fortran_order": False, "shape": (junk_bytes // 4,)}
                np.lib.format.write_array_header_1_0(member, header)
                member.write(bytes(junk_bytes))


def test_npz_reads_only_the_members_it_needs(tmp_path: Path, problem, monkeypatch) -> None:
    features, labels = np.load(problem["features"]), np.load(problem["labels"])
    write_npz(tmp_path / "cache.npz", {"features": features, "labels": labels}, junk_bytes=32 * 2**20)
    assert (tmp_path / "cache.npz").stat().st_size < 2**20
    inflated: dict[str, int] = {}
    original = zipfile.ZipExtFile.read

    def spy(handle, *args, **kwargs):
        data = original(handle, *args, **kwargs)
        inflated[handle.name] = inflated.get(handle.name, 0) + len(data)
        return data

    monkeypatch.setattr(zipfile.ZipExtFile, "read", spy)
    result = run("repair", problem["model"], "-f", tmp_path / "cache.npz", "--k", 3, "--dry-run")
    assert result.exit_code == 0, result.output
    assert inflated["features.npy"] >= features.nbytes and inflated["labels.npy"] >= labels.nbytes
    assert inflated["junk.npy"] < 4096  # its header only


def test_npz_member_shorter_than_its_header(tmp_path: Path, problem) -> None:
    features = np.load(problem["features"])
    with zipfile.ZipFile(tmp_path / "lying.npz", "w") as archive:
        archive.writestr("features.npy", npy_bytes(features, (2**31, 12)))
    refuses(
        tmp_path,
        "repair",
        problem["model"],
        "-f",
        tmp_path / "lying.npz",
        "--labels",
        problem["labels"],
        "--k",
        3,
        "-o",
        tmp_path / "out.pt",
        named=("lying.npz", "shorter than its header"),
    )


@pytest.mark.parametrize(
    ("claimed", "held"),
    [
        (lambda: torch.zeros(1, 12).expand(2**40, 12), 12),  # zero strides
        (lambda: torch.zeros(1011).as_strided((1000, 12), (1, 1)), 1011),  # overlapping rows
    ],
    ids=["zero-strides", "overlapping"],
)
def test_pt_tensor_larger_than_its_storage(tmp_path: Path, problem, claimed, held: int) -> None:
    torch.save({"features": claimed()}, tmp_path / "strided.pt")
    refuses(
        tmp_path,
        "repair",
        problem["model"],
        "-f",
        tmp_path / "strided.pt",
        "--labels",
        problem["labels"],
        "--k",
        3,
        "-o",
        tmp_path / "out.pt",
        named=("strided.pt[features]", f"storage holds {held}"),
    )


def npy_bytes(array: np.ndarray, shape: tuple[int, ...]) -> bytes:
    """The .npy file of `array` with a header that claims `shape`."""
    buffer = io.BytesIO()
    header = {"descr": array.dtype.str, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    buffer.write(np.ascontiguousarray(array).tobytes())
    return buffer.getvalue()


def test_npy_header_with_negative_rows(tmp_path: Path, problem) -> None:
    (tmp_path / "negative.npy").write_bytes(npy_bytes(np.load(problem["features"]), (-1, 12)))
    refuses(
        tmp_path,
        "repair",
        problem["model"],
        "-f",
        tmp_path / "negative.npy",
        "--labels",
        problem["labels"],
        "--k",
        3,
        "-o",
        tmp_path / "out.pt",
        named=("negative.npy", "(-1, 12)"),
    )


def test_shard_header_with_negative_rows(tmp_path: Path, problem) -> None:
    features, labels = np.load(problem["features"]), np.load(problem["labels"])
    (tmp_path / "feats").mkdir()
    (tmp_path / "labels").mkdir()
    np.save(tmp_path / "feats" / "part-0.npy", features[:100])
    (tmp_path / "feats" / "part-1.npy").write_bytes(npy_bytes(features[100:], (-1, 12)))
    np.save(tmp_path / "labels" / "part-0.npy", labels[:100])
    np.save(tmp_path / "labels" / "part-1.npy", labels[100:])
    refuses(
        tmp_path,
        "repair",
        problem["model"],
        "-f",
        tmp_path / "feats",
        "--labels",
        tmp_path / "labels",
        "--k",
        3,
        "-o",
        tmp_path / "out.pt",
        named=("part-1.npy", "negative"),
    )


# item 10 and low: labels in unsigned or complex types


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.uint64])
def test_unsigned_labels_are_read_as_class_ids(tmp_path: Path, problem, dtype) -> None:
    labels = np.load(problem["labels"])
    np.save(tmp_path / "unsigned.npy", labels.astype(dtype))
    common = ("repair", problem["model"], "-f", problem["features"], "--k", 3)
    result = run(*common, "--labels", tmp_path / "unsigned.npy", "-o", tmp_path / "a.pt")
    assert result.exit_code == 0, result.output
    reference = run(*common, "--labels", problem["labels"], "-o", tmp_path / "b.pt")
    assert reference.exit_code == 0, reference.output
    a, b = (torch.load(tmp_path / name, weights_only=True)["fc.weight"] for name in ("a.pt", "b.pt"))
    assert torch.equal(a, b)


def test_unsigned_labels_inside_safetensors(tmp_path: Path, problem) -> None:
    features, labels = np.load(problem["features"]), np.load(problem["labels"])
    tensors = {"features": torch.from_numpy(features), "labels": torch.from_numpy(labels.astype(np.uint16))}
    save_file(tensors, str(tmp_path / "cache.safetensors"))
    common = ("repair", problem["model"], "--k", 3)
    result = run(*common, "-f", tmp_path / "cache.safetensors", "-o", tmp_path / "a.pt")
    assert result.exit_code == 0, result.output
    assert "labels from the features file" in " ".join(result.stderr.split())
    reference = run(*common, "-f", problem["features"], "-o", tmp_path / "b.pt")
    assert reference.exit_code == 0, reference.output
    a, b = (torch.load(tmp_path / name, weights_only=True)["fc.weight"] for name in ("a.pt", "b.pt"))
    assert torch.equal(a, b)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    dtype=st.sampled_from([np.uint16, np.uint32, np.uint64]),
    values=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=20),
    suffix=st.sampled_from([".npy", ".npz", ".safetensors"]),
)
def test_unsigned_labels_read_as_their_values(tmp_path: Path, dtype, values: list[int], suffix: str) -> None:
    """Every unsigned id that fits int64 reads as itself, in every format; larger ones are refused."""
    from lip_cli import labelled
    from lip_cli.errors import LipError

    limit = np.iinfo(dtype).max
    labels = np.array([value % (int(limit) + 1) for value in values], dtype=dtype)
    path = tmp_path / f"labels{suffix}"
    if suffix == ".npy":
        np.save(path, labels)
    elif suffix == ".npz":
        np.savez(path, labels=labels)
    else:
        save_file({"labels": torch.from_numpy(labels)}, str(path))
    source = labelled.open_labels(path)
    assert source.dtype == torch.int64
    if int(labels.max()) > np.iinfo(np.int64).max:
        with pytest.raises(LipError, match="larger than any class id"):
            source.read()
    else:
        assert source.read().tolist() == [int(value) for value in labels]


@pytest.mark.parametrize("shape", ["ids", "matrix"])
def test_complex_labels(tmp_path: Path, problem, shape: str) -> None:
    labels = np.load(problem["labels"])
    values = labels if shape == "ids" else np.eye(10)[labels]
    np.save(tmp_path / "complex.npy", values.astype(np.complex64))
    refuses(
        tmp_path,
        "repair",
        problem["model"],
        "-f",
        problem["features"],
        "--labels",
        tmp_path / "complex.npy",
        "--k",
        3,
        "-o",
        tmp_path / "out.pt",
        named=("complex.npy", "complex"),
    )


# item 10: weights lip cannot repair without losing information


def odd_weights() -> dict[str, torch.Tensor]:
    weight = torch.randn(10, 12, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():  # torch deprecates quantized tensors
        warnings.simplefilter("ignore", UserWarning)
        quantized = torch.quantize_per_tensor(weight, 0.1, 0, torch.qint8)
    return {
        "float8": weight.to(torch.float8_e4m3fn),
        "int8": (weight * 10).to(torch.int8),
        "complex": weight.to(torch.complex64),
        "sparse": weight.to_sparse(),
        "meta": torch.empty(10, 12, device="meta"),
        "quantized": quantized,
    }


@pytest.mark.parametrize("command", ["repair", "inspect", "compare"])
@pytest.mark.parametrize("kind", list(odd_weights()))
def test_weights_that_are_not_dense_real_floats(tmp_path: Path, problem, kind: str, command: str) -> None:
    torch.save({"fc.weight": odd_weights()[kind], "fc.bias": torch.zeros(10)}, tmp_path / "odd.pt")
    if command == "repair":
        args = ("repair", tmp_path / "odd.pt", "-f", problem["features"], "--k", 3, "-o", tmp_path / "o.pt")
    elif command == "inspect":
        args = ("inspect", tmp_path / "odd.pt")
    else:
        args = ("compare", tmp_path / "odd.pt", problem["model"])
    word = {"float8": "float8", "int8": "int8", "complex": "complex64"}.get(kind, kind)
    refuses(tmp_path, *args, named=("odd.pt", "fc.weight", word))


def test_a_real_process_prints_one_line_for_a_quantized_weight(tmp_path: Path) -> None:
    """torch's own deprecation notices while loading quantized tensors are not shown."""
    import subprocess
    import sys

    torch.save({"fc.weight": odd_weights()["quantized"]}, tmp_path / "odd.pt")
    command = [sys.executable, "-m", "lip_cli", "inspect", str(tmp_path / "odd.pt")]
    process = subprocess.run(
        command, capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "400"}
    )
    assert process.returncode == 1
    assert process.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'odd.pt'}: `fc.weight` is a quantized tensor (torch.qint8); save "
        "tensor.dequantize() instead"
    ]


def test_weight_whose_energy_overflows_float64(tmp_path: Path, problem) -> None:
    weight = torch.randn(10, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 1e200
    torch.save({"fc.weight": weight}, tmp_path / "loud.pt")
    for args in (
        ("inspect", tmp_path / "loud.pt", "--json"),
        ("compare", tmp_path / "loud.pt", problem["model"]),
    ):
        refuses(tmp_path, *args, named=("loud.pt", "fc.weight", "overflows float64"))


def test_empty_layer_with_empty_features(tmp_path: Path) -> None:
    torch.save({"fc.weight": torch.zeros(10, 0)}, tmp_path / "empty.pt")
    np.save(tmp_path / "features.npy", np.zeros((200, 0), dtype=np.float32))
    np.save(tmp_path / "labels.npy", np.arange(200) % 10)
    refuses(
        tmp_path,
        "repair",
        tmp_path / "empty.pt",
        "-f",
        tmp_path / "features.npy",
        "--k",
        0,
        "-o",
        tmp_path / "out.pt",
        named=("features.npy", "no columns"),
    )
    refuses(tmp_path, "compare", tmp_path / "empty.pt", tmp_path / "empty.pt", named=("empty.pt", "10x0"))
    shown = run("inspect", tmp_path / "empty.pt", "--json")  # an empty layer has an empty spectrum
    assert shown.exit_code == 0 and json.loads(shown.stdout)["layers"][0]["shape"] == [10, 0]


# item 10: provenance records and --seed


@pytest.mark.parametrize(
    ("record", "problem_text"),
    [("[1, 2]", "a JSON list, not an object"), ('{"tool": "lip", "k": NaN}', "NaN")],
    ids=["list", "nan"],
)
def test_provenance_record_that_is_not_a_plain_object(
    tmp_path: Path, problem, record: str, problem_text: str
) -> None:
    (tmp_path / "model.pt.lip.json").write_text(record)
    message = refuses(tmp_path, "inspect", problem["model"], "--json", named=("model.pt", problem_text))
    assert "provenance" in message


def test_seed_beyond_64_bits_is_a_usage_error(tmp_path: Path, problem) -> None:
    before = snapshot(tmp_path)
    result = run(
        "repair",
        problem["model"],
        "-f",
        problem["features"],
        "--k",
        "auto",
        "--seed",
        2**70,
        "-o",
        tmp_path / "out.pt",
    )
    assert result.exit_code == 2, result.output
    assert "--seed" in result.stderr and "Traceback" not in result.output
    assert snapshot(tmp_path) == before


# items 8, 9 and 10: lip features

MODULE = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(12, 10))
        self.head = nn.Linear(10, 4)

    def forward(self, x):
        return self.head(self.body(x))


def make():
    return Net()
"""


@pytest.fixture
def factory(tmp_path: Path, monkeypatch) -> dict[str, Path]:
    """A python: model spec, its trained weights, inputs and labels."""
    import importlib.util

    (tmp_path / "lipbad_models.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = importlib.util.spec_from_file_location("lipbad_models", tmp_path / "lipbad_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    torch.save(module.make().state_dict(), tmp_path / "net.pt")
    np.save(
        tmp_path / "inputs.npy", np.random.default_rng(0).standard_normal((20, 3, 2, 2)).astype(np.float32)
    )
    np.save(tmp_path / "targets.npy", np.arange(20) % 4)
    (tmp_path / "out").mkdir()
    return {
        "checkpoint": tmp_path / "net.pt",
        "inputs": tmp_path / "inputs.npy",
        "labels": tmp_path / "targets.npy",
        "out": tmp_path / "out" / "feats.npy",
    }


def features_args(setup: dict[str, Path], **changes: object) -> list[object]:
    values = {**setup, **changes}
    return [
        "features",
        values["checkpoint"],
        "--model",
        values.get("model", "python:lipbad_models:make"),
        "--data",
        values["inputs"],
        "--labels",
        values["labels"],
        "--out",
        values["out"],
    ]


def test_features_float16_overflow(tmp_path: Path, factory) -> None:
    state = torch.load(factory["checkpoint"], weights_only=True)
    state["body.1.weight"] *= 1e6
    torch.save(state, tmp_path / "loud.pt")
    message = refuses(
        tmp_path,
        *features_args(factory, checkpoint=tmp_path / "loud.pt"),
        "--dtype",
        "float16",
        named=("`head`", "float16", "--dtype float32"),
    )
    assert "e+0" in message  # the largest magnitude is named
    assert run(*features_args(factory, checkpoint=tmp_path / "loud.pt")).exit_code == 0


def test_features_nan_activations(tmp_path: Path, factory) -> None:
    state = torch.load(factory["checkpoint"], weights_only=True)
    state["body.1.bias"][0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    refuses(tmp_path, *features_args(factory, checkpoint=tmp_path / "nan.pt"), named=("`head`", "NaN"))


def test_features_checkpoint_missing_the_backbone(tmp_path: Path, factory) -> None:
    state = torch.load(factory["checkpoint"], weights_only=True)
    torch.save({key: value for key, value in state.items() if key.startswith("head.")}, tmp_path / "head.pt")
    refuses(
        tmp_path,
        *features_args(factory, checkpoint=tmp_path / "head.pt"),
        named=("head.pt", "2 missing keys", "body.1.weight"),
    )


@pytest.fixture
def vit(tmp_path: Path, factory) -> tuple[Path, list[object]]:
    """A tiny Hugging Face ViT folder and the `lip features` arguments that read it as hf:DIR."""
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        image_size=8,
        patch_size=4,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        num_labels=3,
    )
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    np.save(tmp_path / "images.npy", np.zeros((4, 3, 8, 8), dtype=np.float32))
    np.save(tmp_path / "image_labels.npy", np.arange(4) % 3)
    args = features_args(
        factory,
        checkpoint=tmp_path / "vit",
        model=f"hf:{tmp_path / 'vit'}",
        inputs=tmp_path / "images.npy",
        labels=tmp_path / "image_labels.npy",
    )
    return tmp_path / "vit", args


def test_features_hf_folder_holding_only_the_head(tmp_path: Path, vit) -> None:
    from safetensors.torch import load_file

    folder, args = vit
    weights = load_file(folder / "model.safetensors")
    head = {key: value for key, value in weights.items() if key.startswith("classifier.")}
    save_file(head, str(folder / "model.safetensors"), metadata={"format": "pt"})
    message = refuses(tmp_path, *args, named=("vit", "weights missing", "vit.embeddings"))
    assert f"{len(weights) - len(head)} weights missing" in message


def test_features_hf_folder_whose_config_does_not_fit(tmp_path: Path, vit) -> None:
    folder, args = vit
    config = json.loads((folder / "config.json").read_text())
    config["id2label"] = {str(i): f"class {i}" for i in range(5)}  # the head has 3
    config["label2id"] = {f"class {i}": i for i in range(5)}
    (folder / "config.json").write_text(json.dumps(config))
    refuses(tmp_path, *args, named=("vit", "config.json"))


@pytest.mark.parametrize(
    ("inputs", "named"),
    [
        (np.float32(3.0), ("bad.npy", "shape ()")),
        (np.array(["a"] * 20), ("bad.npy", "<U1")),
        (np.zeros((20, 5), dtype=np.float32), ("--data", "bad.npy", "(20, 5)")),
    ],
    ids=["0-d", "strings", "wrong-width"],
)
def test_features_inputs_the_model_cannot_take(tmp_path: Path, factory, inputs, named) -> None:
    np.save(tmp_path / "bad.npy", inputs)
    refuses(tmp_path, *features_args(factory, inputs=tmp_path / "bad.npy"), named=named)


def test_features_pickled_labels_name_the_labels_file(tmp_path: Path, factory) -> None:
    np.save(tmp_path / "pickled.npy", np.array([None] * 20, dtype=object), allow_pickle=True)
    message = refuses(
        tmp_path, *features_args(factory, labels=tmp_path / "pickled.npy"), named=("pickled.npy",)
    )
    assert str(factory["inputs"]) not in message


def test_features_unsigned_labels(tmp_path: Path, factory) -> None:
    np.save(tmp_path / "unsigned.npy", (np.arange(20) % 4).astype(np.uint64))
    result = run(*features_args(factory, labels=tmp_path / "unsigned.npy"))
    assert result.exit_code == 0, result.output
    written = np.load(factory["out"].with_name(f"{factory['out'].stem}.labels.npy"))
    assert written.dtype == np.int64 and written.tolist() == (np.arange(20) % 4).tolist()


def test_features_relative_module_spec(tmp_path: Path, factory) -> None:
    refuses(tmp_path, *features_args(factory, model="python:.x:f"), named=("--model python:.x:f",))


# item 10: lip demo


def test_demo_where_train_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train").write_text("not a folder")
    refuses(tmp_path, "demo", tmp_path / "d", named=(str(tmp_path / "d" / "train"), "not a folder"))
    assert not (tmp_path / "d" / "val").exists()
