"""Exclusive access to a folder while a process writes it (docs/reliability.md).

Two processes writing one expert store or one run folder at once would each finish "successfully"
and leave a mix of both. :class:`FolderLock` takes an advisory ``fcntl.flock`` on a lock file in
the folder: the second writer is refused at once with the holder's process id, and the operating
system drops the lock when its holder exits, however it exits (``kill -9`` included), so a
crashed run never leaves a folder locked.

The lock file is removed on release (while still locked); a process that opened it just before
checks, once it holds the lock, that the file it locked is still the one at the path, and retries
otherwise, so removal never lets two holders in. Within one process, locks are counted: the
pipeline and the :class:`~repblend_fast.Distiller` it drives both take the run folder's lock,
and the second acquisition shares the first.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
import threading
import time
from pathlib import Path

__all__ = ["LOCK_NAME", "FolderLock", "LockHeldError"]

LOCK_NAME = ".repblend.lock"

_HELD: dict[Path, list] = {}  # lock file -> [fd, count] of this process's held locks
_GUARD = threading.Lock()


class LockHeldError(RuntimeError):
    """Another process holds the lock: the message names the folder, the holder's pid and what
    to do."""

    def __init__(self, folder: Path, holder: str | None, doing: str | None):
        self.folder, self.holder = folder, holder
        who = f"process {holder}" if holder else "another process"
        if doing:
            who += f" ({doing})"
        super().__init__(
            f"{folder} is in use by {who}; wait for it to finish or stop it (its lock is "
            "released when it exits), or choose another folder"
        )


class FolderLock:
    """An exclusive lock on ``folder`` (created if needed) for the duration of a ``with`` block
    or between :meth:`acquire` and :meth:`release`.

    Args:
        folder: the folder to lock.
        what: what this process does while it holds the lock, for the message another process
            gets (e.g. "distill run", "buffer: writing an expert store").
        name: the lock file's name inside ``folder`` (default :data:`LOCK_NAME`; the feature cache
            uses one per entry).
    """

    def __init__(self, folder: str | os.PathLike, what: str, *, name: str = LOCK_NAME):
        self.folder = Path(folder)
        self.what = what
        self.name = name
        self._key: Path | None = None

    @property
    def held(self) -> bool:
        return self._key is not None

    def acquire(self, *, wait: bool = False) -> FolderLock:
        """Take the lock; ``LockHeldError`` if another process holds it (``wait=False``), else
        wait for it. ``OSError`` when the folder cannot be created or written."""
        if self._key is not None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        key = (self.folder.resolve() / self.name).absolute()
        with _GUARD:
            if key in _HELD:
                _HELD[key][1] += 1
                self._key = key
                return self
        while True:
            fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except OSError as exc:
                holder, doing = _read_holder(fd)
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise LockHeldError(self.folder, holder, doing) from None
                raise
            st = os.fstat(fd)
            try:
                cur = os.stat(key)
            except FileNotFoundError:
                cur = None
            if cur is not None and (cur.st_ino, cur.st_dev) == (st.st_ino, st.st_dev):
                break
            os.close(fd)  # the previous holder removed the file we waited on: lock the new one
        os.ftruncate(fd, 0)
        cmd = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))
        os.write(fd, f"{os.getpid()}\n{self.what}\n{cmd[:500]}\n{time.ctime()}\n".encode())
        with _GUARD:
            _HELD[key] = [fd, 1]
        self._key = key
        return self

    def release(self) -> None:
        """Release the lock (the last release in this process removes the lock file)."""
        key, self._key = self._key, None
        if key is None:
            return
        with _GUARD:
            entry = _HELD.get(key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] > 0:
                return
            del _HELD[key]
        fd = entry[0]
        try:
            os.unlink(key)  # while still locked: see the module docstring
        except OSError:
            pass
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:
            pass


def _read_holder(fd: int) -> tuple[str | None, str | None]:
    """``(pid, what)`` the holder wrote into the lock file (None while it has not yet)."""
    try:
        lines = os.pread(fd, 1024, 0).decode("utf-8", "replace").split("\n")
    except OSError:
        return None, None
    pid = lines[0].strip()
    if not pid.isdigit():
        return None, None
    return pid, (lines[1].strip() or None) if len(lines) > 1 else None
