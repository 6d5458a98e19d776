"""Safe file handling shared by every command: one path policy, atomic writes, safe reads and copies.

The policy (`check_paths`): every input and output is resolved, links followed, before any work.
Only regular files (and folders) are read; an output may not be an input, lie inside an input
folder, hold an input, or be another output of the same run; an existing output is replaced only
with --force, and a folder only when it is empty or was written by lip (it holds `lip.json`);
a FIFO, socket or device never. Files named inside a folder (index entries, shards) must stay
inside it. The check holds at the moment of writing too: `publish` never replaces an entry that
appeared or changed after the check, and outputs written together land together or not at all.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import shutil
import signal
import stat
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from lip_cli.errors import LipError, first_line

LIP_RECORD = "lip.json"  # what lip writes into every folder it makes
placed: list[Path] = []  # outputs put in place since the command began, for an interrupt's message
# what the path policy found at each output (its `_fingerprint`, None for nothing), and whether
# --force lets it be replaced: `publish` replaces that entry only, never one that came later
_checked: dict[Path, tuple[tuple[int, ...] | None, bool]] = {}


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


def _location(path: Path) -> Path:
    """Where a write to `path` lands: its folder resolved, the last name kept (a link there is
    replaced, never written through)."""
    absolute = Path(os.path.abspath(path))
    if absolute.name in ("", ".", ".."):
        return resolved(absolute)
    return resolved(absolute.parent) / absolute.name


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
    absent = [(source, _location(source)) for source in sources if not os.path.lexists(source)]
    seen: list[tuple[Output, Path, Path]] = []
    for output in targets:
        path = Path(output.path)
        location, target = _location(path), resolved(path)
        above = _identities_up(location)
        places = {_identity(os.stat(place)) for place in (location, target) if os.path.exists(place)}
        if output.suffixes and path.suffix.lower() not in output.suffixes:
            raise LipError(
                f"{path}: the output is written as {' or '.join(filter(None, output.suffixes))}; "
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
    location = _location(path)
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
    _checked[location] = (None if found is None else _fingerprint(found), force)


def _identity(found: os.stat_result) -> tuple[int, int]:
    return found.st_dev, found.st_ino


def _fingerprint(found: os.stat_result) -> tuple[int, ...]:
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
    """The folders above `path` that do not exist yet, outermost first."""
    missing = []
    for folder in Path(os.path.abspath(path)).parents:
        if os.path.lexists(folder):
            break
        missing.append(folder)
    return missing[::-1]


def _nearest_folder(path: Path) -> Path:
    """The existing folder that `new_folders(path)` would make its folders in, refused when a file
    or a dangling link stands where a folder should be."""
    missing = _missing_folders(path)
    above = (missing[0] if missing else Path(os.path.abspath(path))).parent
    if os.path.islink(above) and not above.exists():
        raise LipError(f"{path}: {above} is a dangling link (to {os.readlink(above)}), not a folder")
    if not above.is_dir():
        raise LipError(f"{path}: {above} is a file, not a folder")
    return above.resolve()


@contextlib.contextmanager
def new_folders(path: Path) -> Iterator[list[Path]]:
    """Make the missing folders above `path` (checked by `check_paths` with `Output.parents`);
    those still empty are removed again when the block fails, so a failed run leaves none behind."""
    made = []
    try:
        for folder in _missing_folders(path):
            try:
                folder.mkdir()
            except FileExistsError:  # made meanwhile by someone else: theirs, never removed
                continue
            except OSError as error:
                raise LipError(f"{path}: cannot make the folder {folder} ({error.strerror})") from error
            made.append(folder)
        yield made
    except BaseException:
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


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


@contextlib.contextmanager
def atomic_outputs(*outputs: Path) -> Iterator[list[Path]]:
    """Temporary paths beside `outputs`; published together (`publish`), after fsync, only if the
    block succeeds, so that a failure leaves none of them, and a failure while publishing the
    later ones takes back the earlier ones.

    A link at an output is replaced by the file, never written through. A write that fails for
    lack of room or permission is a LipError naming the output.
    """
    targets = [_location(Path(output)) for output in outputs]
    temporaries: list[Path] = []
    try:
        for target in targets:
            with signals_held():  # made and recorded in one step, so that clean-up finds it
                handle, temporary = tempfile.mkstemp(
                    prefix=f".{target.name}.", suffix=".tmp", dir=target.parent
                )
                temporaries.append(Path(temporary))
            os.close(handle)
            os.chmod(temporary, 0o666 & ~_umask())
        yield temporaries
        for temporary in temporaries:
            with open(temporary, "rb+") as written:
                os.fsync(written.fileno())
        with signals_held():
            _publish_all(list(zip(temporaries, targets, strict=True)))
    except BaseException as error:
        failure = _write_failure(error, targets)
        if failure is error:
            raise
        raise failure from None
    finally:
        for temporary in temporaries:
            temporary.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_output(output: Path) -> Iterator[Path]:
    """`atomic_outputs` for one file."""
    with atomic_outputs(output) as (temporary,):
        yield temporary


@contextlib.contextmanager
def atomic_folder(output: Path) -> Iterator[Path]:
    """A temporary folder beside `output`; swapped in, after fsync of its files, only on success.

    An old output (--force) is exchanged with the new one in one step where the system can
    (renameat2), else moved aside with interrupts held back; either way an interrupt leaves the
    old or the new output in place, and no copy of the old one behind.
    """
    output = _location(Path(output))
    temporary = None
    try:
        with signals_held():
            temporary = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
        os.chmod(temporary, 0o777 & ~_umask())
        yield temporary
        for file in temporary.rglob("*"):
            if file.is_file():
                with open(file, "rb") as written:
                    os.fsync(written.fileno())
        with signals_held():
            _publish_all([(temporary, output)])
    except BaseException as error:
        failure = _write_failure(error, [output])
        if failure is error:
            raise
        raise failure from None
    finally:
        if temporary is not None and os.path.lexists(temporary):
            with signals_held():
                _remove(temporary)


def _publish_all(pairs: list[tuple[Path, Path]]) -> None:
    """Put each temporary in place of its output (`publish`); if one cannot be, the ones already
    published are taken back. The entries they replaced end at the temporary names and are
    removed once all are in place."""
    done: list[tuple[Path, Path, bool]] = []
    try:
        for temporary, output in pairs:
            done.append((temporary, output, publish(temporary, output)))
    except BaseException:
        for temporary, output, replaced in reversed(done):
            if replaced:
                _exchange(temporary, output) or os.replace(temporary, output)
            else:
                os.replace(output, temporary)  # ours: removed with the temporaries
        raise
    placed.extend(output for _, output, _ in done)
    for temporary, _, replaced in done:
        if replaced:
            _remove(temporary)


def publish(temporary: Path, output: Path) -> bool:
    """Rename `temporary` onto `output`, holding to what the path policy found there: nothing may
    have appeared meanwhile, and an entry may be replaced only when --force allowed that very
    entry (same `_fingerprint`). Returns whether an old entry was replaced; it then lies at
    `temporary`, for the caller to remove (or to put back)."""
    expected, force = _checked.get(output, (None, False))
    changed = f"{output}: changed while lip ran (another run, or another program); it is kept, "
    if expected is not None and force:
        if _exchange(temporary, output):
            if _fingerprint(os.lstat(temporary)) == expected:
                return True
            _exchange(temporary, output)
            raise LipError(changed + _so_far())
        with contextlib.suppress(FileNotFoundError):
            if _fingerprint(os.lstat(output)) != expected:
                raise LipError(changed + _so_far())
            aside = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".old", dir=output.parent))
            os.replace(output, aside / output.name)
            os.replace(temporary, output)
            os.replace(aside / output.name, temporary)
            aside.rmdir()
            return True
    try:
        _rename_no_replace(temporary, output)
    except FileExistsError:
        if expected is None:
            raise LipError(
                f"{output}: appeared while lip ran (another run, or another program); it is kept, "
                + _so_far()
            ) from None
        raise LipError(f"{output}: already exists; pass --force to overwrite it; {_so_far()}") from None
    return False


RENAME_NOREPLACE, RENAME_EXCHANGE, AT_FDCWD = 1, 2, -100  # linux/fs.h, fcntl.h


@functools.cache
def _libc_renameat2() -> Callable[..., int] | None:
    import ctypes

    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


def _renameat2(source: Path, target: Path, flags: int) -> bool:
    """Linux renameat2; False where the system or the file system does not offer it."""
    import ctypes

    function = _libc_renameat2()
    if function is None:
        return False
    if function(AT_FDCWD, os.fsencode(source), AT_FDCWD, os.fsencode(target), flags) == 0:
        return True
    number = ctypes.get_errno()
    if number in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(number, os.strerror(number), str(target))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two entries in one step; False where the system cannot (or `b` is gone)."""
    try:
        return _renameat2(a, b, RENAME_EXCHANGE)
    except FileNotFoundError:
        return False


