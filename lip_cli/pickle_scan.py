"""What a torch file's pickle refers to and what it would build, read without running it.

`scan` walks the pickle opcode by opcode (pickletools.genops) with a small symbolic stack: it
collects the globals the pickle names and follows every call (REDUCE, NEWOBJ) of `bytes` or
`bytearray`, so that a value whose size is only declared (`bytes(3_000_000_000)`, a 3 KB file) is
refused before torch.load builds it. The pickle of a zip archive (`data.pkl`) is refused when its
declared size is past a bound, and so is any compressed member, which torch would inflate whole:
torch writes its archives uncompressed. What fits the bounds is left to torch.load to check.
"""

from __future__ import annotations

import pickletools
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from lip_cli.errors import LipError

MAX_PICKLE_BYTES = 256 * 2**20  # data.pkl of a zip archive: metadata, the tensors are stored apart
MAX_VALUE_BYTES = 64 * 2**20  # one bytes / bytearray value built by a call in the pickle
MAX_COMPRESSED_BYTES = 64 * 2**20  # a compressed zip member, once inflated
SIZED_CALLS = {"builtins.bytes", "builtins.bytearray"}  # a call with an int allocates that many bytes
LEGACY_PICKLES = 4  # magic number, protocol, system info, then the object

_MARK = object()


@dataclass
class PickleScan:
    """The globals a pickle names (`module.name`), and whether the walk reached its end."""

    globals: set[str] = field(default_factory=set)
    complete: bool = True


def _python3_name(argument: str) -> str:
    """`module.name` of a GLOBAL argument; protocol 2 writes `__builtin__ dict` for builtins.dict."""
    import _compat_pickle

    module, name = argument.split(" ", 1)
    module, name = _compat_pickle.NAME_MAPPING.get(
        (module, name), (_compat_pickle.IMPORT_MAPPING.get(module, module), name)
    )
    return f"{module}.{name}"


class _Global(str):
    """A global on the symbolic stack."""


def _pop_mark(stack: list[object]) -> list[object]:
    items = []
    while stack[-1] is not _MARK:
        items.append(stack.pop())
    stack.pop()
    return items[::-1]


def _walk(stream: BinaryIO, where: str, found: set[str]) -> bool:
    """One pickle, to its STOP: globals into `found`; a sized call past the bound raises LipError.
    True when every opcode was followed; once one is not (a stack the model cannot follow), the
    rest is only read for its GLOBAL names. A malformed pickle raises (any type)."""
    stack: list[object] = []
    memo: dict[int, object] = {}
    followed = True
    for opcode, argument, _ in pickletools.genops(stream):
        if opcode.name == "GLOBAL":
            found.add(_python3_name(str(argument)))
        if opcode.name == "STOP":
            return followed
        if followed:
            try:
                _step(opcode.name, opcode.stack_after, argument, stack, memo, where, found)
            except (IndexError, KeyError, TypeError, ValueError, AttributeError):
                followed = False
    raise ValueError("the pickle ends before its STOP opcode")


