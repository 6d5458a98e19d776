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
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lip_cli import labelled, torch_pickle
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


class _Call:
    """Pickles as a call `function(*arguments)`: what a 3 KB file needs to ask for gigabytes."""

    def __init__(self, function: object, *arguments: object) -> None:
        self.function, self.arguments = function, arguments

    def __reduce__(self):
        return (self.function, self.arguments)


def _sized(kind: type, size: int) -> _Call:
    return _Call(kind, size)


def _bombs() -> dict[str, object]:
    """E1-E5 of the adversarial pass (faults-2026-12-02.md) and variations: each small, each asking
    torch.load for gigabytes or for exponential work; lip builds none of it."""
    import _codecs
    import collections

    hexed = _sized(bytearray, 32 * 2**20)
    for _ in range(8):
        hexed = _Call(_codecs.encode, hexed, "hex")
    shared: list = [1]
    for _ in range(60):
        shared = [shared, shared]
    shared_dict: dict = {"leaf": 1}
    for _ in range(200):
        shared_dict = {"a": shared_dict, "b": shared_dict, "c": [shared_dict] * 3}
    return {
        "e1": _Call(bytearray, _Call(int, "2500000000")),
        "e1b": _Call(bytes, _Call(int, "25000000000")),
        "e1c": _Call(bytearray, _Call(int, 2.5e9)),
        "e2": [_sized(bytearray, 64 * 2**20) for _ in range(60)],
        "e3": hexed,
        "e4": _Call(list, _sized(bytearray, 64 * 2**20)),
        "e4b": _Call(collections.Counter, _sized(bytearray, 2**31)),
        "e4c": _Call(set, _Call(list, _sized(bytes, 2**31))),
        "e5": shared,
        "e5b": shared_dict,
        "e6": _Call(complex, _Call(int, "9" * 4000)),
    }


def _save_bombs(folder: Path, model: Path) -> list[str]:
    state = torch.load(model, weights_only=True)
    names = []
    for name, payload in _bombs().items():
        for legacy in (False, True) if name in ("e1", "e2") else (False,):
            file = f"{name}{'-legacy' if legacy else ''}.pt"
            torch.save(
                {"state_dict": state, "h": payload}, folder / file, _use_new_zipfile_serialization=not legacy
            )
            assert (folder / file).stat().st_size < 200_000, file
            names.append(file)
    return names


def _memo_list(path: Path, items: int) -> None:
    """A torch archive whose (deflated) pickle is one list of `items` memo references: a few KB
    that the old design expanded into a tuple per element."""
    pickle = b"\x80\x02]q\x00(" + b"h\x00" * items + b"e."
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", pickle)


def test_small_files_asking_for_gigabytes_cost_only_what_they_hold(tmp_path: Path, problem) -> None:
    """E1-E5 and variations, through inspect, repair and compare in one real process: each is read
    (its payload never built, and kept byte for byte in the repaired copy) or refused in one line,
    all of them within seconds and the memory bound."""
    names = _save_bombs(tmp_path, problem["model"])
    _memo_list(tmp_path / "memo.pt", torch_pickle.MAX_VALUES + 10)
    assert (tmp_path / "memo.pt").stat().st_size < 200_000
    runs = [["inspect", name, "--json"] for name in names]
    for name in ("e1.pt", "e2-legacy.pt", "e3.pt", "e4.pt", "e5.pt", "e5b.pt"):
        runs.append(["compare", name, problem["model"], "--json"])
        runs.append(["repair", name, "-f", problem["features"], "--k", 3, "-o", f"out-{name}"])
    runs.append(["inspect", "memo.pt"])
    script = (
        "import json, sys, contextlib, io\nfrom lip_cli.cli import app\n"
        "for arguments in json.loads(sys.argv[1]):\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        code = app(arguments, standalone_mode=False)\n"
        "    print(f'exit {code}', file=sys.stderr)\n"
    )
    commands = json.dumps([[str(part) for part in arguments] for arguments in runs])
    code, stderr, rss = run_measured(script, commands, cwd=tmp_path)
    assert code == 0, stderr
    lines = [line for line in stderr.strip().splitlines() if line.startswith(("exit", "error"))]
    assert set(lines[:-2]) <= {"exit 0", "exit None"} and len(lines) == len(runs) + 1, stderr
    assert lines[-2:] == [
        f"error: memo.pt: its pickle holds more than {torch_pickle.MAX_VALUES:,} values besides its tensors, "
        "past lip's bound; re-save the file with the state dict alone",
        "exit 1",
    ]
    assert rss < RSS_BOUND, rss
    for name in ("e1.pt", "e3.pt", "e5.pt"):
        with (
            zipfile.ZipFile(tmp_path / name) as archive,
            zipfile.ZipFile(tmp_path / f"out-{name}") as written,
        ):
            pickled = next(entry for entry in archive.namelist() if entry.endswith("data.pkl"))
            assert written.read(pickled) == archive.read(pickled)  # the payload kept as it was


