"""Atomic replacement of a small file: the operator's config and whitelist are never left
truncated or mixed, whatever kills us and whenever."""

import os
import re
import stat
import time
from typing import Optional, Tuple, Type

from smtp_gate.errors import SmtpGateError

LEFTOVER_AGE = 60.0  # seconds after which a temporary file a killed writer left is removed


def temp_name_pattern(base: str) -> "re.Pattern[str]":
    """The names atomic_write() gives its temporary files for a target named BASE."""
    return re.compile(re.escape(f".{base}.tmp") + r"[0-9a-f]{8}")


def _create_temp(directory: str, base: str) -> Tuple[int, str]:
    """O_EXCL with a random name, like tempfile.mkstemp (which costs the hook an import)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(100):
        name = os.path.join(directory, f".{base}.tmp{os.urandom(4).hex()}")
        try:
            return os.open(name, flags, 0o600), name
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name for {base!r} in {directory!r}")


def _unlink_quietly(name: str) -> None:
    try:
        os.unlink(name)
    except OSError:
        pass  # best effort: the next write removes it


def _remove_leftovers(directory: str, base: str) -> None:
    """Remove temporary files that killed writers left, once they are a minute old.

    Under the lock no other writer is live, but the age keeps even a writer that ignored
    the lock from losing its temporary file between its write and its rename.
    """
    pattern = temp_name_pattern(base)
    cutoff = time.time() - LEFTOVER_AGE
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if pattern.fullmatch(name):
            path = os.path.join(directory, name)
            try:
                if os.lstat(path).st_mtime < cutoff:
                    os.unlink(path)
            except OSError:
                continue


def atomic_write(
    path: "os.PathLike[str] | str",
    data: bytes,
    what: str,
    new_mode: int = 0o640,
    error: Type[SmtpGateError] = SmtpGateError,
) -> None:
    """Replace PATH with DATA: a temporary file `.NAME.tmpXXXXXXXX` in the same directory is
    written, fsynced, given the old file's mode and owner (NEW_MODE for a new file), renamed
    over the target, and the directory is fsynced.  A crash at any instant leaves the old or
    the new file, never a mix; on error the temporary file is removed, the target untouched,
    and ERROR raised with one line naming WHAT, the path and the OS error.
    A symlink is followed: the file it points to is replaced, the link stays.
    """
    target = os.path.realpath(os.fspath(path))
    directory, base = os.path.split(target)
    step = "reading the current file's status"
    tmp = ""
    try:
        try:
            st: Optional[os.stat_result] = os.stat(target)
        except FileNotFoundError:
            st = None
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise error(f"cannot write {what} {target!r}: it is not a regular file")
        step = "creating a temporary file"
        fd, tmp = _create_temp(directory, base)
        try:
            step = f"writing {tmp!r}"
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if st is not None:
                own = os.fstat(fd)
                if (st.st_uid, st.st_gid) != (own.st_uid, own.st_gid):
                    step = f"giving {tmp!r} the owner of the current file"
                    os.fchown(fd, st.st_uid, st.st_gid)
            step = f"setting the mode of {tmp!r}"
            os.fchmod(fd, stat.S_IMODE(st.st_mode) if st is not None else new_mode)
            step = f"syncing {tmp!r} to disk"
            os.fsync(fd)
        finally:
            os.close(fd)
        step = f"renaming {tmp!r} over it"
        os.rename(tmp, target)
        tmp = ""
    except OSError as e:
        raise error(f"cannot write {what} {target!r}: {e.strerror or e} (while {step}); the file is unchanged") from None
    finally:
        if tmp:
            _unlink_quietly(tmp)
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        raise error(
            f"wrote {what} {target!r} but could not sync its directory: {e.strerror or e}; "
            "the change may not survive a power loss"
        ) from None
    _remove_leftovers(directory, base)


def remove(path: "os.PathLike[str] | str", what: str, error: Type[SmtpGateError] = SmtpGateError) -> bool:
    """Remove the file at PATH durably (its directory synced: a removal lost in a power cut
    would bring the file back); False if it did not exist.  A failed removal raises ERROR
    naming WHAT; a failed directory sync is not an error: the file is gone, only its
    durability across a power cut is in doubt."""
    target = os.fspath(path)
    try:
        os.unlink(target)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise error(f"cannot remove {what} {target!r}: {e.strerror or e}") from None
    try:
        dir_fd = os.open(os.path.dirname(target) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return True
