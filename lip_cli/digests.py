"""sha256 digests of a run's inputs for its provenance record, computed on background threads."""

from __future__ import annotations

import hashlib
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

from lip_cli.files import check_readable, folder_files


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
