"""Safe file handling shared by every writer: nothing overwritten by accident, nothing half-written."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lip_cli.errors import LipError


def check_output(output: Path, inputs: list[Path], force: bool) -> None:
    """Fail before any work if the output would clobber an input, a file, or cannot be written."""
    output = Path(output)
    for source in inputs:
        if source.exists() and output.exists() and output.resolve() == source.resolve():
            raise LipError(f"{output}: output is the same file as an input; choose another --output")
    if output.exists() and not force:
        raise LipError(f"{output}: already exists; pass --force to overwrite it")
    if output.is_dir():
        raise LipError(f"{output}: is a folder; --output must name a file")
    folder = output.parent if str(output.parent) else Path(".")
    if not folder.is_dir():
        raise LipError(f"{output}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise LipError(f"{output}: folder {folder} is not writable")


@contextlib.contextmanager
def atomic_output(output: Path) -> Iterator[Path]:
    """A temporary path beside `output`; renamed onto it, after fsync, only if the block succeeds."""
    output = Path(output)
    handle, temporary = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    os.close(handle)
    temporary_path = Path(temporary)
    os.chmod(temporary_path, 0o666 & ~_umask())
    try:
        yield temporary_path
        with open(temporary_path, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temporary_path, output)
    finally:
        temporary_path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sibling_output(path: Path, tag: str = "lip") -> Path:
    """`<name>.<tag><ext>` beside `path` (model.pt -> model.lip.pt)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.{tag}{path.suffix}")
