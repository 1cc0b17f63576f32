"""Durable, atomic file writes: a kill or a full disk at any moment leaves the old file or the new one.

The recipe (POSIX): write a temporary file in the target's folder, flush and fsync it, rename
it over the target (atomic on one file system), then fsync the folder so the rename itself
survives a power loss. Without the file fsync, a crash soon after the rename can leave an
empty or partial file under the final name (delayed allocation on ext4/xfs); without the
folder fsync, the rename can be lost and the old file reappear.

A write that fails (ENOSPC, EDQUOT, EFBIG, EACCES, ...) removes its temporary file and raises
StorageError naming the file, the cause and that the previous version is still in place.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from cifarlab.errors import StorageError

# errno values that mean "no room": a full disk, a quota, or a file-size limit (ulimit -f).
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NO_PERMISSION_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS}


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None] | bytes, *, what: str = "file") -> Path:
    """Write `path` atomically and durably; `write` is the bytes, or a function filling a binary file.

    `what` names the file in error messages ("checkpoint", "model file", ...).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise storage_error(exc, path, what) from None
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(write):
                write(f)
            else:
                f.write(write)
            f.flush()
            os.fsync(f.fileno())
        chmod_default(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise storage_error(exc, path, what) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        fsync_dir(path.parent)
    except OSError as exc:  # the new file is in place; only its durability across a power loss is in doubt
        raise StorageError(f"wrote the {what} {path} but could not flush its folder to disk "
                           f"({exc.strerror}). Check the disk.") from None
    return path


def fsync_dir(folder: str | Path) -> None:
    """Make a rename or a new file in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temps(path: Path) -> None:
    """Delete temporary files that a killed writer of `path` left behind (one writer per path).

    A process killed between creating its temporary file and renaming it leaves a
    `.<name>.<random>.tmp` sibling; repeated kills on a nearly full disk would otherwise pile
    them up until the next checkpoint no longer fits.
    """
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def storage_error(exc: OSError, path: Path, what: str) -> StorageError:
    """A StorageError saying what could not be written, why, and that the old version is kept."""
    if exc.errno in DISK_FULL_ERRNOS:
        cause = f"the disk is full ({exc.strerror}; a quota or file-size limit also counts)"
        todo = "Free some space (or raise the limit) and run the command again."
    elif exc.errno in _NO_PERMISSION_ERRNOS:
        cause = f"no permission to write there ({exc.strerror})"
        todo = "Choose a folder you can write to, or fix its permissions."
    else:
        cause = exc.strerror or str(exc)
        todo = "Check the disk and run the command again."
    kept = (f"The previous {path.name} is unchanged." if path.exists()
            else "Nothing was written.")
    return StorageError(f"could not write the {what} {path}: {cause}. {kept} {todo}", path=path)


def describe_os_error(exc: OSError) -> str:
    """An OSError that escaped to the command line, in words (no traceback): what, where, what to do."""
    where = f" ({exc.filename})" if exc.filename else ""
    text = f"{exc.strerror or exc}{where}"
    if exc.errno in DISK_FULL_ERRNOS:
        return f"{text}: the disk is full (or a quota or file-size limit was reached). Free some space and run again."
    return text


def chmod_default(path: str | Path) -> None:
    """Give a file from mkstemp (always 0600) the permissions a plain open() would have given."""
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    """The process umask; read from /proc where possible, because os.umask can only read it by
    changing it, which would race with other threads creating files."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ---- reading: what a name given as an input file points to -----------------------------------

def file_problem(path: Path) -> str | None:
    """None for a regular file (links followed); else what `path` is instead, as a phrase.
    Checked by type before opening: a FIFO would block the read, a device never end it."""
    if path.is_file():
        return None
    if path.is_dir():
        return "is a folder"
    return "does not exist" if not path.exists() else "is not a regular file (a pipe, device or socket)"


def require_file(path: Path, what: str, error: type[Exception]) -> None:
    """Raise `error` unless `path` is a regular file: "{what} not found: PATH", or what it is."""
    problem = file_problem(path)
    if problem == "does not exist":
        raise error(f"{what} not found: {path}")
    if problem:
        raise error(f"{what} {path} {problem}")
