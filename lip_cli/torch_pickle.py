"""Torch files read without building what their pickle asks for, and patched in place.

`read_torch_file` walks the pickle of a torch file symbolically: each opcode is interpreted on an
explicit stack (no recursion) in which the containers on the way to tensors (dict, OrderedDict,
list, tuple, torch.Size) are real, short strings and numbers are kept, the memo shares values by
reference, and everything else (any other call, object, set, long string or bytes value) is an
`Opaque` placeholder whose arguments are dropped, never built. A tensor is a `TensorRef` to its
storage record: the walk never reads the storages, `TorchFile.tensor` maps one when it is used
(copy-on-write, so that the file never changes). Work and memory are linear in the pickle's size,
and bounded in total: the pickle by MAX_PICKLE_BYTES, the values the walk keeps by MAX_VALUES.

A global the pickle names must be one torch.load(weights_only=True) allows, or a data-only type of
DATA_ONLY_GLOBALS, so that what lip reads (and writes back) loads with weights_only=True too; being
named, it is still never imported or called.

`patch_storages` writes a copy of the file in which only the bytes of the tensors given change:
every other byte (the pickle, every other record, the zip layout, torch's 64-byte alignment) stays
as it was, and the CRC-32 of each changed zip record is brought up to date.

Formats: the zip archive of torch.save since 1.6 (`<archive>/data.pkl`, storages in
`<archive>/data/<key>`, `byteorder`), and the legacy format of `_use_new_zipfile_serialization=False`
(pickles of the magic number, protocol version, system info, the object and the storage keys, then
each storage as an 8-byte element count and its bytes, in the order of the keys).
"""

from __future__ import annotations

import functools
import mmap
import os
import shutil
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor

from lip_cli.errors import LipError

MAX_PICKLE_BYTES = 64 * 2**20  # a pickle holds metadata; real checkpoints' are under a few MB
MAX_VALUES = 2_000_000  # values the walk holds (containers' entries, numbers, strings, stack entries)
FIXED_WIDTH = {0x4D: ("<H", 2), 0x4A: ("<i", 4), 0x47: (">d", 8)}  # opcode: its number's layout, bytes
MAX_KEPT_TEXT = 4096  # a longer string or bytes value is a placeholder, never copied
MAX_COMPRESSED_BYTES = 64 * 2**20  # a compressed zip record, once inflated (torch.save never compresses)
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

# Types that training frameworks store beside the weights and that hold only data: timm's `args`
# (argparse.Namespace), paths in hyper-parameters, Lightning's / Hydra's omegaconf configs and the
# type markers these record. The walk never builds them (nor anything else): being on this list only
# means that a file naming them is read, as torch.load(weights_only=True) reads it with these allowed.
DATA_ONLY_GLOBALS = frozenset(
    {
        "argparse.Namespace",
        "pathlib.PosixPath",
        "pathlib.PurePosixPath",
        "omegaconf.dictconfig.DictConfig",
        "omegaconf.listconfig.ListConfig",
        "omegaconf.base.ContainerMetadata",
        "omegaconf.base.Metadata",
        "omegaconf.nodes.AnyNode",
        "omegaconf.nodes.StringNode",
        "omegaconf.nodes.IntegerNode",
        "omegaconf.nodes.FloatNode",
        "omegaconf.nodes.BooleanNode",
        "omegaconf.nodes.BytesNode",
        "typing.Any",
        "typing.Dict",
        "typing.List",
        "builtins.bool",
        "builtins.bytes",
        "builtins.dict",
        "builtins.float",
        "builtins.int",
        "builtins.list",
        "builtins.str",
        "collections.defaultdict",
    }
)

STORAGE_DTYPES = {
    "torch.FloatStorage": torch.float32,
    "torch.DoubleStorage": torch.float64,
    "torch.HalfStorage": torch.float16,
    "torch.BFloat16Storage": torch.bfloat16,
    "torch.LongStorage": torch.int64,
    "torch.IntStorage": torch.int32,
    "torch.ShortStorage": torch.int16,
    "torch.CharStorage": torch.int8,
    "torch.ByteStorage": torch.uint8,
    "torch.BoolStorage": torch.bool,
    "torch.ComplexFloatStorage": torch.complex64,
    "torch.ComplexDoubleStorage": torch.complex128,
    "torch.QInt8Storage": torch.qint8,
    "torch.QUInt8Storage": torch.quint8,
    "torch.QInt32Storage": torch.qint32,
    "torch.QUInt4x2Storage": torch.quint4x2,
    "torch.QUInt2x4Storage": torch.quint2x4,
    "torch.storage.UntypedStorage": torch.uint8,
}
QUANTIZED = {torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4}
REBUILD = "torch._utils._rebuild_"
UNUSABLE = {  # rebuilt tensors with no plain values, and why lip cannot read them
    REBUILD + "qtensor": "quantized",
    REBUILD + "sparse_tensor": "sparse",
    REBUILD + "sparse_csr_tensor": "sparse",
    REBUILD + "meta_tensor_no_storage": "meta",
    REBUILD + "wrapper_subclass": "subclass",
    REBUILD + "nested_tensor": "nested",
    REBUILD + "device_tensor_from_numpy": "numpy",
    REBUILD + "device_tensor_from_cpu_tensor": "device",
}


