"""Small files that declare or inflate to gigabytes: refused, or read chunk by chunk, within a bound
on the peak memory of a real process: its VmHWM, the high-water mark of its own address space.

Not ru_maxrss: a child forked from pytest (which holds hundreds of MB after other tests) keeps the
parent's resident set as its maximum from before its exec."""

from __future__ import annotations

import io
import json
import os
import resource
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lip_cli import checkpoint, labelled, pickle_scan
from lip_cli.cli import app
from lip_cli.errors import LipError
from tests.conftest import make_head, save_problem

RSS_BOUND = 1_000_000_000  # bytes: torch and numpy cost about 250 MB; every bomb here is 1-3 GB
ADDRESS_LIMIT = 8 * 2**30  # a regression fails inside this cap instead of filling the shared machine
BLOCK = 1 << 22
runner = CliRunner()


@pytest.fixture
def problem(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "data").mkdir()
    return save_problem(tmp_path / "data", make_head(n=200, q=12, l=10))


def _zeros_stream(zeros: int) -> bytes:
    """Raw deflate blocks for `zeros` zero bytes: one block, compressed once and repeated (each ends
    on a full flush, so that blocks from separate compressors join into one valid stream)."""
    full, rest = divmod(zeros, BLOCK)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(bytes(BLOCK)) + compressor.flush(zlib.Z_FULL_FLUSH)
    tail = zlib.compressobj(9, zlib.DEFLATED, -15)
    return block * full + tail.compress(bytes(rest)) + tail.flush(zlib.Z_FULL_FLUSH)


def _crc(prefix: bytes, zeros: int, suffix: bytes) -> int:
    crc, zero = zlib.crc32(prefix), bytes(BLOCK)
    for _ in range(zeros // BLOCK):
        crc = zlib.crc32(zero, crc)
    return zlib.crc32(suffix, zlib.crc32(bytes(zeros % BLOCK), crc))


def write_zip_bomb(path: Path, members: list[tuple[str, bytes, int, bytes]], crc: bool = True) -> None:
    """A zip whose deflated members are `prefix`, `zeros` zero bytes, then `suffix` (no zip64: each
    member under 4 GiB). Without `crc` the checksums are left 0: for files that must be refused
    before anything reads a member to its end."""
    local, central = bytearray(), bytearray()
    for name, prefix, zeros, suffix in members:
        data = b""
        for part in (prefix, suffix):
            compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
            piece = compressor.compress(part) + compressor.flush(zlib.Z_FULL_FLUSH)
            data = data + piece if part is prefix else data + _zeros_stream(zeros) + piece
        data += zlib.compressobj(9, zlib.DEFLATED, -15).flush()  # the final (empty) block
        checksum = _crc(prefix, zeros, suffix) if crc else 0
        size, raw = len(prefix) + zeros + len(suffix), name.encode()
        fields = (20, 0, 8, 0, 33, checksum, len(data), size, len(raw), 0)
        central += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, *fields, 0, 0, 0, 0, len(local)) + raw
        local += struct.pack("<4s5H3L2H", b"PK\x03\x04", *fields) + raw + data
    count = len(members)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, count, count, len(central), len(local), 0)
    path.write_bytes(bytes(local + central) + end)


def npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_LIMIT, ADDRESS_LIMIT))


PEAK = "\nprint('peak', open('/proc/self/status').read().split('VmHWM:')[1].split()[0], file=sys.stderr)\n"


