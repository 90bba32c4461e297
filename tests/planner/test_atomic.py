"""The one atomic writer: refuses non-regular targets, leaves nothing half-written on a refused
write (full disk, read-only folder), gives the user's umask modes, swaps folders without leftovers."""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
import torch

from planner.files.atomic import (atomic_dir, atomic_write_bytes, check_writable, rename_dir)
from planner.errors import PlannerError
from tests.faults import disk_full_on_fsync, refuse_writes


@pytest.fixture()
def umask():
    """Set the process umask for one test, restore it afterwards."""
    saved = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(saved)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _char_device(path: Path) -> Path:
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # the numbers of /dev/null, in tmp_path
    except PermissionError:
        pytest.skip("creating a device node needs root")
    return path


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _plan():
    """A real plan (one phi-2 layer, from the shipped facts; no weights read)."""
    from planner.settings import LayerChoice, RunSettings
    from planner.sources import resolve
    from planner.build.manual import plan_from_choices

    source = resolve("phi-2", allow_download=False)
    name = source.targets()[0].name
    model = {"id": "phi-2", "source": "facts", "architecture": "phi", "weights_sha256": "0" * 64}
    return plan_from_choices(source, {name: LayerChoice(4, 8)}, RunSettings(device="cuda"), model=model)


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750),
                                                       (0o002, 0o664, 0o775)])
def test_plans_cache_files_and_folders_get_the_users_umask(tmp_path: Path, umask, mask: int, file_mode: int,
                                                           dir_mode: int) -> None:
    """Not the 0600 / 0700 that mkstemp / mkdtemp create."""
    from planner.artifact.plan import save_plan
    from planner.files.cache import save_cached

    umask(mask)
    assert _mode(atomic_write_bytes(tmp_path / "a.bin", b"x")) == file_mode
    assert _mode(save_plan(_plan(), tmp_path / "plan.json")) == file_mode
    save_cached(tmp_path / "cache" / "t.safetensors", "k", {"t": torch.zeros(2)})
    assert _mode(tmp_path / "cache" / "t.safetensors") == file_mode
    folder = atomic_dir(tmp_path / "d", lambda tmp: (tmp / "f").write_bytes(b"y"))
    assert _mode(folder) == dir_mode and _mode(folder / "f") == file_mode


@pytest.mark.parametrize("kind", ["fifo", "device", "symlink", "directory"])
def test_non_regular_targets_are_refused_untouched(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "out"
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "device":
        _char_device(target)
    elif kind == "symlink":
        target.symlink_to(victim)
    else:
        target.mkdir()
    before = os.lstat(target)
    with pytest.raises(PlannerError, match="symbolic link|not a regular file|is a directory"):
        atomic_write_bytes(target, b"new")
    after = os.lstat(target)
    assert (after.st_mode, after.st_ino, after.st_rdev) == (before.st_mode, before.st_ino, before.st_rdev)
    assert victim.read_text() == "keep" and _leftovers(tmp_path) == []


def test_full_disk_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "plan.json"
    target.write_bytes(b"old")
    failed = disk_full_on_fsync(monkeypatch)
    with pytest.raises(PlannerError, match="No space left on device") as err:
        atomic_write_bytes(target, b"new" * 1000)
    assert str(target) in str(err.value) and failed  # the fault did fire, at fsync of the temp file
    assert target.read_bytes() == b"old" and _leftovers(tmp_path) == []


def test_read_only_folder_is_one_line_and_nothing_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ro").mkdir()  # the mount point exists; nothing under it can be created
    refuse_writes(monkeypatch, tmp_path / "ro")
    with pytest.raises(PlannerError, match="Read-only file system"):
        atomic_write_bytes(tmp_path / "ro" / "sub" / "f.bin", b"x")
    with pytest.raises(PlannerError, match="Read-only file system"):
        atomic_dir(tmp_path / "ro" / "d", lambda tmp: None)
    with pytest.raises(PlannerError, match="Read-only file system"):
        check_writable(tmp_path / "ro" / "not-yet")
    assert [p.name for p in tmp_path.rglob("*")] == ["ro"]


def test_other_os_errors_keep_their_traceback(tmp_path: Path) -> None:
    """Only what the user can fix (space, permissions, read-only) becomes one line; EIO or a bug is not."""
    def write(fh) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    from planner.files.atomic import atomic_write

    with pytest.raises(OSError) as err:
        atomic_write(tmp_path / "f", write)
    assert not isinstance(err.value, PlannerError) and list(tmp_path.iterdir()) == []


def test_check_writable_creates_nothing(tmp_path: Path) -> None:
    assert check_writable(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(PlannerError, match="not a directory"):
        check_writable(tmp_path / "file" / "sub")


def test_replacing_a_folder_leaves_no_old_copy(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    atomic_dir(final, lambda tmp: (tmp / "new.txt").write_text("new"), replace=True)
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"] and _leftovers(tmp_path) == []
    src = tmp_path / "src"
    src.mkdir()
    (src / "newer.txt").write_text("newer")
    assert rename_dir(src, final, replace=True)
    assert sorted(p.name for p in final.iterdir()) == ["newer.txt"] and _leftovers(tmp_path) == []


def test_a_symlinked_folder_is_never_replaced_or_followed(tmp_path: Path) -> None:
    """The old materialize swap renamed the link aside, then failed to rmtree it: .out.old-PID stayed."""
    real = tmp_path / "real"
    real.mkdir()
    (real / "mine.txt").write_text("keep")
    link = tmp_path / "out"
    link.symlink_to(real, target_is_directory=True)
    src = tmp_path / "src"
    src.mkdir()
    with pytest.raises(PlannerError, match="symbolic link"):
        rename_dir(src, link, replace=True)
    with pytest.raises(PlannerError, match="symbolic link"):
        atomic_dir(link, lambda tmp: None, replace=True)
    assert link.is_symlink() and (real / "mine.txt").read_text() == "keep" and src.is_dir()
    assert _leftovers(tmp_path) == []