class CorruptPickle(ValueError):
    """The pickle breaks its own rules (an unknown opcode, a stack it has not filled, cut short)."""


class Opaque:
    """A value the walk does not build: a call, an object, a set, a long string or bytes value."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


class Global(Opaque):
    """A global the pickle names (`module.name`), never imported."""

    __slots__ = ()


@dataclass(frozen=True, eq=False)
class StorageRef:
    """A storage the pickle refers to by key (a persistent id): its bytes lie in the file apart."""

    key: str
    dtype: torch.dtype
    nbytes: int
    base: int = 0  # legacy storage views: the view's first byte within its root storage


@dataclass(frozen=True, eq=False)
class TensorRef:
    """A tensor as the pickle describes it: a strided view of a storage."""

    storage: StorageRef
    dtype: torch.dtype
    offset: int  # in elements
    size: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def element_size(self) -> int:
        return self.dtype.itemsize

    def extent(self) -> int:
        """Elements of the storage the view spans, from its offset (0 for an empty tensor)."""
        if any(size == 0 for size in self.size):
            return 0
        return 1 + sum((size - 1) * stride for size, stride in zip(self.size, self.stride, strict=True))


@dataclass(frozen=True, eq=False)
class UnusableTensor:
    """A tensor with no plain values (quantized, sparse, meta...), with what the pickle says of it."""

    kind: str
    size: tuple[int, ...] | None
    dtype: torch.dtype | None


@dataclass(frozen=True)
class Record:
    """Where a storage's bytes lie in the file."""

    offset: int  # of the first byte of data (for a compressed record: of the compressed data)
    nbytes: int
    compressed: zipfile.ZipInfo | None = None  # zip records that are not stored as they are


@dataclass
class TorchFile:
    """A torch file read symbolically: the pickle's top value (`root`) and where its storages lie."""

    path: Path
    legacy: bool
    root: object
    records: dict[str, Record]
    big_endian: bool = False
    storage_uses: dict[str, list[TensorRef]] = field(default_factory=dict)  # every tensor of each
    _mapped: mmap.mmap | None = None

    def tensor(self, ref: TensorRef) -> Tensor:
        """The tensor, mapped from the file where its record is stored as it is (copy-on-write:
        writing to it never changes the file), else read; checked against its storage."""
        data, start = self._storage(ref)
        element = ref.element_size
        first = start + ref.storage.base + ref.offset * element
        count = ref.extent()
        if count == 0:
            return torch.empty(ref.size, dtype=ref.dtype)
        if isinstance(data, mmap.mmap) and first % element == 0 and not self.big_endian:
            flat = torch.frombuffer(data, dtype=ref.dtype, count=count, offset=first)
        else:
            chunk = bytearray(data[first : first + count * element])
            if self.big_endian:
                _swap(chunk, ref.dtype)
            flat = torch.frombuffer(chunk, dtype=ref.dtype)
        return flat.as_strided(ref.size, ref.stride)

    def _storage(self, ref: TensorRef) -> tuple[object, int]:
        record = self.records[ref.storage.key]
        if record.compressed is None:
            if self._mapped is None:
                with open(self.path, "rb") as handle:
                    self._mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
            return self._mapped, record.offset
        with open(self.path, "rb") as handle, zipfile.ZipFile(handle) as archive:
            return _inflate(archive, record.compressed, self.path, MAX_COMPRESSED_BYTES), 0

    def close(self) -> None:
        self._mapped = None


def _swap(chunk: bytearray, dtype: torch.dtype) -> None:
    import numpy as np

    unit = dtype.itemsize // (2 if dtype.is_complex else 1)
    if unit > 1:
        np.frombuffer(chunk, dtype=f"u{unit}").byteswap(inplace=True)


@functools.cache
def allowed_globals() -> frozenset[str]:
    """What torch.load(weights_only=True) allows by default (and what the user added with
    torch.serialization.add_safe_globals), and lip's data-only types."""
    names = set(DATA_ONLY_GLOBALS) | set(STORAGE_DTYPES)
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        names |= set(_get_allowed_globals())
    except (ImportError, AttributeError):  # another torch: the tensors and containers lip reads
        names |= {f"{REBUILD}tensor_v2", f"{REBUILD}tensor_v3", f"{REBUILD}parameter"}
        names |= {"collections.OrderedDict", "torch.Size", *UNUSABLE}
    return frozenset(names)


def _user_globals() -> set[str]:
    found = set()
    for entry in torch.serialization.get_safe_globals():
        item = entry[0] if isinstance(entry, tuple) else entry
        found.add(f"{getattr(item, '__module__', '')}.{getattr(item, '__qualname__', '')}")
    return found


def _python3_name(module: str, name: str) -> str:
    """`module.name` of a global; protocol 2 writes `__builtin__ dict` for builtins.dict."""
    import _compat_pickle

    module, name = _compat_pickle.NAME_MAPPING.get(
        (module, name), (_compat_pickle.IMPORT_MAPPING.get(module, module), name)
    )
    return f"{module}.{name}"


