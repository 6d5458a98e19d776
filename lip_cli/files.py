"""The one path policy shared by every command, safe reads of folders, and copies.

The policy (`check_paths`): every input and output is resolved, links followed, before any work.
Only regular files (and folders) are read; an output may not be an input, lie inside an input
folder, hold an input, or be another output of the same run; an existing output is replaced only
with --force, and a folder only when it is empty or was written by lip (it holds `lip.json`);
a FIFO, socket or device never. Files named inside a folder (index entries, shards) must stay
inside it. The check holds at the moment of writing too (`writes.publish`): what it found at each
output is recorded in `checked`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from lip_cli.errors import LipError

LIP_RECORD = "lip.json"  # what lip writes into every folder it makes
# what the path policy found at each output (its `fingerprint`, None for nothing), and whether
# --force lets it be replaced: `publish` replaces that entry only, never one that came later
checked: dict[Path, tuple[tuple[int, ...] | None, bool]] = {}
checked_at: dict[Path, Path] = {}  # each output path as given, and where it led at check time


@dataclass(frozen=True)
class Output:
    """A path a command will write: a file, or a folder (a Hugging Face model folder).

    `suffixes`: the endings that match the format written (empty: any). `parents`: its missing
    folders are made (`new_folders`) rather than refused. `deferred`: written only if the run
    decides to (--k auto), so an existing one without --force is refused when it comes to be
    written, not before the work.
    """

    path: Path
    folder: bool = False
    suffixes: tuple[str, ...] = ()
    parents: bool = False
    deferred: bool = False


def _kind(mode: int) -> str | None:
    """What a special file is, or None for a regular file or a folder."""
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return None


def check_readable(path: Path) -> None:
    """Refuse a special file (FIFO, device, socket; also behind a link) before anything reads it.

    A missing path is left to the reader, which names it; a link loop and a file this user may not
    read are refused here, in one line.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise LipError(f"{path}: is a symlink loop (its links never reach a file)") from error
        return
    kind = _kind(mode)
    if kind is not None:
        shown = f" (a link to {os.path.realpath(path)})" if os.path.islink(path) else ""
        raise LipError(f"{path}: is {kind}{shown}; lip reads regular files only")
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
    except PermissionError as error:
        raise LipError(f"{path}: permission denied; lip cannot read it") from error
    except OSError:  # left to the reader, which names it
        pass


def resolved(path: Path) -> Path:
    """`path` with every link followed; a link loop is refused in one line (pathlib raises
    RuntimeError for it)."""
    try:
        return Path(path).resolve()
    except RuntimeError as error:
        raise LipError(f"{path}: is a symlink loop (its links never reach a file)") from error


def write_location(path: Path) -> Path:
    """Where a write to `path` lands: its folder resolved as the system resolves it (`lnk/..` is the
    folder above the link's target, as for every other call), the last name kept (a link there is
    replaced, never written through)."""
    path = Path(path)
    if path.name in ("", ".", ".."):
        return resolved(path)
    return resolved(path.parent) / path.name


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_paths(inputs: Iterable[Path | None], outputs: Iterable[Output | None], force: bool) -> None:
    """The path policy of every command, applied before any work (see the module docstring)."""
    sources = [Path(path) for path in inputs if path is not None]
    targets = [output for output in outputs if output is not None]
    for source in sources:
        check_readable(source)
    real_sources = [(source, resolved(source)) for source in sources if os.path.exists(source)]
    folders_up: dict[Path, set[tuple[int, int]]] = {}  # per folder: a model folder's files share them
    absent = [(source, write_location(source)) for source in sources if not os.path.lexists(source)]
    seen: list[tuple[Output, Path, Path]] = []
    for output in targets:
        path = Path(output.path)
        location, target = write_location(path), resolved(path)
        above = _identities_up(location)
        places = {_identity(os.stat(place)) for place in (location, target) if os.path.exists(place)}
        if output.suffixes and path.suffix.lower() not in output.suffixes:
            raise LipError(
                f"{path}: the output is written as "
                f"{' or '.join(dict.fromkeys(filter(None, output.suffixes)))}; "
                "give it that ending"
            )
        for source, real in real_sources:
            if target == real or location == real or _same_file(path, source):
                raise LipError(f"{path}: output is the same file as an input ({source}); choose another")
            inside = real.is_dir() and _identity(os.stat(real)) in above  # also through a bind mount
            for place in (location, target):
                if real.is_dir() and place != real and (inside or _within(place, real)):
                    raise LipError(f"{path}: output lies inside the input folder {source}; choose another")
                if places and real.parent not in folders_up:
                    folders_up[real.parent] = _identities_up(real.parent)
                if _within(real, place) or places & folders_up.get(real.parent, set()):
                    raise LipError(f"{path}: output would hold the input {source}; choose another")
        for source, place in absent:  # read when present (a provenance sidecar): never written by a run
            if location == place:
                raise LipError(f"{path}: is where this run reads {source} from; choose another")
        for other, other_location, other_target in seen:
            if {location, target} & {other_location, other_target} or any(
                _within(a, b) or _within(b, a)
                for a in (location, target)
                for b in (other_location, other_target)
            ):
                raise LipError(f"{path}: is also the output {other.path} of this run; choose another")
        seen.append((output, location, target))
        _check_replaceable(path, output.folder, force, output.parents, output.deferred)