def test_a_features_file_that_is_one_declared_value_is_refused(tmp_path: Path) -> None:
    torch.save(_sized(bytearray, 3 * 10**9), tmp_path / "features.pt")
    with pytest.raises(LipError, match="holds an object, expected a tensor or a dict of tensors"):
        labelled.open_features(tmp_path / "features.pt")


def test_small_bytes_values_are_kept(tmp_path: Path, problem) -> None:
    state = torch.load(problem["model"], weights_only=True)
    extra = {"blob": _sized(bytes, 1000), "buffer": _sized(bytearray, 10)}
    torch.save({"state_dict": state, "extra": extra}, tmp_path / "small.pt")
    result = runner.invoke(
        app, ["repair", str(tmp_path / "small.pt"), "-f", str(problem["features"]), "--k", "3"]
    )
    assert result.exit_code == 0, result.output
    kept = torch.load(tmp_path / "small.lip.pt", weights_only=False)["extra"]
    assert kept == {"blob": bytes(1000), "buffer": bytearray(10)}


def test_bombs_are_refused_within_the_memory_bound(tmp_path: Path, problem) -> None:
    """One real lip process per kind of bomb: a torch archive whose pickle inflates past its bound,
    a 2 MB .npz of 250 million labels (the row counts disagree, as its header tells). Each is
    refused in one line, none near its size in memory."""
    size = torch_pickle.MAX_PICKLE_BYTES + 2**20
    prefix = b"\x80\x04\x8e" + struct.pack("<Q", size - 12)  # PROTO 4, BINBYTES8 of the rest
    write_zip_bomb(tmp_path / "pickle.pt", [("archive/data.pkl", prefix, size - 12, b".")], crc=False)
    rows = 250_000_000
    labels = [("labels.npy", npy_header("<i8", (rows,)), rows * 8, b"")]
    write_zip_bomb(tmp_path / "labels.npz", labels, crc=False)
    assert all((tmp_path / name).stat().st_size < 3 * 2**20 for name in ("pickle.pt", "labels.npz"))
    features = problem["features"]
    runs = [
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
        f"error: pickle.pt: its pickle (archive/data.pkl) inflates to {size:,} bytes, past lip's bound of "
        f"{torch_pickle.MAX_PICKLE_BYTES:,} bytes; the tensors of a torch file are stored apart",
        "exit 1",
        f"error: labels.npz[labels]: {rows} labels but {rows_held} feature rows in {features}",
        "exit 1",
    ]
    assert rss < RSS_BOUND


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


def test_a_tensor_that_claims_more_than_its_storage(tmp_path: Path) -> None:
    """Zero strides let a 4-byte storage claim 10^12 values: mapped as it is, and refused by what
    the values would cost, never allocated."""
    torch.save({"fc.weight": torch.zeros(1).expand(10**6, 10**6)}, tmp_path / "wide.pt")
    result = runner.invoke(app, ["inspect", str(tmp_path / "wide.pt")])
    assert result.exit_code == 1 and "zero or overlapping strides" in result.stderr
