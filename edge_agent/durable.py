"""Writes that survive a power cut: write, fsync the file, rename, fsync the directory.

A rename is atomic, but only durable once the directory that holds the new name is
fsynced; and the renamed file's contents are only durable if the file itself was
fsynced *before* the rename. Skip either step and a power cut can leave a name that
points at a zero-length or half-written file (ext4 ``data=ordered`` hides some of this,
other file systems and SD cards do not). See
https://www.usenix.org/conference/osdi14/technical-sessions/presentation/pillai
("All File Systems Are Not Created Equal") for the measured failure modes.

Everything here goes through ``os.open``/``os.write``/``os.fsync``/``os.replace`` so a
test can record the exact call order (``tests/unit/test_edge_durable.py``).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

__all__ = ["write_file", "atomic_write", "fsync_dir", "rename_durable"]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def write_file(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> None:
    """Create ``path`` (must not exist), write ``data`` and fsync it.

    The name is not durable until the parent directory is fsynced (:func:`fsync_dir`):
    callers writing many files into a staging folder fsync the folder once at the end.
    """
    fd = os.open(os.fspath(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory, making the names created or renamed in it durable."""
    fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so that readers (and a reboot) see old or new, never half.

    Order: write a temp file in the same directory, fsync it, rename it over ``path``,
    fsync the directory.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        write_file(tmp, data, mode)
        os.replace(os.fspath(tmp), os.fspath(path))
    except BaseException:
        try:
            os.unlink(os.fspath(tmp))
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def rename_durable(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Rename ``src`` to ``dst`` (same file system) and fsync the destination directory."""
    os.replace(os.fspath(src), os.fspath(dst))
    fsync_dir(Path(dst).parent)
    if Path(src).parent != Path(dst).parent:
        fsync_dir(Path(src).parent)