def _check_replaceable(
    path: Path, folder: bool, force: bool, parents: bool = False, defer_existing: bool = False
) -> None:
    """An existing output (also a dangling link) needs --force; a folder must be empty or lip's; a
    FIFO, socket or device is never replaced. What was found is recorded for `publish`, which
    holds to it at the moment of writing. `parents`: its missing folders are made, not refused.
    `defer_existing`: an existing output without --force is refused only when the run comes to
    write it."""
    location = write_location(path)
    try:
        found = os.lstat(path)
    except OSError:
        found = None
    kind = None if found is None else _kind(found.st_mode)
    if kind is not None:
        raise LipError(
            f"{path}: is {kind}; lip replaces only a regular file or a folder it wrote, not even with --force"
        )
    if os.path.lexists(path) and not path.exists():
        if not force and not defer_existing:
            raise LipError(
                f"{path}: is a dangling link (to {os.readlink(path)}); pass --force to replace the link"
            )
    elif path.exists():
        if not force and not defer_existing:
            raise LipError(f"{path}: already exists; pass --force to overwrite it")
        if path.is_dir() and not folder:
            raise LipError(f"{path}: is a folder; the output is a file, name one")
        if not path.is_dir() and folder:
            raise LipError(f"{path}: is a file; the output of a model folder is a folder")
        if force and path.is_dir() and any(path.iterdir()) and not (path / LIP_RECORD).is_file():
            raise LipError(
                f"{path}: is a folder that lip did not write (no {LIP_RECORD}); --force replaces only "
                "an empty folder or one lip wrote; choose another --output"
            )
    parent = location.parent
    if parents:
        parent = _nearest_folder(path)
    elif not parent.is_dir():
        raise LipError(f"{path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise LipError(f"{path}: folder {parent} is not writable")
    checked[location] = (None if found is None else fingerprint(found), force)
    checked_at[Path(path)] = location


def _identity(found: os.stat_result) -> tuple[int, int]:
    return found.st_dev, found.st_ino


def fingerprint(found: os.stat_result) -> tuple[int, ...]:
    """What tells an entry from one put at its name later (an inode number can be reused); a rename
    leaves it as it is."""
    return found.st_dev, found.st_ino, found.st_mtime_ns, found.st_size


def _identities_up(path: Path) -> set[tuple[int, int]]:
    """(device, inode) of `path` and of every folder above it that exists: what a bind mount or a
    second name cannot hide."""
    found = set()
    for place in (path, *path.parents):
        with contextlib.suppress(OSError):
            found.add(_identity(os.stat(place)))
    return found


def _missing_folders(path: Path) -> list[Path]:
    """The folders above `path` that do not exist yet, outermost first (each named as the system
    resolves it: `lnk/../new` is `new` beside the link's target)."""
    missing = []
    folder = Path(path).parent
    while not os.path.lexists(folder) and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing[::-1]


# the existing folder found at check time above an output's missing folders, by (device, inode)
nearest_found: dict[Path, tuple[Path, tuple[int, int], list[Path]]] = {}


def _nearest_folder(path: Path) -> Path:
    """The existing folder that `new_folders(path)` would make its folders in, refused when a file
    or a dangling link stands where a folder should be; recorded, so that the folders are made in
    that very folder."""
    missing = _missing_folders(path)
    above = (missing[0] if missing else Path(path)).parent
    if os.path.islink(above) and not above.exists():
        raise LipError(f"{path}: {above} is a dangling link (to {os.readlink(above)}), not a folder")
    if not above.is_dir():
        raise LipError(f"{path}: {above} is a file, not a folder")
    nearest_found[Path(path)] = (above, _identity(os.stat(above)), missing)
    return above.resolve()


def _open_folder(name: str | Path, dir_fd: int | None = None, follow: bool = True) -> int:
    flags = os.O_RDONLY | os.O_DIRECTORY | (0 if follow else os.O_NOFOLLOW)
    return os.open(name, flags, dir_fd=dir_fd)


@contextlib.contextmanager
def new_folders(path: Path) -> Iterator[list[Path]]:
    """Make the missing folders above `path` (checked by `check_paths` with `Output.parents`), each
    inside the one made before it, starting from the folder found at check time (mkdirat/openat,
    no link followed): a folder replaced by a link meanwhile is refused, never written through.
    Those still empty are removed again when the block fails, so a failed run leaves none behind."""
    path = Path(path)
    above, identity, missing = nearest_found.get(path, (None, None, _missing_folders(path)))
    made: list[Path] = []
    descriptors: list[int] = []
    changed = (
        f"{path}: a folder above it changed while lip ran (another program put a link or folder there); "
    )
    try:
        if missing:
            descriptors.append(_open_folder(missing[0].parent if above is None else above))
            if identity is not None and _identity(os.fstat(descriptors[0])) != identity:
                raise LipError(changed + "nothing was written")
            for folder in missing:
                try:
                    os.mkdir(folder.name, dir_fd=descriptors[-1])
                    made.append(folder)
                except FileExistsError:
                    raise LipError(changed + "nothing was written") from None
                except OSError as error:
                    raise LipError(f"{path}: cannot make the folder {folder} ({error.strerror})") from error
                try:
                    descriptors.append(_open_folder(folder.name, descriptors[-1], follow=False))
                except OSError:  # ELOOP: a link stands where lip just made a folder
                    raise LipError(changed + "nothing was written") from None
            try:
                same = _identity(os.stat(path.parent)) == _identity(os.fstat(descriptors[-1]))
            except OSError:
                same = False
            if not same:
                raise LipError(changed + "nothing was written")
        yield made
    except BaseException:
        for folder, descriptor in reversed(list(zip(missing[: len(made)], descriptors, strict=False))):
            with contextlib.suppress(OSError):
                os.rmdir(folder.name, dir_fd=descriptor)
        raise
    finally:
        for descriptor in descriptors:
            os.close(descriptor)


def _roots(folder: Path) -> list[Path]:
    """Where the files of a folder may really lie: the folder, and for a snapshot of the Hugging
    Face hub cache (`.../snapshots/<revision>`, whose files link to `../../blobs/`) its blob store."""
    real = resolved(folder)
    if real.parent.name == "snapshots":
        return [real, real.parent.parent / "blobs"]
    return [real]


def member(folder: Path, name: str, what: str = "entry") -> Path:
    """`folder/name` for a file named inside a folder (an index entry, a shard), checked: no
    absolute path, no `..`, no link out of the folder, no special file."""
    pure = PurePosixPath(name)
    if not name or pure.is_absolute() or ".." in pure.parts or "\\" in name:
        raise LipError(f"{folder}: {what} `{name}` points outside the folder; lip reads only files inside it")
    path = Path(folder) / name
    real = resolved(path)
    if not any(_within(real, root) for root in _roots(folder)):
        raise LipError(
            f"{folder}: {what} `{name}` is a link out of the folder (to {real}); "
            "lip reads only files inside it"
        )
    check_readable(path)
    return path


def folder_files(folder: Path) -> list[Path]:
    """Every file under a folder, sorted, each checked like `member`; links to folders are refused
    too, so that nothing outside the folder is ever read or copied."""
    folder = Path(folder)
    found = []
    for top, dirs, names in os.walk(folder):
        for name in sorted(dirs):
            if os.path.islink(os.path.join(top, name)):
                entry = os.path.relpath(os.path.join(top, name), folder)
                raise LipError(f"{folder}: `{entry}` is a link to a folder; lip copies only files inside it")
            check_readable(Path(top) / name)  # os.walk would skip a folder it cannot list, silently
        for name in names:
            path = Path(top) / name
            entry = path.relative_to(folder).as_posix()
            member(folder, entry)
            if not path.exists():
                raise LipError(f"{folder}: `{entry}` is a dangling link; remove it or fix it")
            found.append(path)
    return sorted(found)


def copy_folder(source: Path, destination: Path) -> None:
    """Copy a folder's files into `destination` (links to files inside it copied as files), after
    `folder_files` checked every entry."""
    source, destination = Path(source), Path(destination)
    paths = folder_files(source)
    for top, dirs, _ in os.walk(source):
        for name in dirs:
            (destination / Path(top).relative_to(source) / name).mkdir(parents=True, exist_ok=True)
    for path in paths:
        shutil.copy2(path, destination / path.relative_to(source))


ARCHIVE_SUFFIXES = (".tar", ".gz", ".bz2", ".xz", ".zip")  # outer part of `model_best.pth.tar`


def sibling_output(path: Path, tag: str = "lip") -> Path:
    """`<name>.<tag><ext>` beside `path`, keeping the input's naming: model.pt -> model.lip.pt,
    epoch=1-step=64.ckpt -> epoch=1-step=64.lip.ckpt, model_best.pth.tar -> model_best.lip.pth.tar,
    a folder vit -> vit.lip. A double extension counts when its outer part is an archive suffix and
    its inner part a plain word, so `epoch=1.5.ckpt` keeps `.5` in the name."""
    path = Path(path) if Path(path).name else Path(os.path.abspath(path))  # `.`, `..`: by real name
    if path.is_dir():
        return path.with_name(f"{path.name}.{tag}") if path.name else path / f"root.{tag}"
    stem, suffix = path.stem, path.suffix
    inner = Path(stem).suffix
    if suffix.lower() in ARCHIVE_SUFFIXES and inner[1:].isalpha():
        stem, suffix = Path(stem).stem, inner + suffix
    return path.with_name(f"{stem}.{tag}{suffix}")