def _step(
    name: str,
    pushes: list,
    argument: object,
    stack: list[object],
    memo: dict[int, object],
    where: str,
    found: set[str],
) -> None:
    """One opcode's effect on the symbolic stack: values the walk does not follow are None."""
    if name == "GLOBAL":
        stack.append(_Global(_python3_name(str(argument))))
    elif name == "STACK_GLOBAL":
        attribute, module = stack.pop(), stack.pop()
        full = _Global(_python3_name(f"{module} {attribute}")) if isinstance(module, str) else None
        if full is not None:
            found.add(str(full))
        stack.append(full)
    elif name in ("REDUCE", "NEWOBJ"):
        arguments, callable_ = stack.pop(), stack.pop()
        _check_call(callable_, arguments, where)
        stack.append(None)
    elif name == "NEWOBJ_EX":
        stack.pop()
        arguments, callable_ = stack.pop(), stack.pop()
        _check_call(callable_, arguments, where)
        stack.append(None)
    elif name == "MARK":
        stack.append(_MARK)
    elif name == "TUPLE":
        stack.append(tuple(_pop_mark(stack)))
    elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
        count = int(name[-1])
        items = tuple(stack[-count:])
        del stack[-count:]
        stack.append(items)
    elif name == "EMPTY_TUPLE":
        stack.append(())
    elif name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
        memo[len(memo) if name == "MEMOIZE" else int(argument)] = stack[-1]
    elif name in ("GET", "BINGET", "LONG_BINGET"):
        stack.append(memo[int(argument)])
    elif name in ("POP", "BUILD", "APPEND"):
        stack.pop()
    elif name == "DUP":
        stack.append(stack[-1])
    elif name == "SETITEM":
        del stack[-2:]
    elif name in ("POP_MARK", "APPENDS", "SETITEMS", "ADDITEMS"):
        _pop_mark(stack)
    elif name in ("LIST", "DICT", "FROZENSET", "OBJ", "INST"):
        _pop_mark(stack)
        stack.append(None)
    elif name == "BINPERSID":
        stack[-1] = None
    elif pushes:  # one pushed value: a literal (kept) or a new object
        keep = isinstance(argument, int | str) and name not in ("PROTO", "FRAME")
        stack.append(argument if keep else None)


def _check_call(callable_: object, arguments: object, where: str) -> None:
    if not isinstance(callable_, _Global) or str(callable_) not in SIZED_CALLS:
        return
    sizes = [value for value in arguments if isinstance(value, int)] if isinstance(arguments, tuple) else []
    if sizes and max(sizes) > MAX_VALUE_BYTES:
        raise LipError(
            f"{where}: builds a {callable_.rsplit('.', 1)[1]} of {max(sizes):,} bytes, past lip's bound of "
            f"{MAX_VALUE_BYTES:,} bytes for a value that is not a tensor; re-save the file without it"
        )


def _zip_pickle(path: Path, archive: zipfile.ZipFile) -> Iterator[BinaryIO]:
    """The data.pkl of a torch zip archive, after the declared sizes of its members are checked."""
    pickle_member = None
    for info in archive.infolist():
        if info.filename.endswith("data.pkl") and pickle_member is None:
            pickle_member = info
            if info.file_size > MAX_PICKLE_BYTES:
                raise LipError(
                    f"{path}: its pickle ({info.filename}) inflates to {info.file_size:,} bytes, past lip's "
                    f"bound of {MAX_PICKLE_BYTES:,} bytes; the tensors of a torch file are stored apart"
                )
        elif info.compress_type != zipfile.ZIP_STORED and info.file_size > MAX_COMPRESSED_BYTES:
            raise LipError(
                f"{path}: member {info.filename} is compressed and inflates to {info.file_size:,} bytes, "
                f"past lip's bound of {MAX_COMPRESSED_BYTES:,} bytes (torch.save stores tensors uncompressed)"
            )
    if pickle_member is not None:
        with archive.open(pickle_member) as member:
            yield member


def scan(path: Path) -> PickleScan:
    """The globals of a torch file's pickle, read statically (nothing imported or run): the
    `data.pkl` of a zip archive, or the leading pickles of a legacy file. A value or member past
    the bounds above raises LipError; a pickle the walk cannot follow (corrupt, or built in a way
    it does not model) gives what was found so far, `complete` False, and torch.load then judges it."""
    path = Path(path)
    result = PickleScan()
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                for member in _zip_pickle(path, archive):
                    result.complete &= _walk(member, str(path), result.globals)
        else:
            with open(path, "rb") as handle:
                for _ in range(LEGACY_PICKLES):
                    result.complete &= _walk(handle, str(path), result.globals)
    except LipError:
        raise
    except Exception:  # a corrupt or unusual pickle: every reader has its own error types
        result.complete = False
    sized = sorted(result.globals & SIZED_CALLS)
    if not result.complete and sized:
        raise LipError(
            f"{path}: its pickle names `{sized[0]}` in a form lip cannot bound without running it; "
            "re-save the file without that value"
        )
    return result