def refused_global(path: object, name: str) -> LipError:
    return LipError(
        f"{path}: holds `{name}`; lip never runs pickled code (weights_only=True) and allows only "
        "tensors, plain containers and a few data-only types. Re-save it from your own code as a "
        "state dict (torch.save({'state_dict': model.state_dict()}, path)) or as .safetensors"
    )


def _dtype_of(value: object) -> torch.dtype | None:
    if isinstance(value, Global) and value.name.startswith("torch."):
        found = getattr(torch, value.name[len("torch.") :], None) if value.name.count(".") == 1 else None
        return found if isinstance(found, torch.dtype) else None
    return None


def _ints(value: object) -> tuple[int, ...] | None:
    if isinstance(value, tuple) and all(type(item) is int for item in value):
        return value
    return None


class _Walk:
    """One pickle, interpreted on symbolic values (see the module docstring)."""

    def __init__(self, data: bytes | memoryview, where: object, persistent: bool, legacy: bool) -> None:
        self.data, self.where, self.persistent, self.legacy = data, where, persistent, legacy
        self.allowed = allowed_globals() | _user_globals()
        self.kept = 0
        self.storages: dict[str, StorageRef] = {}
        self.tensors: list[TensorRef] = []

    def keep(self, count: int = 1) -> None:
        self.kept += count
        if self.kept > MAX_VALUES:
            raise LipError(
                f"{self.where}: its pickle holds more than {MAX_VALUES:,} values besides its tensors, past "
                "lip's bound; re-save the file with the state dict alone"
            )

    def text(self, start: int, length: int, kind: str) -> object:
        if length > MAX_KEPT_TEXT:
            return Opaque(kind)
        raw = bytes(self.data[start : start + length])
        self.keep()
        if kind == "str":
            try:
                return raw.decode("utf-8", "surrogatepass")
            except UnicodeDecodeError as error:
                raise CorruptPickle(f"a string that is not UTF-8 ({error.reason})") from None
        if kind == "bytes":
            return Opaque("bytes")
        return raw.decode("latin-1")  # a Python 2 str (STRING opcodes): as torch decodes it

    def run(self, pos: int) -> tuple[object, int]:  # noqa: C901, PLR0912, PLR0915 - one opcode per branch
        """The value of the pickle that starts at `pos`, and the position after its STOP."""
        data, end = self.data, min(len(self.data), pos + MAX_PICKLE_BYTES)
        stack: list[object] = []
        marks: list[list[object]] = []
        memo: dict[int, object] = {}
        unpack = struct.unpack_from
        keep = self.keep

        def need(count: int) -> None:
            if pos + count > end:
                raise CorruptPickle("it ends in the middle of an opcode")

        def line() -> bytes:
            stop = data.find(b"\n", pos, min(end, pos + MAX_KEPT_TEXT + 1))
            if stop < 0:
                raise CorruptPickle("a text opcode that never ends, or is longer than lip reads")
            return bytes(data[pos:stop])

        def pop_mark() -> list[object]:
            nonlocal stack
            if not marks:
                raise CorruptPickle("it closes a mark it never opened")
            items, stack = stack, marks.pop()
            return items

        while True:
            if pos >= end:
                if end < len(data):
                    raise LipError(
                        f"{self.where}: its pickle runs past lip's bound of {MAX_PICKLE_BYTES:,} bytes; "
                        "the tensors of a torch file are stored apart"
                    )
                raise CorruptPickle("it ends before its STOP opcode")
            op = data[pos]
            pos += 1
            if op == 0x68:  # BINGET
                need(1)
                stack.append(memo[data[pos]]) if data[pos] in memo else _missing(data[pos])
                pos += 1
                if len(stack) > MAX_VALUES:  # references held before any container counts them
                    keep(len(stack))
            elif op == 0x71:  # BINPUT
                need(1)
                if not stack:
                    raise CorruptPickle("it memoizes from an empty stack")
                memo[data[pos]] = stack[-1]
                pos += 1
            elif op == 0x72:  # LONG_BINPUT
                need(4)
                if not stack:
                    raise CorruptPickle("it memoizes from an empty stack")
                memo[unpack("<I", data, pos)[0]] = stack[-1]
                pos += 4
                keep()
            elif op == 0x6A:  # LONG_BINGET
                need(4)
                index = unpack("<I", data, pos)[0]
                stack.append(memo[index]) if index in memo else _missing(index)
                pos += 4
                keep()
            elif op == 0x94:  # MEMOIZE
                if not stack:
                    raise CorruptPickle("it memoizes from an empty stack")
                memo[len(memo)] = stack[-1]
                keep()
            elif op == 0x28:  # MARK
                marks.append(stack)
                stack = []
                keep()
            elif op == 0x4B:  # BININT1
                need(1)
                stack.append(data[pos])
                pos += 1
                if len(stack) > MAX_VALUES:
                    keep(len(stack))
            elif op in FIXED_WIDTH:  # BININT2, BININT, BINFLOAT
                layout, width = FIXED_WIDTH[op]
                need(width)
                stack.append(unpack(layout, data, pos)[0])
                pos += width
                keep()
            elif op == 0x58:  # BINUNICODE
                need(4)
                length = unpack("<I", data, pos)[0]
                need(4 + length)
                stack.append(self.text(pos + 4, length, "str"))
                pos += 4 + length
            elif op == 0x8C:  # SHORT_BINUNICODE
                need(1)
                length = data[pos]
                need(1 + length)
                stack.append(self.text(pos + 1, length, "str"))
                pos += 1 + length
            elif op == 0x8D:  # BINUNICODE8
                need(8)
                length = unpack("<Q", data, pos)[0]
                need(8 + length)
                stack.append(self.text(pos + 8, length, "str"))
                pos += 8 + length
            elif op in (0x42, 0x43, 0x8E, 0x96):  # BINBYTES, SHORT_BINBYTES, BINBYTES8, BYTEARRAY8
                width = {0x42: 4, 0x43: 1, 0x8E: 8, 0x96: 8}[op]
                need(width)
                length = int.from_bytes(data[pos : pos + width], "little")
                need(width + length)
                stack.append(Opaque("bytes"))
                keep()
                pos += width + length
            elif op in (0x54, 0x55):  # BINSTRING, SHORT_BINSTRING (Python 2 str)
                width = 4 if op == 0x54 else 1
                need(width)
                length = int.from_bytes(data[pos : pos + width], "little", signed=op == 0x54)
                if length < 0:
                    raise CorruptPickle("a string of negative length")
                need(width + length)
                stack.append(self.text(pos + width, length, "str2"))
                pos += width + length
            elif op == 0x29:  # EMPTY_TUPLE
                stack.append(())
                keep()
            elif op in (0x85, 0x86, 0x87):  # TUPLE1, TUPLE2, TUPLE3
                count = op - 0x84
                if len(stack) < count:
                    raise CorruptPickle("it builds a tuple from an empty stack")
                items = tuple(stack[-count:])
                del stack[-count:]
                stack.append(items)
                keep(count)
            elif op == 0x74:  # TUPLE
                items = tuple(pop_mark())
                stack.append(items)
                keep(len(items) + 1)
            elif op == 0x7D:  # EMPTY_DICT
                stack.append({})
                keep()
            elif op == 0x5D:  # EMPTY_LIST
                stack.append([])
                keep()
            elif op == 0x64:  # DICT
                items = pop_mark()
                stack.append(self.fill({}, items))
            elif op == 0x6C:  # LIST
                items = pop_mark()
                keep(len(items) + 1)
                stack.append(items)
            elif op == 0x75:  # SETITEMS
                items = pop_mark()
                if not stack:
                    raise CorruptPickle("it sets items with nothing to set them in")
                self.fill(stack[-1], items)
            elif op == 0x73:  # SETITEM
                if len(stack) < 3:
                    raise CorruptPickle("it sets an item with nothing to set it in")
                items = stack[-2:]
                del stack[-2:]
                self.fill(stack[-1], items)
            elif op == 0x65:  # APPENDS
                items = pop_mark()
                if not stack:
                    raise CorruptPickle("it appends with nothing to append to")
                if isinstance(stack[-1], list):
                    keep(len(items))
                    stack[-1].extend(items)
            elif op == 0x61:  # APPEND
                if len(stack) < 2:
                    raise CorruptPickle("it appends with nothing to append to")
                item = stack.pop()
                if isinstance(stack[-1], list):
                    keep()
                    stack[-1].append(item)
            elif op == 0x52:  # REDUCE
                if len(stack) < 2:
                    raise CorruptPickle("it calls from an empty stack")
                arguments = stack.pop()
                stack[-1] = self.call(stack[-1], arguments)
            elif op == 0x62:  # BUILD: the state of an object, which the walk drops
                if len(stack) < 2:
                    raise CorruptPickle("it builds from an empty stack")
                stack.pop()
            elif op == 0x51:  # BINPERSID
                if not stack:
                    raise CorruptPickle("it names a storage from an empty stack")
                stack[-1] = self.storage(stack[-1])
            elif op == 0x63:  # GLOBAL
                module = line()
                pos += len(module) + 1
                name = line()
                pos += len(name) + 1
                stack.append(self.named(module.decode("utf-8", "replace"), name.decode("utf-8", "replace")))
            elif op == 0x93:  # STACK_GLOBAL
                if len(stack) < 2:
                    raise CorruptPickle("it names a global from an empty stack")
                name, module = stack.pop(), stack.pop()
                if not isinstance(module, str) or not isinstance(name, str):
                    raise CorruptPickle("it names a global that is not two strings")
                stack.append(self.named(module, name))
            elif op in (0x81, 0x92):  # NEWOBJ, NEWOBJ_EX: an object, never built
                count = 2 if op == 0x81 else 3
                if len(stack) < count:
                    raise CorruptPickle("it makes an object from an empty stack")
                del stack[-(count - 1) :]
                stack[-1] = Opaque(getattr(stack[-1], "name", "object"))
                keep()
            elif op in (0x4E, 0x88, 0x89):  # NONE, NEWTRUE, NEWFALSE
                stack.append(None if op == 0x4E else op == 0x88)
                keep()
            elif op in (0x8A, 0x8B):  # LONG1, LONG4
                width = 1 if op == 0x8A else 4
                need(width)
                length = int.from_bytes(data[pos : pos + width], "little", signed=op == 0x8B)
                if length < 0:
                    raise CorruptPickle("a number of negative length")
                need(width + length)
                raw = data[pos + width : pos + width + length]
                stack.append(int.from_bytes(raw, "little", signed=True) if length <= 64 else Opaque("int"))
                pos += width + length
                keep()
            elif op == 0x80:  # PROTO
                need(1)
                if data[pos] > 5:
                    raise CorruptPickle(f"it declares pickle protocol {data[pos]}")
                pos += 1
            elif op == 0x95:  # FRAME: a size hint only
                need(8)
                pos += 8
            elif op == 0x30:  # POP
                if stack:
                    stack.pop()
                else:
                    pop_mark()
            elif op == 0x31:  # POP_MARK
                pop_mark()
            elif op == 0x32:  # DUP
                if not stack:
                    raise CorruptPickle("it duplicates from an empty stack")
                stack.append(stack[-1])
                keep()
            elif op == 0x2E:  # STOP
                if len(stack) != 1 or marks:
                    raise CorruptPickle("it stops with a stack it has not emptied")
                return stack[0], pos
            elif op in (0x8F, 0x91):  # EMPTY_SET, FROZENSET: their items are not needed
                if op == 0x91:
                    pop_mark()
                stack.append(Opaque("set"))
                keep()
            elif op == 0x90:  # ADDITEMS
                pop_mark()
                if not stack:
                    raise CorruptPickle("it adds items with nothing to add them to")
            elif op in (0x49, 0x4C, 0x46, 0x53, 0x56, 0x70, 0x67, 0x50):  # text opcodes of protocol 0
                argument = line()
                pos += len(argument) + 1
                if len(argument) > MAX_KEPT_TEXT:
                    raise CorruptPickle("a text opcode longer than lip reads")
                stack_value = self.text_opcode(op, argument, stack, memo)
                if stack_value is not _NOTHING:
                    stack.append(stack_value)
            elif op in (0x69, 0x6F):  # INST, OBJ: an object, never built
                if op == 0x69:
                    module = line()
                    pos += len(module) + 1
                    name = line()
                    pos += len(name) + 1
                    self.named(module.decode("utf-8", "replace"), name.decode("utf-8", "replace"))
                    pop_mark()
                else:
                    items = pop_mark()
                    if not items:
                        raise CorruptPickle("it makes an object of nothing")
                stack.append(Opaque("object"))
                keep()
            else:  # EXT1/2/4, out-of-band buffers (protocol 5), or no opcode at all
                raise CorruptPickle(
                    f"opcode 0x{op:02x} at byte {pos - 1}, which torch's loader does not read"
                )

    def text_opcode(self, op: int, argument: bytes, stack: list[object], memo: dict[int, object]) -> object:
        try:
            if op == 0x49:  # INT
                return (
                    {b"00": False, b"01": True}.get(argument) if argument in (b"00", b"01") else int(argument)
                )
            if op == 0x4C:  # LONG
                return int(argument.rstrip(b"L"))
            if op == 0x46:  # FLOAT
                return float(argument)
            if op == 0x53:  # STRING
                return Opaque("str")
            if op == 0x56:  # UNICODE
                return argument.decode("raw-unicode-escape")
            if op == 0x70:  # PUT
                if not stack:
                    raise CorruptPickle("it memoizes from an empty stack")
                memo[int(argument)] = stack[-1]
                self.keep()
                return _NOTHING
            if op == 0x67:  # GET
                index = int(argument)
                return memo[index] if index in memo else _missing(index)
            raise CorruptPickle("it names a storage in text (protocol 0), which torch does not write")
        except ValueError as error:
            if isinstance(error, CorruptPickle):
                raise
            raise CorruptPickle(f"a text opcode that is not a number ({argument[:40]!r})") from None

    def fill(self, target: object, items: list[object]) -> object:
        if len(items) % 2:
            raise CorruptPickle("it sets a key without a value")
        if isinstance(target, dict):
            self.keep(len(items))
            for index in range(0, len(items), 2):
                key = items[index]
                try:
                    target[key] = items[index + 1]
                except TypeError:  # an unhashable key: the dict cannot hold it, as in torch.load
                    raise CorruptPickle("a dict key that cannot be one (a list or a dict)") from None
        return target

    def named(self, module: str, name: str) -> Global:
        full = _python3_name(module, name)
        if full not in self.allowed:
            raise refused_global(self.where, full)
        return Global(full)

    def storage(self, pid: object) -> object:
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise CorruptPickle("a persistent id that is not a torch storage")
        storage_type, key, numel = pid[1], pid[2], pid[4]
        dtype = STORAGE_DTYPES.get(storage_type.name) if isinstance(storage_type, Global) else None
        if storage_type is not None and getattr(storage_type, "name", "") == "torch.storage.TypedStorage":
            dtype = None
        if dtype is None or not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise CorruptPickle("a storage reference torch does not write")
        element = dtype.itemsize
        root = self.storages.get(key)
        if root is None:
            root = self.storages[key] = StorageRef(key, dtype, numel * element)
        view = pid[5] if len(pid) == 6 else None
        if view is None:
            return root
        if not (isinstance(view, tuple) and len(view) == 3 and type(view[1]) is int and type(view[2]) is int):
            raise CorruptPickle("a storage view torch does not write")
        return StorageRef(key, dtype, view[2] * element, base=view[1] * element)

    def call(self, callable_: object, arguments: object) -> object:
        self.keep()
        name = callable_.name if isinstance(callable_, Global) else None
        if not isinstance(arguments, tuple) or name is None:
            return Opaque(name or "call")
        if name == "collections.OrderedDict" and not arguments:
            return OrderedDict()
        if name == "torch.Size" and len(arguments) == 1 and isinstance(arguments[0], tuple | list):
            return tuple(arguments[0])
        if name in (REBUILD + "tensor_v2", REBUILD + "tensor_v3", REBUILD + "tensor"):
            return self.tensor(name, arguments)
        if name in (REBUILD + "parameter", REBUILD + "parameter_with_state") and arguments:
            return arguments[0] if isinstance(arguments[0], TensorRef | UnusableTensor) else Opaque(name)
        if name == "torch._tensor._rebuild_from_type_v2" and len(arguments) >= 3:
            inner = arguments[2]
            return self.call(arguments[0], inner) if isinstance(arguments[0], Global) else Opaque(name)
        if name in UNUSABLE:
            return self.unusable(name, arguments)
        return Opaque(name)

    def tensor(self, name: str, arguments: tuple) -> object:
        if len(arguments) < 4:
            raise CorruptPickle(f"{name.rsplit('.', 1)[1]} with too few arguments")
        storage, offset, size, stride = arguments[:4]
        size, stride = _ints(size), _ints(stride)
        if not isinstance(storage, StorageRef) or type(offset) is not int or size is None or stride is None:
            raise CorruptPickle("a tensor that is not a storage, an offset, a size and a stride")
        dtype = storage.dtype
        if name.endswith("v3"):
            dtype = _dtype_of(arguments[6]) if len(arguments) > 6 else None
            if dtype is None:
                raise CorruptPickle("a tensor of a dtype torch does not have")
        if dtype in QUANTIZED:
            return UnusableTensor("quantized", size, dtype)
        if (
            len(size) != len(stride)
            or offset < 0
            or any(value < 0 for value in size + stride)
            or (element := dtype.itemsize) == 0
        ):
            raise CorruptPickle("a tensor whose size, stride or offset no tensor has")
        ref = TensorRef(storage, dtype, offset, size, stride)
        if (offset + ref.extent()) * element > storage.nbytes:
            raise LipError(
                f"{self.where}: a tensor of shape {size} reaches past the end of its storage "
                f"({storage.nbytes:,} bytes); the file is corrupt"
            )
        self.tensors.append(ref)
        return ref

    def unusable(self, name: str, arguments: tuple) -> UnusableTensor:
        kind = UNUSABLE[name]
        size = dtype = None
        if kind == "quantized" and len(arguments) > 2:
            size = _ints(arguments[2])
            dtype = arguments[0].dtype if isinstance(arguments[0], StorageRef) else None
        elif kind == "meta" and len(arguments) > 1:
            dtype, size = _dtype_of(arguments[0]), _ints(arguments[1])
        elif (
            kind == "sparse"
            and len(arguments) > 1
            and isinstance(arguments[1], tuple)
            and len(arguments[1]) > 2
        ):
            size = _ints(arguments[1][2])
            values = arguments[1][1]
            dtype = values.dtype if isinstance(values, TensorRef) else None
        return UnusableTensor(kind, size, dtype)


