"""The one way this project writes anything: a unique temp name beside the target, fsync, rename.

Every output path the CLI or the library writes (plans, Pareto fronts, cache files, artifact files,
whole folders) goes through :func:`atomic_write`, :func:`atomic_save_tensors` or :func:`atomic_dir`:

- the temp name is unique (``mkstemp``/``mkdtemp``), so two writers never share one;
- the data is fsync'ed before the rename, so a crash leaves the old file or the new one, never half;
- the result gets the user's umask (``mkstemp`` alone would leave 0600 / 0700);
- a target that exists and is not a regular file (a device such as ``/dev/null``, a FIFO, a socket,
  a symlink) is refused with a :class:`~planner.errors.PlannerError` before anything is written:
  the process usually runs as root, where a rename would silently replace the system's device node.
"""
from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from planner.errors import PlannerError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_file_target(path: str | os.PathLike) -> Path:
    """``path`` is absent or a regular file (never followed through a symlink); else PlannerError."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path
    except OSError as err:
        raise PlannerError(f"{path}: cannot check the output path ({err.strerror or err})") from None
    if stat.S_ISLNK(st.st_mode):
        raise PlannerError(f"{path} is a symbolic link; refusing to replace it (write to a regular file path)")
    if stat.S_ISDIR(st.st_mode):
        raise PlannerError(f"{path} is a directory; give a file path")
    if not stat.S_ISREG(st.st_mode):
        raise PlannerError(f"{path} exists and is not a regular file (a device, FIFO or socket); refusing to replace it")
    return path


def check_dir_target(path: str | os.PathLike) -> Path:
    """``path`` is absent or a real directory (not a symlink, file or device); else PlannerError."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path
    except OSError as err:
        raise PlannerError(f"{path}: cannot check the output path ({err.strerror or err})") from None
    if stat.S_ISLNK(st.st_mode):
        raise PlannerError(f"{path} is a symbolic link; refusing to replace it")
    if not stat.S_ISDIR(st.st_mode):
        raise PlannerError(f"{path} exists and is not a directory; refusing to replace it")
    return path


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
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise PlannerError(f"{path.parent} exists and is not a directory") from None


def atomic_write_path(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp_path)`` (it writes a whole file there), fsync it, then rename it over ``path``.

    If ``write`` raises (full disk included), the temp file is removed and ``path`` is untouched.
    """
    path = check_file_target(path)
    _mkdir_parent(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
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

    ``replace``: an existing real folder at ``final`` is swapped out (renamed aside, then removed);
    otherwise an existing folder is kept as it is (a concurrent builder that loses the race discards
    its copy). Symlinks, files and devices at ``final`` are refused.
    """
    final = check_dir_target(final)
    if final.is_dir() and not replace:
        return final
    _mkdir_parent(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    try:
        build(tmp)
        os.chmod(tmp, 0o777 & ~_umask())
        check_dir_target(final)
        if replace and final.is_dir():
            os.rename(final, old)
        try:
            os.rename(tmp, final)
        except OSError:
            if replace or not final.is_dir():
                if old.exists() and not final.exists():
                    os.rename(old, final)  # put the old folder back: nothing half-done is left
                raise
        _fsync_dir(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
    return final
