"""Every output path, the study storage and the cache folder are checked before any heavy work:
one line on stderr, exit status 2, nothing written. Devices and FIFOs are made inside tmp_path
(never the real /dev/null); read-only folders and full disks are injected faults (we run as root)."""
from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest

from planner.cli.app import main
from tests.faults import refuse_writes


@pytest.fixture()
def no_heavy_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Planning, materializing or training past the preflight fails the test with a traceback."""
    def heavy(*args, **kwargs):
        raise AssertionError("heavy work started before the bad input was refused")

    import planner.build.materialize as mat
    import planner.cli.build_cmd as build
    import planner.search.flow as pipeline

    monkeypatch.setattr(pipeline, "make_plan", heavy)
    monkeypatch.setattr(mat, "load_plan", heavy)
    monkeypatch.setattr(build, "run_finetune", heavy)


def _one_line_exit_2(capsys: pytest.CaptureFixture, argv: list[str], *needles: str) -> str:
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and err.count("\n") == 1 and err.startswith("error: "), (rc, err)
    assert "Traceback" not in err and all(n in err for n in needles), err
    return err


def _make(kind: str, path: Path) -> Path:
    """A non-regular thing at ``path``: fifo, char device (root), symlink to a file, dir, symlink to a dir."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        try:
            os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        except PermissionError:
            pytest.skip("creating a device node needs root")
    elif kind == "symlink":
        victim = path.with_name(path.name + ".victim")
        victim.write_text("keep")
        path.symlink_to(victim)
    elif kind == "dir":
        path.mkdir()
    elif kind == "dirlink":
        real = path.with_name(path.name + ".real")
        real.mkdir()
        (real / "mine.txt").write_text("keep")
        path.symlink_to(real, target_is_directory=True)
    elif kind == "file":
        path.write_text("keep")
    return path


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (os.lstat(p).st_mode, os.lstat(p).st_ino) for p in folder.rglob("*")}


def _plan_argv(tmp_path: Path, *extra: str) -> list[str]:
    return ["--model", "phi-2", "--budget", "11GB", "--cache-dir", str(tmp_path / "cache"), *extra]


# ---------------------------------------------------------------- plan --out, --pareto
@pytest.mark.parametrize("kind, needle", [("fifo", "not a regular file"), ("device", "not a regular file"),
                                          ("symlink", "symbolic link"), ("dir", "is a directory")])
def test_plan_out_that_is_not_a_regular_file(tmp_path: Path, capsys, no_heavy_work, kind: str, needle: str) -> None:
    out = _make(kind, tmp_path / "plan.json")
    before = _snapshot(tmp_path)
    _one_line_exit_2(capsys, _plan_argv(tmp_path, "--out", str(out)), str(out), needle)
    assert _snapshot(tmp_path) == before  # the node is untouched and nothing else was written


@pytest.mark.parametrize("suffix, kind", [(".json", "fifo"), (".png", "device"), (".png", "symlink"),
                                          (".json", "dir")])
def test_pareto_paths_are_checked_too(tmp_path: Path, capsys, no_heavy_work, suffix: str, kind: str) -> None:
    stem = tmp_path / "front"
    _make(kind, Path(f"{stem}{suffix}"))
    before = _snapshot(tmp_path)
    _one_line_exit_2(capsys, _plan_argv(tmp_path, "--out", str(tmp_path / "p.json"), "--pareto", str(stem)),
                     f"front{suffix}")
    assert _snapshot(tmp_path) == before


def test_plan_out_in_a_read_only_folder(tmp_path: Path, capsys, monkeypatch, no_heavy_work) -> None:
    (tmp_path / "ro").mkdir()
    refuse_writes(monkeypatch, tmp_path / "ro")
    _one_line_exit_2(capsys, _plan_argv(tmp_path, "--out", str(tmp_path / "ro" / "plan.json")),
                     "Read-only file system")
    assert list((tmp_path / "ro").iterdir()) == []


# ---------------------------------------------------------------- storage, cache
@pytest.mark.parametrize("url, needle", [
    ("not a url", "not a database URL"),
    ("nosuchdb://host/x", "cannot use it"),
    ("sqlite:////nonexistent-dir/sub/studies.db", "cannot connect"),
    ("postgresql://planner:s3cret@127.0.0.1:1/studies", "cannot"),  # nothing listens (or no driver)
])
def test_bad_storage_is_refused_before_any_table_is_computed(tmp_path: Path, capsys, no_heavy_work, url: str,
                                                             needle: str) -> None:
    err = _one_line_exit_2(capsys, _plan_argv(tmp_path, "--out", str(tmp_path / "p.json"), "--storage", url),
                           needle)
    assert "s3cret" not in err  # a password in the URL is not echoed
    assert not (tmp_path / "p.json").exists()


def test_read_only_cache_dir(tmp_path: Path, capsys, monkeypatch, no_heavy_work) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    refuse_writes(monkeypatch, cache)
    _one_line_exit_2(capsys, _plan_argv(tmp_path, "--out", str(tmp_path / "p.json")), "cache folder",
                     "Read-only file system")
    assert list(cache.iterdir()) == [] and not (tmp_path / "p.json").exists()