_NOTHING = object()


def _missing(index: int) -> None:
    raise CorruptPickle(f"it refers to memo entry {index}, which it never stored")


def _inflate(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: object, bound: int) -> bytes:
    """A compressed record, inflated up to `bound` bytes whatever its header declares."""
    with archive.open(info) as member:
        data = member.read(bound + 1)
    if len(data) > bound:
        raise LipError(
            f"{path}: record {info.filename} is compressed and inflates past lip's bound of {bound:,} bytes "
            "(torch.save stores its records as they are)"
        )
    return data


def _data_offset(handle: BinaryIO, info: zipfile.ZipInfo) -> int:
    """Where a zip record's data starts: after its local header, whose extra field may differ from
    the central directory's (torch pads it to align the data to 64 bytes)."""
    handle.seek(info.header_offset)
    header = handle.read(30)
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise CorruptPickle(f"record {info.filename} has no local header where the directory says")
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_length + extra_length


def read_torch_file(path: Path) -> TorchFile:
    """A torch file read symbolically (module docstring). A corrupt file raises CorruptPickle or
    zipfile.BadZipFile; a file past lip's bounds or naming a global off the list, LipError."""
    path = Path(path)
    with open(path, "rb") as handle:
        if zipfile.is_zipfile(handle):
            handle.seek(0)
            return _read_zip(path, handle)
        handle.seek(0)
        return _read_legacy(path, handle)


