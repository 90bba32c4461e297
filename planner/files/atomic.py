"""The one way this project writes anything: a unique temp name beside the target, fsync, rename.

Every output path the CLI or the library writes (plans, Pareto fronts, cache files, artifact files,
whole folders) goes through :func:`atomic_write`, :func:`atomic_save_tensors` or :func:`atomic_dir`:

- the temp name is unique (``mkstemp``/``mkdtemp``), so two writers never share one;
- the data is fsync'ed before the rename, so a crash leaves the old file or the new one, never half;
- the result gets the user's umask (``mkstemp`` alone would leave 0600 / 0700);
- a target that exists and is not a regular file (a device such as ``/dev/null``, a FIFO, a socket,
  a symlink) is refused with a :class:`~planner.errors.PlannerError` before anything is written:
  the process usually runs as root, where a rename would silently replace the system's device node;
- a write the file system refuses (full disk, read-only, no permission) removes the temp file and
  becomes a one-line PlannerError naming the path, not a traceback.

Commands call :func:`check_file_target`, :func:`check_dir_target` and :func:`check_writable` on
their outputs before any heavy work, so a bad path costs the user nothing.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from planner.errors import PlannerError

log = logging.getLogger(__name__)
# what the file system says when the user's disk or folder cannot take the data: the user's problem
# to fix (free space, another folder), so one line; other OSErrors keep their traceback
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})


# Temp names carry the writer's host and pid (``.NAME.HOST-PID.RANDOM.tmp``), so a sweep can tell the
# temps of a killed writer (``kill -9`` leaves them) from those of one still running.
STALE_S = 24 * 3600  # a temp this old is removed whoever wrote it (another host, an older planner)


def _tag() -> str:
    return f"{socket.gethostname().replace('.', '_')}-{os.getpid()}"  # the pid of this process (after a fork too)


def _writer_alive(name: str) -> bool | None:
    """For a temp name made here: whether its writer (this host) still runs; None: not ours to judge."""
    host = re.escape(socket.gethostname().replace(".", "_"))
    m = re.search(rf"(?:^|[.-]){host}-(\d+)(?:[.-]|$)", name)
    if m is None:
        return None
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        pass
    return True


def is_temp(name: str) -> bool:
    """A name the atomic writer (or the folder swap) uses while it works: ``.X.….tmp``, ``.X.old-…``."""
    return name.startswith(".") and (name.endswith(".tmp") or ".old-" in name)


def sweep_temps(folder: str | os.PathLike, *, all_temps: bool = False) -> int:
    """Remove the atomic writer's leftovers under ``folder`` (walked without following links): with
    ``all_temps`` every one (the caller holds the folder alone, e.g. under a lock), else those whose
    writer on this host is dead, or older than a day. Returns how many were removed."""
    removed, now = 0, time.time()
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in list(dirnames) + filenames:
            if not is_temp(name):
                continue
            entry = Path(dirpath) / name
            try:
                st = os.lstat(entry)
            except OSError:
                continue
            stale = all_temps or _writer_alive(name) is False or now - st.st_mtime > STALE_S
            if not stale:
                continue
            _remove(entry)
            removed += 1
            if name in dirnames:
                dirnames.remove(name)
    if removed:
        log.info("removed %d leftover temp file(s) under %s", removed, folder)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _lstat_mode(path: Path) -> int | None:
    """``path``'s own mode (a symlink is not followed), or None when nothing is there."""
    try:
        return os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as err:
        raise PlannerError(f"{path}: cannot check the output path ({err.strerror or err})") from None


def check_file_target(path: str | os.PathLike) -> Path:
    """``path`` is absent or a regular file (never followed through a symlink); else PlannerError."""
    path = Path(path)
    mode = _lstat_mode(path)
    if mode is None or stat.S_ISREG(mode):
        return path
    if stat.S_ISLNK(mode):
        raise PlannerError(f"{path} is a symbolic link; refusing to replace it (write to a regular file path)")
    if stat.S_ISDIR(mode):
        raise PlannerError(f"{path} is a directory; give a file path")
    raise PlannerError(f"{path} exists and is not a regular file (a device, FIFO or socket); refusing to replace it")


def check_dir_target(path: str | os.PathLike) -> Path:
    """``path`` is absent or a real directory (not a symlink, file or device); else PlannerError."""
    path = Path(path)
    mode = _lstat_mode(path)
    if mode is None or stat.S_ISDIR(mode):
        return path
    if stat.S_ISLNK(mode):
        raise PlannerError(f"{path} is a symbolic link; refusing to replace it")
    raise PlannerError(f"{path} exists and is not a directory; refusing to replace it")