def _rename_no_replace(source: Path, target: Path) -> None:
    """Rename, raising FileExistsError if anything is at `target`: renameat2(RENAME_NOREPLACE),
    else a hard link for a file (link(2) never replaces), else a check just before the rename."""
    if _renameat2(source, target, RENAME_NOREPLACE):
        return
    if not os.path.isdir(source):
        try:
            os.link(source, target, follow_symlinks=False)
            return os.unlink(source)
        except (NotImplementedError, OSError) as error:  # no hard links here: the last check below
            if isinstance(error, FileExistsError):
                raise
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, "exists", str(target))
    os.rename(source, target)


def _remove(path: Path) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM back until the block ends, so that a few steps that must go
    together (swapping outputs in, and recording that) are not cut in the middle."""
    received: list[int] = []
    previous = {}
    try:
        for number in (signal.SIGINT, signal.SIGTERM):
            previous[number] = signal.signal(number, lambda number, frame: received.append(number))
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in dict.fromkeys(received):
            signal.raise_signal(number)


def _write_failure(error: BaseException, targets: list[Path]) -> BaseException:
    """What a failure while writing `targets` ends the run with: an interrupt stays one (also when
    a library's clean-up replaced it with its own error), a full disk or a refusal of the file
    system becomes one line naming the output."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, KeyboardInterrupt):
            return cause
        cause = cause.__context__
    if isinstance(error, LipError | MemoryError) or not isinstance(error, Exception):
        return error
    shown, what = targets[0], "cannot be written"
    if isinstance(error, OSError):
        names = [Path(name) for name in (error.filename, error.filename2) if name is not None]
        ours = [
            target
            for name in names
            for target in targets
            if _location(name) == target or any(part.startswith(f".{target.name}.") for part in name.parts)
        ]
        if ours or not names:
            shown = ours[0] if ours else shown
        else:
            shown, what = names[0], "cannot be read"
        reason = error.strerror or first_line(error)
    elif _out_of_room(shown.parent) or "No space left" in str(error) or "StorageFull" in str(error):
        reason = os.strerror(errno.ENOSPC)
    else:
        return error
    return LipError(f"{shown}: {what} ({reason}); {_so_far()}")


def _so_far() -> str:
    """What the run has put in place, for the end of its error line."""
    done = ", ".join(map(str, placed))
    return f"wrote only {done}" if done else "nothing was written"


def _out_of_room(folder: Path) -> bool:
    """Whether the file system holding `folder` is (all but) full."""
    try:
        found = os.statvfs(folder)
    except OSError:
        return False
    return found.f_bavail * found.f_frsize < 1 << 20


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
    path = Path(path) if Path(path).name else Path(os.path.abspath(path))  # `.`, `..`: by real name
    if path.is_dir():
        return path.with_name(f"{path.name}.{tag}") if path.name else path / f"root.{tag}"
    stem, suffix = path.stem, path.suffix
    inner = Path(stem).suffix
    if suffix.lower() in ARCHIVE_SUFFIXES and inner[1:].isalpha():
        stem, suffix = Path(stem).stem, inner + suffix
    return path.with_name(f"{stem}.{tag}{suffix}")


class Cancelled(Exception):
    """A background digest stopped because the run no longer needs it."""


def sha256_of(path: Path, shards: list[Path] | None = None, stop: threading.Event | None = None) -> str:
    """Hex digest of a file, or of several files or a folder's files (names and contents, sorted).

    `stop`: checked between blocks, so that a digest nobody waits for ends early.
    """
    path = Path(path)
    if shards is None and path.is_dir():
        shards = folder_files(path)
    digest = hashlib.sha256()
    for file in shards or [path]:
        check_readable(file)
        if shards:
            digest.update(str(file).encode() + b"\0")
        with open(file, "rb") as handle:
            while block := handle.read(1 << 22):
                if stop is not None and stop.is_set():
                    raise Cancelled(str(file))
                digest.update(block)
    return digest.hexdigest()


class BackgroundDigests:
    """sha256 digests computed on daemon threads while the run goes on.

    Nothing waits for them at exit: once the owner is dropped (an error ended the run) or shut
    down, they stop at their next block, so a failed run exits at once.
    """

    def __init__(self) -> None:
        self._stop = threading.Event()
        weakref.finalize(self, self._stop.set)

    def submit(self, digest: Callable[..., str], *args: object) -> Future[str]:
        """Start `digest(*args, stop=...)`, such as `sha256_of`, on its own thread."""
        future: Future[str] = Future()
        stop = self._stop  # the thread must not keep `self` alive

        def work() -> None:
            try:
                future.set_result(digest(*args, stop=stop))
            except BaseException as error:  # handed to whoever reads the result
                future.set_exception(error)

        threading.Thread(target=work, name="lip-sha256", daemon=True).start()
        return future

    def shutdown(self, cancel_futures: bool = True) -> None:
        self._stop.set()