def _read_zip(path: Path, handle: BinaryIO) -> TorchFile:
    with zipfile.ZipFile(handle) as archive:
        infos = archive.infolist()
        pickled = next((info for info in infos if info.filename.endswith("data.pkl")), None)
        if pickled is None:
            raise CorruptPickle("a zip archive without a data.pkl")
        prefix = pickled.filename[: -len("data.pkl")]
        if pickled.file_size > MAX_PICKLE_BYTES:
            raise LipError(
                f"{path}: its pickle ({pickled.filename}) inflates to {pickled.file_size:,} bytes, "
                f"past lip's bound of {MAX_PICKLE_BYTES:,} bytes; the tensors of a torch file are stored "
                "apart"
            )
        if pickled.compress_type == zipfile.ZIP_STORED:
            start = _data_offset(handle, pickled)
            handle.seek(start)
            data = handle.read(pickled.file_size)
            if len(data) < pickled.file_size:
                raise CorruptPickle("its pickle is cut short")
        else:
            data = _inflate(archive, pickled, path, MAX_PICKLE_BYTES)
        byteorder = prefix + "byteorder"
        big = False
        if any(info.filename == byteorder for info in infos):
            with archive.open(byteorder) as record:  # a few bytes, however much it would inflate to
                big = record.read(16).startswith(b"big")
        walk = _Walk(data, path, persistent=True, legacy=False)
        root, _ = walk.run(0)
        records: dict[str, Record] = {}
        by_name = {}
        for info in infos:
            by_name.setdefault(info.filename, info)  # torch reads the first of two records of a name
        for key, storage in walk.storages.items():
            info = by_name.get(f"{prefix}data/{key}")
            if info is None:
                raise LipError(
                    f"{path}: its pickle names storage {key}, which the archive does not hold; it is corrupt"
                )
            if info.file_size < storage.nbytes:
                raise LipError(
                    f"{path}: storage {key} holds {info.file_size:,} bytes but its pickle says "
                    f"{storage.nbytes:,}; the file is truncated or lies about its size"
                )
            if info.compress_type == zipfile.ZIP_STORED:
                records[key] = Record(_data_offset(handle, info), info.file_size)
            else:
                records[key] = Record(0, info.file_size, compressed=info)
    size = os.fstat(handle.fileno()).st_size
    for key, record in records.items():
        if record.compressed is None and record.offset + record.nbytes > size:
            raise LipError(f"{path}: storage {key} runs past the end of the file; it is truncated")
    return _finish(path, False, root, records, big, walk)