def test_cache_dir_that_is_a_file(tmp_path: Path, capsys, no_heavy_work) -> None:
    (tmp_path / "cache").write_text("x")
    _one_line_exit_2(capsys, _plan_argv(tmp_path, "--out", str(tmp_path / "p.json")), "not a directory")


def test_good_paths_pass_the_preflight(tmp_path: Path, capsys, no_heavy_work) -> None:
    """The same command with usable paths reaches the heavy work (here: the trap)."""
    with pytest.raises(AssertionError, match="heavy work"):
        main(_plan_argv(tmp_path, "--out", str(tmp_path / "new" / "p.json"), "--pareto", str(tmp_path / "f"),
                        "--storage", f"sqlite:///{tmp_path / 's.db'}"))
    assert not (tmp_path / "new").exists()  # the check created nothing


# ---------------------------------------------------------------- materialize --out, finetune --out
@pytest.mark.parametrize("kind, force", [("fifo", False), ("device", True), ("symlink", True), ("file", True),
                                         ("dirlink", True), ("dirlink", False)])
def test_materialize_out_that_is_not_a_real_folder(tmp_path: Path, capsys, no_heavy_work, kind: str,
                                                   force: bool) -> None:
    """Even with --force: a symlinked folder is not followed, and no .out.old-PID is left behind."""
    out = _make(kind, tmp_path / "out")
    before = _snapshot(tmp_path)
    argv = ["materialize", str(tmp_path / "plan.json"), "--out", str(out)] + (["--force"] if force else [])
    _one_line_exit_2(capsys, argv, str(out))
    assert _snapshot(tmp_path) == before  # no out.partial, no .out.old-PID, the node untouched


def test_materialize_into_a_read_only_folder(tmp_path: Path, capsys, monkeypatch, no_heavy_work) -> None:
    (tmp_path / "ro").mkdir()
    refuse_writes(monkeypatch, tmp_path / "ro")
    _one_line_exit_2(capsys, ["materialize", str(tmp_path / "plan.json"), "--out", str(tmp_path / "ro" / "m")],
                     "Read-only file system")
    assert list((tmp_path / "ro").iterdir()) == []


@pytest.mark.parametrize("kind", ["fifo", "device", "symlink", "dirlink", "file"])
def test_finetune_out_that_is_not_a_real_folder(tmp_path: Path, capsys, no_heavy_work, kind: str) -> None:
    out = _make(kind, tmp_path / "ft")
    before = _snapshot(tmp_path)
    _one_line_exit_2(capsys, ["finetune", str(tmp_path), "--out", str(out), "--force"], str(out))
    assert _snapshot(tmp_path) == before


def test_finetune_out_in_a_full_or_read_only_folder(tmp_path: Path, capsys, monkeypatch, no_heavy_work) -> None:
    (tmp_path / "full").mkdir()
    refuse_writes(monkeypatch, tmp_path / "full", errno.ENOSPC)
    _one_line_exit_2(capsys, ["finetune", str(tmp_path), "--out", str(tmp_path / "full" / "ft")],
                     "No space left on device")


# ---------------------------------------------------------------- a full disk while materializing
def test_a_full_disk_while_materializing_is_one_line_and_the_next_run_resumes(tmp_path: Path, capsys,
                                                                              monkeypatch) -> None:
    """ENOSPC at the 4th layer file: exit 2, no DIR, no temp file; the 3 committed layers are kept in
    DIR.partial and the next run (space freed) computes only the rest."""
    from planner import progress
    from planner.build.materialize import partial_dir
    from planner.artifact.plan import save_plan
    from planner.settings import LayerChoice, RunSettings
    from planner.sources import resolve
    from planner.build.manual import plan_from_choices
    from tests.tiny_models import save_tiny_checkpoint

    monkeypatch.setattr(progress, "_enabled", False)
    source = resolve(str(save_tiny_checkpoint("llama", tmp_path / "ckpt")))
    choices = {t.name: LayerChoice(4, 8 if i % 2 else 0) for i, t in enumerate(source.targets())}
    plan = save_plan(plan_from_choices(source, choices, RunSettings(device="cpu", seq_len=32)), tmp_path / "p.json")
    out, writes, real_fsync = tmp_path / "out", [], os.fsync

    def fsync_after(fd: int) -> None:  # the disk fills after the 3rd layer is committed
        path = os.readlink(f"/proc/self/fd/{fd}")
        if "/work/" in path:
            writes.append(path)
            if len(writes) > 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_after)
    err = _one_line_exit_2(capsys, ["materialize", str(plan), "--out", str(out), "--device", "cpu"],
                           "No space left on device")
    assert "work" in err and not out.exists()
    work = partial_dir(out) / "work"
    assert len([p for p in work.iterdir() if not p.name.startswith(".")]) == 3
    assert [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")] == []
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert main(["materialize", str(plan), "--out", str(out), "--device", "cpu", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["resumed"] == 3 and summary["computed"] == len(choices) - 3
    assert not partial_dir(out).exists()
