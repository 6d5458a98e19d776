"""Atomic writes: every output is written to a temporary beside it and published by a rename that
holds to what the path policy (`files.check_paths`) found there; outputs written together land
together or not at all, and a failure while writing is one line naming the output.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from lip_cli.errors import LipError, first_line
from lip_cli.files import checked, checked_at, fingerprint, write_location

placed: list[Path] = []  # outputs put in place since the command began, for an interrupt's message


@contextlib.contextmanager
def atomic_outputs(*outputs: Path) -> Iterator[list[Path]]:
    """Temporary paths beside `outputs`; published together (`publish`), after fsync, only if the
    block succeeds, so that a failure leaves none of them, and a failure while publishing the
    later ones takes back the earlier ones.

    A link at an output is replaced by the file, never written through. A write that fails for
    lack of room or permission is a LipError naming the output.
    """
    targets = [_checked_location(Path(output)) for output in outputs]
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
    output = _checked_location(Path(output))
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


def _checked_location(output: Path) -> Path:
    """Where `output` lands now, refused when the path policy found it leading elsewhere (a folder
    on the way replaced by a link meanwhile): lip writes only where it checked."""
    location = write_location(output)
    expected = checked_at.get(output)
    if expected is not None and expected != location:
        raise LipError(
            f"{output}: now leads to {location}, not to {expected} where lip checked it (a folder on the "
            f"way was replaced meanwhile); {so_far()}"
        )
    return location


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
    entry (same `fingerprint`). Returns whether an old entry was replaced; it then lies at
    `temporary`, for the caller to remove (or to put back)."""
    expected, force = checked.get(output, (None, False))
    changed = f"{output}: changed while lip ran (another run, or another program); it is kept, "
    if expected is not None and force:
        if _exchange(temporary, output):
            if fingerprint(os.lstat(temporary)) == expected:
                return True
            _exchange(temporary, output)
            raise LipError(changed + so_far())
        with contextlib.suppress(FileNotFoundError):
            if fingerprint(os.lstat(output)) != expected:
                raise LipError(changed + so_far())
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
                f"{output}: appeared while lip ran (another run, or another program); it is kept, " + so_far()
            ) from None
        raise LipError(f"{output}: already exists; pass --force to overwrite it; {so_far()}") from None
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
            if write_location(name) == target
            or any(part.startswith(f".{target.name}.") for part in name.parts)
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
    return LipError(f"{shown}: {what} ({reason}); {so_far()}")


def so_far() -> str:
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
