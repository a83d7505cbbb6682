"""One writer at a time per output dir: an advisory ``flock`` on ``.sfr-export.lock`` holding the writer's PID.

The kernel drops a ``flock`` when its process dies, so a lock left by a killed process is never stale: the next
writer simply takes it. A second writer is refused at once with a line naming the holder's PID. The lock is
re-entrant within one process (``build`` runs several stages, each of which locks).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from ..errors import LockedError, PathError
from .layout import LOCK_FILE

_held: dict[Path, int] = {}
_guard = threading.Lock()


def _holder(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip() or "unknown"
    except OSError:
        return "unknown"


def _open_lock(path: Path) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except (NotADirectoryError, FileExistsError):  # FileExistsError: the dir itself is a file
        raise PathError(f"output dir {path.parent} is not a directory") from None
    except OSError as exc:
        raise PathError(f"cannot lock {path.parent}: {exc.strerror}") from None


@contextlib.contextmanager
def writer_lock(root: Path) -> Iterator[None]:
    """Hold the writer lock of ``root`` for the block, or raise LockedError naming the holder."""
    path = (Path(root) / LOCK_FILE).absolute()
    with _guard:
        if path in _held:
            _held[path] += 1
            fd = None
        else:
            fd = _open_lock(path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise LockedError(f"{root} is being written by another sfr-export process (pid {_holder(path)}); "
                                  "wait for it to finish") from None
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            _held[path] = 1
    try:
        yield
    finally:
        with _guard:
            _held[path] -= 1
            if _held[path] == 0:
                del _held[path]
        if fd is not None:  # the outermost entry, always the last to leave
            os.close(fd)