def _finish(
    path: Path, legacy: bool, root: object, records: dict[str, Record], big: bool, walk: _Walk
) -> TorchFile:
    uses: dict[str, list[TensorRef]] = {}
    for ref in walk.tensors:
        uses.setdefault(ref.storage.key, []).append(ref)
    return TorchFile(path, legacy, root, records, big, uses)


def _read_legacy(path: Path, handle: BinaryIO) -> TorchFile:
    """The five pickles of a legacy torch file, then its storages, found by offset, never read."""
    size = os.fstat(handle.fileno()).st_size
    head = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)  # pages read as the walk reaches them
    walk = _Walk(head, path, persistent=True, legacy=True)
    magic, pos = walk.run(0)
    if magic != LEGACY_MAGIC:
        raise CorruptPickle("a pickle that is not a torch file (no torch magic number)")
    protocol, pos = walk.run(pos)
    if protocol != LEGACY_PROTOCOL:
        raise CorruptPickle(f"a torch file of protocol version {protocol}, which torch does not read")
    system, pos = walk.run(pos)
    big = isinstance(system, dict) and system.get("little_endian") is False
    walk.storages.clear()
    root, pos = walk.run(pos)
    keys, pos = walk.run(pos)
    if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
        raise CorruptPickle("its list of storages is not a list of keys")
    records: dict[str, Record] = {}
    order = "big" if big else "little"
    for key in keys:
        storage = walk.storages.get(key)
        if storage is None or key in records:
            raise CorruptPickle(f"it lists storage {key}, which its pickle does not name (or names twice)")
        handle.seek(pos)
        count_bytes = handle.read(8)
        element = storage.dtype.itemsize
        count = int.from_bytes(count_bytes, order) if len(count_bytes) == 8 else -1
        if count * element != storage.nbytes or pos + 8 + storage.nbytes > size:
            held = max(size - pos - 8, 0)
            raise LipError(
                f"{path}: storage {key} is declared as {storage.nbytes:,} bytes but the file holds "
                f"{min(held, max(count, 0) * element):,} there; the file is truncated or lies about its size"
            )
        records[key] = Record(pos + 8, storage.nbytes)
        pos += 8 + storage.nbytes
    missing = set(walk.storages) - set(records)
    if missing:
        raise CorruptPickle(f"its pickle names storage {sorted(missing)[0]}, which the file does not hold")
    return _finish(path, True, root, records, big, walk)


