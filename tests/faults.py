"""Fault injection: the real ``OSError`` a read-only folder or a full disk gives, from patched ``os``
and ``io`` primitives. Tests run as root, which writes where others cannot, so permissions and
mounts cannot stand in for these faults."""
from __future__ import annotations

import builtins
import errno
import io
import os
from pathlib import Path
from typing import Any

import pytest

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT


def _fail(code: int, path: Any) -> None:
    raise OSError(code, os.strerror(code), os.fspath(path))


def refuse_writes(monkeypatch: pytest.MonkeyPatch, folder: str | Path, code: int = errno.EROFS) -> None:
    """Every new file, folder or write-open under ``folder`` fails with ``OSError(code)`` (EROFS: a
    read-only file system); reads still work."""
    root = os.path.abspath(folder)

    def under(path: Any) -> bool:
        if not isinstance(path, (str, bytes, os.PathLike)):
            return False  # a file descriptor
        p = os.path.abspath(os.fsdecode(path))
        return p == root or p.startswith(root + os.sep)

    real_open, real_mkdir, real_io_open = os.open, os.mkdir, io.open

    def os_open(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        if flags & _WRITE_FLAGS and under(path):
            _fail(code, path)
        return real_open(path, flags, mode, dir_fd=dir_fd)

    def mkdir(path: Any, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        if under(path):
            _fail(code, path)
        real_mkdir(path, mode, dir_fd=dir_fd)

    def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if any(c in mode for c in "wax+") and under(file):
            _fail(code, file)
        return real_io_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(io, "open", open_)
    monkeypatch.setattr(builtins, "open", open_)


def disk_full_on_fsync(monkeypatch: pytest.MonkeyPatch, name_contains: str = "") -> list[str]:
    """``os.fsync`` of a file whose path contains ``name_contains`` fails with ENOSPC, as on a full
    disk with delayed allocation (the data was accepted by write(), the blocks are not there).
    Returns the list of paths that failed."""
    real_fsync, failed = os.fsync, []

    def fsync(fd: int) -> None:
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            path = ""
        if name_contains in path and not os.path.isdir(path):
            failed.append(path)
            _fail(errno.ENOSPC, path)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return failed