def run_measured(script: str, *arguments: object, cwd: Path) -> tuple[int, str, int]:
    """Exit code, stderr (less the last line) and peak RSS (bytes) of `python -c script`, run under
    an address-space cap, which reports its own VmHWM as its last line."""
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc/self/status (Linux) to read a process's peak memory")
    process = subprocess.run(
        [sys.executable, "-c", script + PEAK, *map(str, arguments)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_limit_memory,
        env={**os.environ, "COLUMNS": "400", "OMP_NUM_THREADS": "1"},
    )
    lines = process.stderr.strip().splitlines()
    if process.returncode != 0 or not lines or not lines[-1].startswith("peak "):
        return process.returncode, process.stderr, 0
    return process.returncode, "\n".join(lines[:-1]), int(lines[-1].split()[1]) * 1024


class _Sized:
    """Pickles as a call `kind(size)`: what a 3 KB file needs to make 3 GB."""

    def __init__(self, kind: type, size: int) -> None:
        self.kind, self.size = kind, size

    def __reduce__(self):
        return (self.kind, (self.size,))


def _declared_bomb(path: Path, model: Path, kind: type, **serialization: object) -> None:
    state = torch.load(model, weights_only=True)
    payload = {"x": _Sized(kind, 3 * 10**9), "again": _Sized(kind, 3 * 10**9)}  # the second from the memo
    torch.save({"state_dict": state, "hyper_parameters": payload}, path, **serialization)


def _declared_message(path: object, kind: type) -> str:
    return (
        f"{path}: builds a {kind.__name__} of 3,000,000,000 bytes, past lip's bound of "
        f"{pickle_scan.MAX_VALUE_BYTES:,} bytes for a value that is not a tensor; re-save the file without it"
    )


@pytest.mark.parametrize(
    ("kind", "serialization"),
    [
        (bytearray, {}),
        (bytes, {"_use_new_zipfile_serialization": False}),  # legacy pickle
        (bytes, {"pickle_protocol": 4}),  # STACK_GLOBAL names the callable from two strings
    ],
)
def test_a_value_the_pickle_only_declares_is_refused(tmp_path: Path, problem, kind, serialization) -> None:
    _declared_bomb(tmp_path / "bomb.pt", problem["model"], kind, **serialization)
    assert (tmp_path / "bomb.pt").stat().st_size < 10_000
    with pytest.raises(LipError) as refused:
        checkpoint.load_checkpoint(tmp_path / "bomb.pt")
    assert str(refused.value) == _declared_message(tmp_path / "bomb.pt", kind)


def test_a_features_file_that_is_one_declared_value_is_refused(tmp_path: Path) -> None:
    torch.save(_Sized(bytearray, 3 * 10**9), tmp_path / "features.pt")
    with pytest.raises(LipError, match="builds a bytearray of 3,000,000,000 bytes"):
        labelled.open_features(tmp_path / "features.pt")


def test_small_bytes_values_are_kept(tmp_path: Path, problem) -> None:
    state = torch.load(problem["model"], weights_only=True)
    extra = {"blob": _Sized(bytes, 1000), "buffer": _Sized(bytearray, 10)}
    torch.save({"state_dict": state, "extra": extra}, tmp_path / "small.pt")
    result = runner.invoke(
        app, ["repair", str(tmp_path / "small.pt"), "-f", str(problem["features"]), "--k", "3"]
    )
    assert result.exit_code == 0, result.output
    kept = torch.load(tmp_path / "small.lip.pt", weights_only=False)["extra"]
    assert kept == {"blob": bytes(1000), "buffer": bytearray(10)}


def test_bombs_are_refused_within_the_memory_bound(tmp_path: Path, problem) -> None:
    """One real lip process per kind of bomb: a 3 KB checkpoint declaring bytes(3e9), a torch archive
    whose pickle inflates past its bound, a 2 MB .npz of 250 million labels (the row counts
    disagree, as its header tells). Each is refused in one line, none near its size in memory."""
    _declared_bomb(tmp_path / "bytes.pt", problem["model"], bytes)
    size = pickle_scan.MAX_PICKLE_BYTES + 2**20
    prefix = b"\x80\x04\x8e" + struct.pack("<Q", size - 12)  # PROTO 4, BINBYTES8 of the rest
    write_zip_bomb(tmp_path / "pickle.pt", [("archive/data.pkl", prefix, size - 12, b".")], crc=False)
    rows = 250_000_000
    labels = [("labels.npy", npy_header("<i8", (rows,)), rows * 8, b"")]
    write_zip_bomb(tmp_path / "labels.npz", labels, crc=False)
    assert all((tmp_path / name).stat().st_size < 3 * 2**20 for name in ("pickle.pt", "labels.npz"))
    features = problem["features"]
    runs = [
        ["repair", "bytes.pt", "-f", features, "--k", 3, "-o", "out.pt"],
        ["inspect", "pickle.pt"],
        ["repair", problem["model"], "-f", features, "--labels", "labels.npz", "--k", 3, "--dry-run"],
    ]
    script = (
        "import json, sys\nfrom lip_cli.cli import app\n"
        "for arguments in json.loads(sys.argv[1]):\n"
        "    print(f'exit {app(arguments, standalone_mode=False)}', file=sys.stderr)\n"
    )
    commands = json.dumps([[str(part) for part in arguments] for arguments in runs])
    code, stderr, rss = run_measured(script, commands, cwd=tmp_path)
    assert code == 0, stderr
    rows_held = np.load(features, mmap_mode="r").shape[0]
    assert stderr.strip().splitlines() == [
        f"error: {_declared_message('bytes.pt', bytes)}",
        "exit 1",
        f"error: pickle.pt: its pickle (archive/data.pkl) inflates to {size:,} bytes, past lip's bound of "
        f"{pickle_scan.MAX_PICKLE_BYTES:,} bytes; the tensors of a torch file are stored apart",
        "exit 1",
        f"error: labels.npz[labels]: {rows} labels but {rows_held} feature rows in {features}",
        "exit 1",
    ]
    assert rss < RSS_BOUND and not (tmp_path / "out.pt").exists()


def test_npz_features_are_read_chunk_by_chunk(tmp_path: Path) -> None:
    """A 1 MB .npz whose features inflate to 512 MiB (and labels to 32 MiB), read to the end in a
    child process that holds only a chunk at a time."""
    rows, width = 2**22, 32
    members = [
        ("features.npy", npy_header("<f4", (rows, width)), rows * width * 4, b""),
        ("labels.npy", npy_header("<i8", (rows,)), rows * 8, b""),
    ]
    write_zip_bomb(tmp_path / "cache.npz", members)
    assert (tmp_path / "cache.npz").stat().st_size < 2 * 2**20
    script = (
        "import sys; from lip_cli import arrays, labelled\n"
        "features, labels = labelled.open_features(sys.argv[1])\n"
        "seen = sum(len(x) for _, x, _ in arrays.iter_batches(features, labels, 2**17))\n"
        "assert seen == features.rows == labels.rows, seen\n"
        "assert labelled.label_range(labels) == (0, 0)\n"
    )
    code, stderr, rss = run_measured(script, "cache.npz", cwd=tmp_path)
    assert code == 0, stderr
    assert rss < 500_000_000, rss  # torch and numpy: about 250 MB; the member alone is 537 MB


@pytest.mark.parametrize(
    "serialization",
    [{}, {"pickle_protocol": 4}, {"pickle_protocol": 5}, {"_use_new_zipfile_serialization": False}],
    ids=["zip", "protocol-4", "protocol-5", "legacy"],
)
def test_the_walk_follows_ordinary_checkpoints_to_the_end(tmp_path: Path, serialization) -> None:
    import argparse
    from collections import OrderedDict

    state = OrderedDict(fc=torch.zeros(2, 3), bias=torch.zeros(2))
    content = {"state_dict": state, "args": argparse.Namespace(lr=0.1, tags=["a"]), "epoch": 3, "blob": b"x"}
    torch.save(content, tmp_path / "model.pt", **serialization)
    scan = pickle_scan.scan(tmp_path / "model.pt")
    assert scan.complete
    assert {"argparse.Namespace", "collections.OrderedDict"} <= scan.globals


def test_a_sized_call_the_walk_cannot_follow_is_refused(tmp_path: Path) -> None:
    """A REDUCE with nothing on the stack cannot be followed; naming `bytes` makes that a refusal."""
    (tmp_path / "odd.pt").write_bytes(b"\x80\x02cbuiltins\nbytes\nR.")
    with pytest.raises(LipError, match="names `builtins.bytes` in a form lip cannot bound"):
        pickle_scan.scan(tmp_path / "odd.pt")