def patch_storages(source: TorchFile, updates: list[tuple[TensorRef, Tensor]], destination: Path) -> None:
    """`destination`: a copy of the file with each tensor's values replaced (same dtype and shape),
    every other byte as it was; the CRC-32 of each changed zip record is updated."""
    shutil.copyfile(source.path, destination)
    changed: set[str] = set()
    with open(destination, "r+b") as handle:
        for ref, values in updates:
            record = source.records[ref.storage.key]
            if record.compressed is not None:
                raise LipError(
                    f"{source.path}: the storage of a tensor lip changes is compressed in the archive; "
                    "lip writes storages in place, as torch.save stores them (uncompressed): re-save the file"
                )
            if tuple(values.shape) != ref.size or values.dtype != ref.dtype:
                raise ValueError("an update changes a tensor's shape or dtype")
            element = ref.element_size
            first = record.offset + ref.storage.base + ref.offset * element
            count = ref.extent()
            if count == 0:
                continue
            handle.seek(first)
            region = bytearray(handle.read(count * element))
            if source.big_endian:
                _swap(region, ref.dtype)
            view = torch.frombuffer(region, dtype=ref.dtype).as_strided(ref.size, ref.stride)
            view.copy_(values)
            del view
            if source.big_endian:
                _swap(region, ref.dtype)
            handle.seek(first)
            handle.write(region)
            changed.add(ref.storage.key)
        if not source.legacy and changed:
            _update_crcs(handle, source, changed)


