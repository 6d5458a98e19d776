"""Torch files read symbolically and repaired in place (torch_pickle): a repaired file differs from
its input only in the head's storage bytes (and the CRC-32 of those zip records), and the framework
that wrote it loads it back."""

from __future__ import annotations

import argparse
import json
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lip_cli import torch_pickle
from lip_cli.cli import app

runner = CliRunner()


def run(*args: object):
    return runner.invoke(app, [str(arg) for arg in args])


def _head_spans(path: Path, keys: list[str]) -> tuple[list[tuple[int, int]], set[str]]:
    """Byte ranges of the storage records that hold the tensors at `keys` of the state dict (at
    the top of the file or one level down), and those storages' keys."""
    read = torch_pickle.read_torch_file(path)
    dicts = [read.root, *(value for value in read.root.values() if isinstance(value, dict))]
    state = next(value for value in dicts if keys[0] in value)
    storages = {state[key].storage.key for key in keys}
    spans = [
        (read.records[key].offset, read.records[key].offset + read.records[key].nbytes) for key in storages
    ]
    return spans, storages


def _crc_fields(path: Path, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Where the CRC-32 of the zip records starting at `spans` lie: central directory, local
    header or data descriptor."""
    fields = []
    with open(path, "rb") as handle, zipfile.ZipFile(handle) as archive:
        position = archive.start_dir
        for info in archive.infolist():
            handle.seek(position)
            entry = handle.read(46)
            lengths = struct.unpack("<HHH", entry[28:34])
            handle.seek(info.header_offset + 26)
            start = info.header_offset + 30 + sum(struct.unpack("<HH", handle.read(4)))
            if any(start == low for low, _ in spans):
                fields.append((position + 16, position + 20))
                if info.flag_bits & 0x08:
                    handle.seek(start + info.compress_size)
                    skip = 4 if handle.read(4) == b"PK\x07\x08" else 0
                    fields.append((start + info.compress_size + skip, start + info.compress_size + skip + 4))
                else:
                    fields.append((info.header_offset + 14, info.header_offset + 18))
            position += 46 + sum(lengths)
    return fields


def assert_only_head_bytes_differ(
    before: Path, after: Path, keys: tuple[str, ...] = ("fc.weight", "fc.bias")
) -> None:
    """The output is the input byte for byte but in the head's storages (and their CRCs); for a zip,
    every record (names, order, pickle) compares equal but those storages, and the archive checks out."""
    old, new = np.fromfile(before, dtype=np.uint8), np.fromfile(after, dtype=np.uint8)
    assert old.shape == new.shape
    spans, storages = _head_spans(before, list(keys))
    zipped = zipfile.is_zipfile(before)
    allowed = np.zeros(old.shape, dtype=bool)
    for low, high in spans + (_crc_fields(before, spans) if zipped else []):
        allowed[low:high] = True
    differing = old != new
    assert differing.any() and not (differing & ~allowed).any()
    if zipped:
        with zipfile.ZipFile(before) as a, zipfile.ZipFile(after) as b:
            assert [info.filename for info in a.infolist()] == [info.filename for info in b.infolist()]
            assert b.testzip() is None  # every CRC-32 matches its record
            for info in a.infolist():
                if a.read(info) != b.read(info.filename):
                    assert info.filename.rsplit("/", 2)[-2:] in [["data", key] for key in storages], (
                        info.filename
                    )


def _problem(tmp_path: Path, classes: int = 4, width: int = 6) -> tuple[OrderedDict, Path]:
    generator = torch.Generator().manual_seed(5)
    state = OrderedDict(
        [
            ("body.weight", torch.randn(width, 5, generator=generator)),
            ("fc.weight", torch.randn(classes, width, generator=generator)),
            ("fc.bias", torch.randn(classes, generator=generator)),
        ]
    )
    features = torch.randn(120, width, generator=generator)
    np.save(tmp_path / "features.npy", features.numpy())
    np.save(tmp_path / "labels.npy", (features @ state["fc.weight"].T).argmax(1).numpy())
    return state, tmp_path / "features.npy"


def _repair(source: Path, features: Path, output: Path) -> None:
    result = run("repair", source, "-f", features, "--k", 2, "-o", output)
    assert result.exit_code == 0, result.output


def test_a_training_state_keeps_every_byte_but_the_head(tmp_path: Path) -> None:
    state, features = _problem(tmp_path)
    model = torch.nn.Sequential(OrderedDict(body=torch.nn.Linear(5, 6), fc=torch.nn.Linear(6, 4)))
    model.load_state_dict(
        {
            "body.weight": state["body.weight"],
            "body.bias": torch.zeros(6),
            **{k: v for k, v in state.items() if k.startswith("fc")},
        }
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    model(torch.randn(3, 5)).sum().backward()
    optimizer.step()
    scheduler.step()
    training = {
        "epoch": 4,
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "scheduler_state_dict": scheduler.state_dict(),
        "rng": torch.get_rng_state(),
    }
    torch.save(training, tmp_path / "train.pt")
    _repair(tmp_path / "train.pt", features, tmp_path / "out.pt")
    assert_only_head_bytes_differ(tmp_path / "train.pt", tmp_path / "out.pt")
    loaded = torch.load(tmp_path / "out.pt", weights_only=True)
    assert loaded["optimizer_state_dict"]["param_groups"] == optimizer.state_dict()["param_groups"]
    assert torch.equal(loaded["rng"], training["rng"])
    assert not torch.equal(loaded["model_state_dict"]["fc.weight"], state["fc.weight"])
    assert torch.equal(loaded["model_state_dict"]["body.weight"], training["model_state_dict"]["body.weight"])
    optimizer.load_state_dict(loaded["optimizer_state_dict"])  # the framework takes its state back
    scheduler.load_state_dict(loaded["scheduler_state_dict"])


def test_a_timm_checkpoint_keeps_its_args_unbuilt(tmp_path: Path) -> None:
    """`args` (argparse.Namespace) is an object lip never builds: it stays as the pickle had it."""
    state, features = _problem(tmp_path)
    args = argparse.Namespace(model="resnet18", lr=0.05, epochs=3, mixup=None, data_dir=Path("/data"))
    content = {"epoch": 3, "arch": "resnet18", "state_dict": state, "args": args, "metric": 71.5}
    torch.save(content, tmp_path / "model_best.pth.tar")
    _repair(tmp_path / "model_best.pth.tar", features, tmp_path / "out.pth.tar")
    assert_only_head_bytes_differ(tmp_path / "model_best.pth.tar", tmp_path / "out.pth.tar")
    with torch.serialization.safe_globals([argparse.Namespace, type(Path())]):
        loaded = torch.load(tmp_path / "out.pth.tar", weights_only=True)
    assert vars(loaded["args"]) == vars(args)


@pytest.mark.parametrize("protocol", [2])
def test_a_legacy_file_keeps_every_byte_but_the_head(tmp_path: Path, protocol: int) -> None:
    state, features = _problem(tmp_path)
    torch.save(
        {"state_dict": state, "step": 9},
        tmp_path / "old.pt",
        _use_new_zipfile_serialization=False,
        pickle_protocol=protocol,
    )
    _repair(tmp_path / "old.pt", features, tmp_path / "out.pt")
    assert_only_head_bytes_differ(tmp_path / "old.pt", tmp_path / "out.pt")
    loaded = torch.load(tmp_path / "out.pt", weights_only=True)
    assert loaded["step"] == 9 and torch.equal(loaded["state_dict"]["body.weight"], state["body.weight"])


def test_views_and_strides_are_read_and_written_where_they_lie(tmp_path: Path) -> None:
    """A head that is a transposed view into a larger storage: read through its strides and offset,
    written back into the same elements, the rest of the storage untouched."""
    state, features = _problem(tmp_path)
    big = torch.randn(10, 8, generator=torch.Generator().manual_seed(1))
    weight_view = big[1:7, 2:6].T  # 4 x 6, strides (1, 8), offset 10
    big[1:7, 2:6] = state["fc.weight"].T
    kept = big.clone()
    torch.save({"fc.weight": weight_view, "fc.bias": state["fc.bias"], "whole": big}, tmp_path / "view.pt")
    result = run("repair", tmp_path / "view.pt", "-f", features, "--k", 2, "-o", tmp_path / "out.pt")
    assert result.exit_code == 1 and "shares its storage" in result.stderr  # `whole` would change too
    torch.save({"fc.weight": weight_view, "fc.bias": state["fc.bias"]}, tmp_path / "view.pt")
    read = torch_pickle.read_torch_file(tmp_path / "view.pt")
    assert torch.equal(read.tensor(read.root["fc.weight"]), weight_view)
    _repair(tmp_path / "view.pt", features, tmp_path / "out.pt")
    loaded = torch.load(tmp_path / "out.pt", weights_only=True)
    base = loaded["fc.weight"].untyped_storage()
    whole = torch.frombuffer(bytearray(bytes(base)), dtype=torch.float32).view(10, 8)
    outside = torch.ones(10, 8, dtype=torch.bool)
    outside[1:7, 2:6] = False
    assert torch.equal(whole[outside], kept[outside])
    assert torch.equal(whole[1:7, 2:6].T, loaded["fc.weight"])
    assert not torch.equal(loaded["fc.weight"], state["fc.weight"])


def test_a_name_that_is_not_utf8_is_read(tmp_path: Path) -> None:
    """E9: torch's zip reader wants a str that encodes to UTF-8; lip opens the file itself."""
    state, _ = _problem(tmp_path)
    name = Path(
        tmp_path.as_posix().encode().decode() + "/" + b"\xff\xfe_model.pt".decode("utf-8", "surrogateescape")
    )
    torch.save({"state_dict": state}, tmp_path / "plain.pt")
    name.write_bytes((tmp_path / "plain.pt").read_bytes())
    result = run("inspect", name, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (b"\x80\x02" + bytes(range(7, 250)) * 8, "it is corrupt"),
        (b"\x80\x02}q\x00(X\x01\x00\x00\x00a", "it is corrupt (it ends"),
    ],
)
def test_random_bytes_after_a_pickle_header_are_corrupt(tmp_path: Path, content: bytes, said: str) -> None:
    (tmp_path / "rnd.pt").write_bytes(content)
    result = run("inspect", tmp_path / "rnd.pt")
    assert result.exit_code == 1 and result.stderr.count("\n") == 1 and said in result.stderr, result.output