def refused_errno(err: BaseException) -> int | None:
    """The errno of a refused write (:data:`STORAGE_ERRNOS`) behind ``err``: an OSError's own, or the
    ``os error N`` that safetensors' writer (a Rust library) puts in its SafetensorError message."""
    code = err.errno if isinstance(err, OSError) else None
    if code is None and type(err).__name__ == "SafetensorError":
        m = re.search(r"os error (\d+)", str(err))
        code = int(m.group(1)) if m else None
    if code is None and isinstance(err, OSError) and re.fullmatch(r"\d+ requested and \d+ written", str(err)):
        code = errno.ENOSPC  # numpy's tofile (the gguf writer's) on a short write: no errno, the disk is full
    return code if code in STORAGE_ERRNOS else None


@contextmanager
def storage_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn a refused write under ``path`` (:data:`STORAGE_ERRNOS`: full disk, read-only, no
    permission) into one PlannerError line; other errors go on as they are."""
    try:
        yield
    except Exception as err:
        code = refused_errno(err)
        if code is None:
            raise
        raise PlannerError(f"cannot write {path}: {os.strerror(code)}") from None


def check_writable(folder: str | os.PathLike) -> Path:
    """``folder`` (or, while it does not exist, its nearest existing parent) takes a new file: a
    probe file is created and removed there. Nothing else is created; else PlannerError."""
    folder = Path(folder).absolute()
    probe_in = folder
    while not os.path.lexists(probe_in) and probe_in.parent != probe_in:
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise PlannerError(f"{probe_in} exists and is not a directory")
    with storage_errors(folder):
        fd, name = tempfile.mkstemp(dir=probe_in, prefix=".write-probe.", suffix=".tmp")
        os.close(fd)
        os.unlink(name)
    return folder


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _mkdir_parent(path: Path) -> None:
    try:
        with storage_errors(path.parent):
            path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise PlannerError(f"{path.parent} exists and is not a directory") from None


def atomic_write_path(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp_path)`` (it writes a whole file there), fsync it, then rename it over ``path``.

    If ``write`` raises (full disk included), the temp file is removed and ``path`` is untouched.
    """
    path = check_file_target(path)
    _mkdir_parent(path)
    with storage_errors(path):
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_tag()}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with storage_errors(path):
            write(tmp)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o666 & ~_umask())
            check_file_target(path)  # re-check: something may have appeared there meanwhile
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Run ``write(fh)`` on an open temp file beside ``path``, then as :func:`atomic_write_path`."""

    def to_file(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            write(fh)

    return atomic_write_path(path, to_file)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda fh: fh.write(data))


def atomic_save_tensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """A safetensors file (tensors moved to the CPU, made contiguous), written atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write_path(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def atomic_dir(final: str | os.PathLike, build: Callable[[Path], None], *, replace: bool = False) -> Path:
    """Create the folder ``final`` by running ``build(tmp)`` on a temp folder beside it, then renaming.

    ``replace``: an existing real folder at ``final`` is swapped out (see :func:`rename_dir`);
    otherwise an existing folder is kept as it is (a concurrent builder that loses the race discards
    its copy). Symlinks, files and devices at ``final`` are refused.
    """
    final = check_dir_target(final)
    if final.is_dir() and not replace:
        return final
    _mkdir_parent(final)
    with storage_errors(final):
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{_tag()}.", suffix=".tmp", dir=final.parent))
    try:
        with storage_errors(final):
            build(tmp)
            os.chmod(tmp, 0o777 & ~_umask())
        rename_dir(tmp, final, replace=replace)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def rename_dir(src: Path, final: Path, *, replace: bool) -> bool:
    """Rename the finished folder ``src`` to ``final``; False (``src`` left) if ``final`` is a folder
    and not ``replace``. With ``replace`` an existing real folder is renamed aside, the new one
    renamed in, then the old one removed; if the second rename fails the old folder is put back.
    A symlink, file or device at ``final`` is refused before anything moves (never followed)."""
    check_dir_target(final)
    old = final.with_name(f".{final.name}.old-{_tag()}-{secrets.token_hex(4)}")
    with storage_errors(final):
        if replace and final.is_dir():
            os.rename(final, old)
        try:
            os.rename(src, final)
        except OSError:
            if os.path.lexists(old) and not os.path.lexists(final):
                os.rename(old, final)  # put the old folder back: nothing half-done is left
            if not replace and final.is_dir():
                return False  # another builder got there first; keep its folder
            raise
    _fsync_dir(final.parent)
    if os.path.lexists(old):
        _remove(old)
    return True


def _remove(path: Path) -> None:
    """Remove a file, symlink (not its target) or real folder tree; a failure only warns (the new
    output is already in place)."""
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path)
        else:
            path.unlink()
    except OSError as err:
        log.warning("could not remove the replaced %s: %s", path, err)