def _update_crcs(handle: BinaryIO, source: TorchFile, keys: set[str]) -> None:
    import zlib

    handle.seek(0)
    with zipfile.ZipFile(handle) as archive:
        infos = archive.infolist()
        directory = archive.start_dir  # type: ignore[attr-defined]
    prefix = next(info.filename for info in infos if info.filename.endswith("data.pkl"))[: -len("data.pkl")]
    wanted = {f"{prefix}data/{key}": key for key in keys}
    position = directory
    seen: set[str] = set()
    for info in infos:
        handle.seek(position)
        entry = handle.read(46)
        name_length, extra_length, comment_length = struct.unpack("<HHH", entry[28:34])
        key = wanted.get(info.filename)
        if key is not None and info.filename not in seen:
            seen.add(info.filename)
            record = source.records[key]
            crc = 0
            handle.seek(record.offset)
            left = info.file_size
            while left:
                block = handle.read(min(left, 1 << 22))
                crc, left = zlib.crc32(block, crc), left - len(block)
            packed = struct.pack("<I", crc)
            handle.seek(position + 16)
            handle.write(packed)
            if info.flag_bits & 0x08:  # a data descriptor after the data holds the CRC
                handle.seek(record.offset + info.compress_size)
                signature = handle.read(4)
                handle.seek(record.offset + info.compress_size + (4 if signature == b"PK\x07\x08" else 0))
            else:
                handle.seek(info.header_offset + 14)
            handle.write(packed)
        position += 46 + name_length + extra_length + comment_length


def _problem(unusable: UnusableTensor) -> str:
    if unusable.kind == "quantized":
        return f"is a quantized tensor ({unusable.dtype}); save tensor.dequantize() instead"
    if unusable.kind == "sparse":
        return "is a sparse tensor; convert it with .to_dense() and save it again"
    if unusable.kind == "meta":
        return "is a meta tensor (a shape with no values); save the real tensor"
    return f"is a {unusable.kind} tensor, with no plain values lip reads; save a dense copy of it"


def placeholder(unusable: UnusableTensor) -> Tensor:
    """A meta tensor of the shape the pickle gives (no values), carrying why lip cannot read it in
    `lip_problem` (arrays.tensor_problem reports it)."""
    dtype = (
        unusable.dtype if unusable.dtype is not None and unusable.dtype not in QUANTIZED else torch.float32
    )
    tensor = torch.empty(unusable.size or (0,), dtype=dtype, device="meta")
    tensor.lip_problem = _problem(unusable)  # type: ignore[attr-defined]
    return tensor


def tensors_of(torch_file: TorchFile, mapping: dict) -> tuple[dict, dict]:
    """The tensors of a dict the walk found (mapped from the file; unusable ones as `placeholder`s)
    by key, and where each lies in the file; other values are left out."""
    state, refs = {}, {}
    for key, value in mapping.items():
        if isinstance(value, TensorRef):
            state[key], refs[key] = torch_file.tensor(value), value
        elif isinstance(value, UnusableTensor):
            state[key] = placeholder(value)
    return state, refs


def _span(ref: TensorRef) -> tuple[int, int]:
    first = ref.storage.base + ref.offset * ref.element_size
    return first, first + ref.extent() * ref.element_size


def sharing(torch_file: TorchFile, ref: TensorRef, changed: list[TensorRef]) -> str | None:
    """Another tensor of the file whose values lie in bytes that `ref` spans (tied weights), unless
    it is changed too; described by its shape, or None."""
    first, last = _span(ref)
    for other in torch_file.storage_uses.get(ref.storage.key, []):
        if any(other is done for done in changed):
            continue
        low, high = _span(other)
        if low < last and first < high:
            return f"a tensor of shape {tuple(other.size)} in storage {ref.storage.key}"
    return None
