"""Arrays on disk: formats, validation and chunked reading (labels: `labelled`).

Formats: `.npy` (memory-mapped), `.npz`, `.pt`/`.pth` (their pickle read without building it,
tensors mapped from their storages: torch_pickle) and `.safetensors` (read slice by slice). A
container may hold the labels beside the features; otherwise the labels file beside it
(`layout.beside_labels`) is used.
"""

from __future__ import annotations

import glob
import mmap
import os
import threading
import weakref
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor

from lip_cli import files, formats
from lip_cli.errors import LipError, first_line

FEATURE_KEYS = ("features", "feats", "embeddings", "x", "X")
LABEL_KEYS = ("labels", "targets", "label", "y", "Y")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
}
ARRAY_SUFFIXES = (".npy", ".npz", ".pt", ".pth", ".safetensors")


@dataclass(frozen=True)
class ArraySource:
    """One array in a file, read by row ranges so that large caches never load whole."""

    path: Path
    key: str | None
    shape: tuple[int, ...]
    dtype: torch.dtype
    reader: Callable[[int, int], Tensor]

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 0

    @property
    def name(self) -> str:
        return str(self.path) if self.key is None else f"{self.path}[{self.key}]"

    def read(self, start: int = 0, stop: int | None = None) -> Tensor:
        stop = self.rows if stop is None else stop
        try:
            return self.reader(start, stop)
        except (OSError, ValueError, RuntimeError) as error:
            raise LipError(f"{self.name}: cannot read rows {start}-{stop} ({first_line(error)})") from error


def _torch_dtype(numpy_dtype: np.dtype, path: Path) -> torch.dtype:
    try:
        return torch.from_numpy(np.empty(0, dtype=numpy_dtype)).dtype
    except TypeError as error:
        raise LipError(f"{path}: arrays of dtype {numpy_dtype} are not supported") from error


def _from_numpy(array: np.ndarray, path: Path, key: str | None) -> ArraySource:
    return ArraySource(
        path=path,
        key=key,
        shape=tuple(array.shape),
        dtype=_torch_dtype(array.dtype, path),
        reader=lambda a, b: torch.from_numpy(np.array(array[a:b])),  # a copy: memmaps are read-only
    )


def tensor_problem(tensor: Tensor) -> str | None:
    """Why a loaded tensor cannot be read as the plain numbers its shape claims, or None.

    Quantized, sparse and meta tensors have no plain values; a storage smaller than the shape needs
    (zero or overlapping strides) would make a tiny file claim any amount of work.
    """
    problem = getattr(tensor, "lip_problem", None)  # what torch_pickle found instead of its values
    if problem is not None:
        return problem
    if tensor.is_quantized:
        return f"is a quantized tensor ({tensor.dtype}); save tensor.dequantize() instead"
    if tensor.layout != torch.strided:
        return f"is a {tensor.layout} tensor; convert it with .to_dense() and save it again"
    if tensor.device.type == "meta":
        return "is a meta tensor (a shape with no values); save the real tensor"
    held = tensor.untyped_storage().nbytes() // tensor.element_size() - tensor.storage_offset()
    if tensor.numel() > held:
        return (
            f"claims shape {tuple(tensor.shape)} ({tensor.numel()} values) but its storage holds {held} "
            "(zero or overlapping strides); save a contiguous copy (tensor.contiguous())"
        )
    return None


def _from_tensor(tensor: Tensor, path: Path, key: str | None) -> ArraySource:
    problem = tensor_problem(tensor)
    if problem is not None:
        raise LipError(f"{path if key is None else f'{path}[{key}]'}: {problem}")
    return ArraySource(
        path=path, key=key, shape=tuple(tensor.shape), dtype=tensor.dtype, reader=lambda a, b: tensor[a:b]
    )