def test_a_legacy_storage_that_lies_about_its_size(tmp_path: Path) -> None:
    """E10: a storage that declares more than the file holds: "truncated or lies about its size"."""
    state, _ = _problem(tmp_path)
    torch.save({"state_dict": state}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    data = (tmp_path / "old.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:-40])
    for name in ("cut.pt",):
        result = run("inspect", tmp_path / name)
        assert result.exit_code == 1 and result.stderr.count("\n") == 1
        assert "the file is truncated or lies about its size" in result.stderr, result.stderr


def _compare(found: object, expected: object, read: torch_pickle.TorchFile, where: str = "") -> None:
    if isinstance(found, torch_pickle.TensorRef):
        tensor = read.tensor(found)
        assert tensor.dtype == expected.dtype and torch.equal(tensor, expected), where
        assert tensor.stride() == expected.stride(), where
    elif isinstance(found, dict):
        assert list(found) == list(expected), where
        for key in found:
            _compare(found[key], expected[key], read, f"{where}/{key}")
    elif isinstance(found, list | tuple):
        assert len(found) == len(expected), where
        for index, (a, b) in enumerate(zip(found, expected, strict=True)):
            _compare(a, b, read, f"{where}[{index}]")
    elif not isinstance(found, torch_pickle.Opaque):
        assert found == expected, where


@pytest.mark.parametrize(
    "serialization", [{}, {"_use_new_zipfile_serialization": False}, {"pickle_protocol": 4}]
)
def test_the_walk_reads_what_torch_load_reads(tmp_path: Path, serialization: dict) -> None:
    """Every tensor (dtypes, views with offsets and strides, parameters, empty ones), container and
    plain value, against torch.load of the same file."""
    generator = torch.Generator().manual_seed(2)
    base = torch.randn(20, 8, generator=generator)
    state = OrderedDict(
        weight=torch.randn(10, 32, generator=generator),
        transposed=base.T,
        window=base[3:7, 2:5],
        longs=torch.arange(5),
        parameter=torch.nn.Parameter(torch.ones(2, 2)),
        empty=torch.zeros(0, 4),
        half=base.half(),
        bfloat=base[1].bfloat16(),
        flags=base[0] > 0,
    )
    if not serialization:  # no typed storage for these: torch writes them through _rebuild_tensor_v3
        state["unsigned"] = torch.arange(3).to(torch.uint16)
    content = {
        "state_dict": state,
        "epoch": 3,
        "lr": 0.5,
        "tags": ["a", "b"],
        "pair": (1, None),
        "big": 2**70,
    }
    torch.save(content, tmp_path / "all.pt", **serialization)
    read = torch_pickle.read_torch_file(tmp_path / "all.pt")
    _compare(read.root, torch.load(tmp_path / "all.pt", weights_only=False), read)
