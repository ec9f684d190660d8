"""Atomic file output: write beside the destination, rename over it only when complete.

A crash, an interrupt or a kill mid-write leaves the previous file (if any) intact. The data goes
to a part file ".NAME.RANDOM.part" in the same folder, which the writer holds locked (flock) while
it writes; the kernel drops the lock when the process dies, however it dies. A failed write removes
its part file at once; one left by a killed process is unlocked, and the next save to the same path
removes it. The new file gets the permissions a plain open() would give it: the existing file's, or
0o666 less the umask.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import stat
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a part-file path in path's folder; it replaces path, flushed to disk, when the block ends
    normally and is removed when the block raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_parts(path)
    fd, part = _new_part(path)
    try:
        try:
            yield part
            os.fsync(fd)   # the writer may have used its own file object; the data is the inode's
            os.replace(part, path)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        _fsync_folder(path.parent)   # makes the rename itself durable
    finally:
        os.close(fd)   # releases the lock


def write_bytes(path: str | os.PathLike, chunks: list[bytes]) -> None:
    """Writes chunks to path atomically, flushed to disk before the rename."""
    with replacing(path) as part, open(part, "wb") as f:
        for chunk in chunks:
            f.write(chunk)


def remove_stale_parts(path: Path) -> None:
    """Removes the part files of path that no live writer holds (left by a killed process)."""
    prefix = f".{path.name}."
    with os.scandir(path.parent) as entries:
        stale = [e.path for e in entries if e.name.startswith(prefix) and e.name.endswith(".part")]
    for name in stale:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue   # gone already (renamed into place or removed), or not ours to open
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # Locked by us now, so no writer holds it, and the name still being this file means it
            # was not renamed into place meanwhile. (A writer that created it but had not locked it
            # yet sees it gone once it gets the lock, and starts another; see _new_part.)
            if _names(name, fd):
                os.unlink(name)
        except OSError:
            pass   # a live writer's lock, or a file we may not remove
        finally:
            os.close(fd)


def _new_part(path: Path) -> tuple[int, Path]:
    """A new part file for path, open and locked: (fd, its path)."""
    kept_mode = None   # without a file to replace, 0o666 less the umask, as open() does
    with contextlib.suppress(FileNotFoundError):
        kept_mode = stat.S_IMODE(os.stat(path).st_mode)
    while True:
        part = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
        try:
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if _names(part, fd):
                if kept_mode is not None:
                    os.fchmod(fd, kept_mode)
                return fd, part
        except BaseException:
            os.close(fd)
            part.unlink(missing_ok=True)
            raise
        os.close(fd)   # another save took it for stale before we locked it: start again


def _names(name: str | os.PathLike, fd: int) -> bool:
    """Whether name is (still) the file open as fd."""
    try:
        st = os.stat(name, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:   # file systems that cannot sync a folder say EINVAL
            raise
    finally:
        os.close(fd)