def _open_npy(path: Path) -> dict[str | None, ArraySource]:
    """Chunks mapped from the file as they are read, with no copy; a chunk's pages leave memory
    when the chunk is dropped, so RSS stays at the chunks in use.

    As with any mapped file (np.load's mmap_mode, safetensors), a file cut short by another
    program while one of its chunks is in use ends the process with SIGBUS; one cut short between
    chunks gives one line. Copying each chunk instead cost 0.4 s of a 4 s pass at 200,000 x 2048.
    """
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
            return {None: _from_numpy(array, path, None)}
        shape, fortran_order, dtype = readers[version](handle)
        _check_header_shape(shape)
        offset = handle.tell()
        if fortran_order or dtype.hasobject or not shape:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
            return {None: _from_numpy(array, path, None)}
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        if offset + shape[0] * row_bytes > os.fstat(handle.fileno()).st_size:
            raise ValueError("file is shorter than its header says (truncated?)")
        descriptor = os.dup(handle.fileno())

    def read(start: int, stop: int) -> Tensor:
        stop = min(stop, shape[0])
        if row_bytes == 0 or stop <= start:
            return torch.from_numpy(np.zeros((max(stop - start, 0), *shape[1:]), dtype=dtype))
        begin, count = offset + start * row_bytes, (stop - start) * row_bytes
        if os.fstat(descriptor).st_size < begin + count:  # a mapped page past the end would kill lip
            raise ValueError("the file is now shorter than its header says (changed while being read?)")
        first = begin // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
        # copy-on-write: the chunk may be changed in memory like any tensor; the file never is
        mapped = mmap.mmap(descriptor, begin + count - first, access=mmap.ACCESS_COPY, offset=first)
        rows = np.frombuffer(mapped, dtype=dtype, count=count // dtype.itemsize, offset=begin - first)
        if (begin - first) % dtype.alignment:  # a crafted header put the data off its alignment
            rows = rows.copy()
        return torch.from_numpy(rows.reshape(stop - start, *shape[1:]))

    weakref.finalize(read, os.close, descriptor)
    return {None: ArraySource(path, None, tuple(shape), _torch_dtype(dtype, path), read)}


def _check_header_shape(shape: tuple[int, ...]) -> None:
    if any(size < 0 for size in shape):
        raise ValueError(f"its header claims shape {shape}, with a negative size")


NPZ_WHOLE_BYTES = 256 * 2**20  # a Fortran-order .npz member is inflated whole: only up to this size
LABEL_CHUNK_ROWS = 1 << 20  # labels scanned this many at a time for their largest id


def _open_npz(path: Path) -> dict[str | None, ArraySource]:
    """Every member's header now, checked against the member's declared size; a member's data
    only as its rows are read, inflated chunk by chunk, so that memory stays at the chunks in use
    however large a member inflates, and members that are never used cost nothing."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    sources: dict[str | None, ArraySource] = {}
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            key = info.filename.removesuffix(".npy")
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                if version not in readers:
                    raise ValueError(f"member {key} is an .npy of version {version}, not 1.0 or 2.0")
                shape, fortran_order, dtype = readers[version](member)
                header_bytes = member.tell()
            _check_header_shape(shape)
            if not dtype.hasobject:
                needed = header_bytes + int(np.prod(shape, dtype=object)) * dtype.itemsize
                if needed > info.file_size:
                    raise ValueError(f"member {key} is shorter than its header says ({shape} {dtype})")
                if fortran_order and needed > NPZ_WHOLE_BYTES:
                    raise LipError(
                        f"{path}[{key}]: a Fortran-order member of {needed:,} bytes, which lip would inflate "
                        f"whole (past its bound of {NPZ_WHOLE_BYTES:,}); save it in C order"
                    )
            dtype_torch = _torch_dtype(dtype, path)
            if fortran_order or dtype.hasobject or not shape:
                reader = _npz_reader(path, key)
            else:
                reader = _npz_rows(path, info, header_bytes, tuple(shape), dtype)
            sources[key] = ArraySource(path, key, tuple(shape), dtype_torch, reader)
    return sources


def _npz_rows(
    path: Path, info: zipfile.ZipInfo, offset: int, shape: tuple[int, ...], dtype: np.dtype
) -> Callable[[int, int], Tensor]:
    """Rows of a C-order .npz member, inflated from one open member as they are read: reading on
    from the last row read costs only those rows; reading back starts the member again."""
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    opened: list[tuple[zipfile.ZipFile, BinaryIO]] = []
    lock = threading.Lock()

    def read(start: int, stop: int) -> Tensor:
        stop = min(stop, shape[0])
        if row_bytes == 0 or stop <= start:
            return torch.from_numpy(np.zeros((max(stop - start, 0), *shape[1:]), dtype=dtype))
        begin, count = offset + start * row_bytes, (stop - start) * row_bytes
        with lock:
            if not opened:
                archive = zipfile.ZipFile(path)
                opened.append((archive, archive.open(info)))
                weakref.finalize(read, archive.close)
            member = opened[0][1]
            if member.tell() != begin:
                member.seek(begin)
            data = bytearray(count)
            got = member.readinto(data)
        if got != count:
            raise ValueError("the member is shorter than its header says")
        return torch.from_numpy(np.frombuffer(data, dtype=dtype).reshape(stop - start, *shape[1:]))

    return read


def _npz_reader(path: Path, key: str) -> Callable[[int, int], Tensor]:
    """Rows of a small .npz member that is not in C order, decompressed whole on the first read."""
    loaded: list[np.ndarray] = []

    def read(start: int, stop: int) -> Tensor:
        if not loaded:
            with np.load(path, allow_pickle=False) as archive:
                loaded.append(archive[key])
        return torch.from_numpy(np.array(loaded[0][start:stop]))

    return read


def _open_torch(path: Path) -> dict[str | None, ArraySource]:
    """The tensors of a torch file (a tensor, or a dict of them), mapped from their storages; the
    pickle is read symbolically (torch_pickle), nothing in it built or run."""
    from lip_cli import torch_pickle

    try:
        torch_file = torch_pickle.read_torch_file(path)
    except torch_pickle.CorruptPickle as error:
        raise LipError(f"{path}: not a readable torch file: it is corrupt ({error})") from error
    root = torch_file.root
    if isinstance(root, torch_pickle.TensorRef | torch_pickle.UnusableTensor):
        root = {None: root}
    elif not isinstance(root, dict):
        held = "a list" if isinstance(root, list) else "a tuple" if isinstance(root, tuple) else "an object"
        raise LipError(f"{path}: holds {held}, expected a tensor or a dict of tensors")
    state, _ = torch_pickle.tensors_of(torch_file, root)
    return {
        (None if key is None else str(key)): _from_tensor(tensor, path, None if key is None else str(key))
        for key, tensor in state.items()
    }


def _open_safetensors(path: Path) -> dict[str | None, ArraySource]:
    from safetensors import safe_open

    handle = safe_open(str(path), framework="pt")
    sources: dict[str | None, ArraySource] = {}
    for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
        tensor_slice = handle.get_slice(key)
        dtype = SAFETENSORS_DTYPES.get(tensor_slice.get_dtype())
        if dtype is None:
            continue
        sources[key] = ArraySource(
            path=path,
            key=key,
            shape=tuple(tensor_slice.get_shape()),
            dtype=dtype,
            reader=lambda a, b, s=tensor_slice: s[a:b],
        )
    return sources


OPENERS = {  # by content (formats.detect_format), whatever the suffix
    formats.NPY: _open_npy,
    formats.NPZ: _open_npz,
    formats.TORCH_ZIP: _open_torch,
    formats.TORCH_PICKLE: _open_torch,
    formats.SAFETENSORS: _open_safetensors,
}


def open_arrays(path: Path) -> dict[str | None, ArraySource]:
    """Every array in a file, by key (None for a file that holds one bare array)."""
    path = Path(path)
    if not path.exists():
        raise LipError(f"{path}: no such file")
    if path.is_dir():
        raise LipError(f"{path}: is a folder, expected one of {', '.join(ARRAY_SUFFIXES)}")
    if path.stat().st_size == 0:
        raise LipError(f"{path}: file is empty")
    opener = OPENERS.get(formats.detect_format(path))
    if opener is None:
        raise LipError(
            f"{path}: unknown array format (its first bytes are none of {', '.join(ARRAY_SUFFIXES)})"
        )
    try:
        sources = opener(path)
    except LipError:
        raise
    except Exception as error:  # every loader has its own error types for a corrupt file
        raise LipError(f"{path}: not a readable {path.suffix} file ({first_line(error)})") from error
    if not sources:
        raise LipError(f"{path}: holds no arrays")
    return sources


def pick(sources: dict[str | None, ArraySource], names: tuple[str, ...]) -> ArraySource | None:
    for name in names:
        if name in sources:
            return sources[name]
    return None


def shard_paths(spec: Path) -> list[Path] | None:
    """The files of a sharded cache, sorted: a glob (`feats/part-*.npy`) or a folder of array files.
    None when `spec` names one file (also one whose name holds glob characters, as `feats[1].npy`)."""
    text = str(spec)
    if any(char in text for char in "*?[") and not os.path.lexists(spec):
        # every match but folders: a special file is refused by the path policy, never skipped
        paths = sorted(Path(match) for match in glob.glob(text) if not Path(match).is_dir())
        if not paths:
            raise LipError(f"{spec}: no file matches")
        return paths
    if Path(spec).is_dir():
        paths = sorted(path for path in Path(spec).iterdir() if path.suffix.lower() in ARRAY_SUFFIXES)
        if not paths:
            raise LipError(f"{spec}: a folder with no {', '.join(ARRAY_SUFFIXES)} files")
        return [files.member(Path(spec), path.name, "shard") for path in paths]
    return None


def concatenate(sources: list[ArraySource], name: str) -> ArraySource:
    """Shards as one array along the rows; a read touches only the shards it overlaps."""
    offsets = [0]
    for source in sources:
        offsets.append(offsets[-1] + source.rows)

    def read(start: int, stop: int) -> Tensor:
        pieces = []
        for source, first in zip(sources, offsets, strict=False):
            low, high = max(start, first), min(stop, first + source.rows)
            if low < high:
                pieces.append(source.read(low - first, high - first))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    shape = (offsets[-1], *sources[0].shape[1:])
    return ArraySource(path=Path(name), key=None, shape=shape, dtype=sources[0].dtype, reader=read)


def check_features(features: ArraySource) -> None:
    if len(features.shape) != 2:
        raise LipError(f"{features.name}: features must be 2-D (samples x dims), got shape {features.shape}")
    if features.dtype not in FLOAT_DTYPES:
        raise LipError(f"{features.name}: features must be floating point, got {features.dtype}")
    if features.shape[1] == 0:
        raise LipError(f"{features.name}: features have no columns (shape {features.shape})")
    if features.rows == 0:
        raise LipError(f"{features.name}: holds no samples")


def _all_finite(values: Tensor) -> bool:
    """No NaN or Inf: min and max propagate both, in one pass with no temporary."""
    if values.numel() == 0:
        return True
    low, high = torch.aminmax(values)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def iter_batches(
    features: ArraySource, labels: ArraySource, chunk_rows: int, rows: tuple[int, int] | None = None
) -> Iterator[tuple[int, Tensor, Tensor]]:
    """(start row, features, labels) in chunks of `chunk_rows`, checked for NaN and Inf.

    `rows` = (first, end) limits the pass to a range of rows (one process's share).
    """
    first, end = rows if rows is not None else (0, features.rows)
    for start in range(first, end, chunk_rows):
        stop = min(start + chunk_rows, end)
        x = features.read(start, stop)
        if not _all_finite(x):
            raise LipError(f"{features.name}: rows {start}-{stop - 1} hold NaN or Inf values")
        y = labels.read(start, stop)
        if y.dtype.is_floating_point and not _all_finite(y):
            raise LipError(f"{labels.name}: rows {start}-{stop - 1} hold NaN or Inf values")
        yield start, x, y


class NpyWriter:
    """A .npy file written block by block when the number of rows is not known in advance.

    A fixed-size header is reserved and rewritten with the final shape on `close`.
    """

    HEADER_BYTES = 128

    def __init__(self, path: Path, dtype: np.dtype, row_shape: tuple[int, ...]) -> None:
        self.path, self.dtype, self.row_shape, self.rows = Path(path), np.dtype(dtype), row_shape, 0
        self._handle = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._handle.write(self._header())

    def _header(self) -> bytes:
        shape = (self.rows, *self.row_shape)
        text = f"{{'descr': {self.dtype.str!r}, 'fortran_order': False, 'shape': {shape}, }}"
        body = text.ljust(self.HEADER_BYTES - 10 - 1) + "\n"
        return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body.encode("latin1")

    def write(self, block: np.ndarray) -> None:
        if tuple(block.shape[1:]) != self.row_shape:
            raise ValueError(f"rows of shape {block.shape[1:]} written to a file of rows {self.row_shape}")
        self._handle.write(np.ascontiguousarray(block, dtype=self.dtype).tobytes())
        self.rows += int(block.shape[0])

    def close(self) -> None:
        self._handle.seek(0)
        self._handle.write(self._header())
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
