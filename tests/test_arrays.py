""".npy features are read in chunks mapped from the file: the values, and the file left alone."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lip_cli import arrays, labelled
from lip_cli.errors import LipError


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.integers(0, 300),
    width=st.integers(0, 40),
    dtype=st.sampled_from([np.float16, np.float32, np.float64, np.int64, np.uint8]),
    version=st.sampled_from([(1, 0), (2, 0)]),
    bounds=st.lists(st.integers(0, 320), min_size=2, max_size=8),
)
def test_chunks_hold_the_files_rows_and_writing_to_one_leaves_the_file_alone(
    tmp_path: Path, rows: int, width: int, dtype, version, bounds: list[int]
) -> None:
    values = (np.arange(rows * width) % 251).astype(dtype).reshape(rows, width)
    path = tmp_path / "features.npy"
    with open(path, "wb") as handle:
        np.lib.format.write_array(handle, values, version=version)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    source = arrays.open_arrays(path)[None]
    assert source.shape == (rows, width)
    for start, stop in zip(bounds, bounds[1:], strict=False):
        chunk = source.read(start, stop)
        expected = values[start:stop] if start < stop else values[0:0]
        assert tuple(chunk.shape) == expected.shape
        assert np.array_equal(chunk.numpy(), expected)
        chunk += 1  # a tensor like any other: it may be changed in place
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert np.array_equal(source.read(0, rows).numpy(), values)  # and the next read is the file's


def test_a_chunk_outlives_the_source_it_came_from(tmp_path: Path) -> None:
    values = np.random.default_rng(0).standard_normal((1000, 33)).astype(np.float32)
    np.save(tmp_path / "features.npy", values)
    chunks = [
        arrays.open_arrays(tmp_path / "features.npy")[None].read(start, start + 100) for start in (0, 450)
    ]
    assert torch.equal(torch.cat(chunks), torch.from_numpy(np.concatenate([values[:100], values[450:550]])))


def test_a_file_cut_short_after_it_was_opened_fails_with_a_line_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "features.npy"
    np.save(path, np.ones((1000, 64), dtype=np.float32))
    source = arrays.open_arrays(path)[None]
    assert source.read(0, 10).shape == (10, 64)
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)
    assert source.read(0, 10).shape == (10, 64)  # still within the file
    with pytest.raises(LipError, match=r"rows 900-1000 .*shorter than its header says"):
        source.read(900, 1000)


def test_rows_at_an_odd_offset_come_back_aligned(tmp_path: Path) -> None:
    """A crafted header may put the data at any offset; the chunks handed to torch are aligned."""
    values = np.arange(40, dtype=np.float64).reshape(10, 4)
    text = "{'descr': '<f8', 'fortran_order': False, 'shape': (10, 4), }"
    body = text.ljust(63) + "\n"  # data at byte 74: not a multiple of 8
    path = tmp_path / "features.npy"
    header = b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body.encode()
    path.write_bytes(header + values.tobytes())
    chunk = arrays.open_arrays(path)[None].read(1, 5)
    assert np.array_equal(chunk.numpy(), values[1:5])
    assert chunk.data_ptr() % chunk.element_size() == 0


def test_labels_of_one_value_are_refused_when_opened(tmp_path: Path) -> None:
    np.save(tmp_path / "labels.npy", np.int64(3))
    with pytest.raises(LipError, match=r"labels\.npy: labels must be a class vector .*shape \(\)"):
        labelled.open_labels(tmp_path / "labels.npy")
