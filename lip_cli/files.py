"""Safe file handling shared by every writer: nothing overwritten by accident, nothing half-written."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lip_cli.errors import LipError


def check_output(output: Path, inputs: list[Path], force: bool, folder: bool = False) -> None:
    """Fail before any work if the output would clobber an input, a file, or cannot be written.

    `folder`: the output is a folder (a Hugging Face model folder) rather than a file.
    """
    output = Path(output)
    for source in inputs:
        if source.exists() and output.exists() and output.resolve() == source.resolve():
            raise LipError(f"{output}: output is the same file as an input; choose another --output")
        if folder and source.is_dir() and source.resolve() in output.resolve().parents:
            raise LipError(f"{output}: output lies inside the input folder {source}; choose another --output")
    if output.exists() and not force:
        raise LipError(f"{output}: already exists; pass --force to overwrite it")
    if output.is_dir() and not folder:
        raise LipError(f"{output}: is a folder; --output must name a file")
    if output.is_file() and folder:
        raise LipError(f"{output}: is a file; the output of a model folder is a folder")
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


@contextlib.contextmanager
def atomic_folder(output: Path) -> Iterator[Path]:
    """A temporary folder beside `output`; swapped in, after fsync of its files, only on success."""
    output = Path(output)
    temporary = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    os.chmod(temporary, 0o777 & ~_umask())
    try:
        yield temporary
        for file in temporary.rglob("*"):
            if file.is_file():
                with open(file, "rb") as written:
                    os.fsync(written.fileno())
        if output.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".old", dir=output.parent))
            os.replace(output, old / output.name)
            os.replace(temporary, output)
            shutil.rmtree(old)
        else:
            os.replace(temporary, output)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


ARCHIVE_SUFFIXES = (".tar", ".gz", ".bz2", ".xz", ".zip")  # outer part of `model_best.pth.tar`


def sibling_output(path: Path, tag: str = "lip") -> Path:
    """`<name>.<tag><ext>` beside `path`, keeping the input's naming: model.pt -> model.lip.pt,
    epoch=1-step=64.ckpt -> epoch=1-step=64.lip.ckpt, model_best.pth.tar -> model_best.lip.pth.tar,
    a folder vit -> vit.lip. A double extension counts when its outer part is an archive suffix and
    its inner part a plain word, so `epoch=1.5.ckpt` keeps `.5` in the name."""
    path = Path(path)
    if path.is_dir():
        return path.with_name(f"{path.name}.{tag}")
    stem, suffix = path.stem, path.suffix
    inner = Path(stem).suffix
    if suffix.lower() in ARCHIVE_SUFFIXES and inner[1:].isalpha():
        stem, suffix = Path(stem).stem, inner + suffix
    return path.with_name(f"{stem}.{tag}{suffix}")


def sha256_of(path: Path, shards: list[Path] | None = None) -> str:
    """Hex digest of a file, or of several files or a folder's files (names and contents, sorted)."""
    path = Path(path)
    if shards is None and path.is_dir():
        shards = sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for file in shards or [path]:
        if shards:
            digest.update(str(file).encode() + b"\0")
        with open(file, "rb") as handle:
            while block := handle.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()
