"""The one lock that covers every read-modify-commit of the kernel state and the whitelist.

The whitelist commands take it through filelock; hooks and rebuilds take the very same
lock with fcntl.flock (filelock's Unix lock is flock on the lock file), because of what
filelock 4.x costs a process that must be quick: importing it (~40 ms) is more than
the rest of a hook's work, and its import and interpreter exit (~70 ms, measured) were
a tenth of a rebuild of 1 000 guests, which runs every minute.  Both wait a bounded
time and then raise LockTimeout: a hook that waited forever would hang libvirt.
"""

import fcntl
import os
import signal
from contextlib import contextmanager
from typing import Iterator

from smtp_gate.errors import LockTimeout

HOOK_TIMEOUT = 5.0  # seconds; the hooks pass what is left of their whole budget (hook.DEADLINE)
COMMAND_TIMEOUT = 60.0  # an operator's command may wait out a burst of hooks


def _ensure_dir(path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)


@contextmanager
def flock(path: "os.PathLike[str] | str", timeout: float = HOOK_TIMEOUT) -> Iterator[None]:
    """Hold an exclusive flock on PATH, waiting at most TIMEOUT seconds (main thread only).

    A blocking flock interrupted by SIGALRM keeps the kernel's own queueing, so under a
    burst of hooks nobody spins and nobody starves.
    """
    path = os.fspath(path)
    _ensure_dir(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    with _held(fd, path, timeout):
        yield


@contextmanager
def flock_existing(path: "os.PathLike[str] | str", timeout: float = COMMAND_TIMEOUT) -> Iterator[bool]:
    """flock() for a caller that must write nothing (a dry run): the lock is taken only if
    its file exists, and yields whether it was.  Creating the file, or its directory, would
    be a write; and while no file exists, no hook or rebuild has taken the lock yet."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY | os.O_CLOEXEC)  # flock needs no write access
    except (FileNotFoundError, NotADirectoryError):
        yield False
        return
    with _held(fd, os.fspath(path), timeout):
        yield True


@contextmanager
def _held(fd: int, path: str, timeout: float) -> Iterator[None]:
    """Lock FD (open on PATH) within TIMEOUT seconds, and close it at the end."""

    def expire(_signum: int, _frame: object) -> None:
        raise LockTimeout(f"lock {str(path)!r} still held by another smtp-gate process after {timeout:g}s")

    previous = signal.signal(signal.SIGALRM, expire)
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        yield
    finally:
        signal.signal(signal.SIGALRM, previous)
        os.close(fd)  # closing the only descriptor releases the flock


@contextmanager
def command_lock(path: "os.PathLike[str] | str", timeout: float = COMMAND_TIMEOUT) -> Iterator[None]:
    """The same lock for the whitelist commands, through filelock (hooks and rebuilds: flock())."""
    import filelock

    path = os.fspath(path)
    _ensure_dir(path)
    lock = filelock.FileLock(str(path), timeout=timeout)
    try:
        with lock:
            yield
    except filelock.Timeout:
        raise LockTimeout(
            f"lock {str(path)!r} still held by another smtp-gate process after {timeout:g}s"
        ) from None
