"""The one rule for a command's paths: what it reads is a regular file (or a folder of them), and
nothing it writes may be, contain, or replace anything it reads.

Every command names its inputs and outputs here before any work:

- an **input** file must be a regular file (a symlink to one is followed): a FIFO would block the
  read for ever, a device would feed it without end (:func:`check_input_file`);
- an **output** may not be an input, nor a folder holding one (replacing it, with ``--force`` or
  by an atomic rename, would delete the input), nor lie inside an input folder over something that
  is already there. A *new* file or folder inside an input folder is fine: ``finetune DIR``'s
  default output is ``DIR/finetuned-adapter``. Two outputs of one command may not be one path
  (``--out o/p.json --pareto o/p`` would write the front over the plan);
- an :class:`Input` folder either is wholly the input (a model folder: everything in it), or only
  some of its entries are (a materialized folder: ``plan.json``, ``backbone``, ``adapter``, ``gguf``;
  an earlier ``finetune`` output in it may be replaced).

Paths are compared with their symlinks resolved (an existing path) or their nearest existing parent
resolved (a path to be created), so ``./m`` and ``/abs/m`` and a link to ``m`` are all one path.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from planner.errors import PlannerError


def one_line(err: BaseException, limit: int = 240) -> str:
    """An exception's message as one line (its lines joined), at most ``limit`` characters."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def real(path: str | os.PathLike) -> Path:
    """``path`` absolute with every symlink resolved (a missing tail stays as written)."""
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def contained(path: Path, roots: Sequence[Path]) -> Path:
    """``path`` with its symlinks resolved, when that lies inside one of ``roots``; else PlannerError.

    Every file read from a model folder or an artifact goes through here: a symlink or a shard name
    such as ``../../etc/x`` must not make the planner read (and copy into its outputs) files elsewhere.
    """
    resolved = real(path)
    for root in roots:
        top = real(root)
        if resolved == top or resolved.is_relative_to(top):
            return resolved
    raise PlannerError(f"{path} points outside {roots[0]} (to {resolved}); refusing to read it")


def check_links(folder: Path, roots: Sequence[Path] | None = None) -> None:
    """Every symlink under ``folder`` (walked without following links) resolves inside ``roots``
    (default: ``folder`` itself); else PlannerError naming the first that does not."""
    roots = roots or (folder,)
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in sorted(dirnames + filenames):
            entry = Path(dirpath) / name
            if entry.is_symlink():
                contained(entry, roots)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def input_problem(path: str | os.PathLike) -> str | None:
    """None when ``path`` is an existing regular file (symlinks followed); else ``"missing"`` or what
    it is instead (``"a FIFO"``, ``"a directory"``, ...)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "missing"
    except OSError as err:
        return f"unreadable ({err.strerror or err})"
    return None if stat.S_ISREG(mode) else _kind(mode)


def check_input_file(path: str | os.PathLike, what: str = "input") -> Path:
    """``path`` is an existing regular file (symlinks followed); else one PlannerError line naming
    what it is. Reading a FIFO blocks for ever and a device never ends, so neither is opened."""
    path = Path(path)
    problem = input_problem(path)
    if problem == "missing":
        raise PlannerError(f"{what} {path} does not exist")
    if problem is not None:
        raise PlannerError(f"{what} {path} is {problem}; give a regular file")
    return path


def check_input_dir(path: str | os.PathLike, what: str = "input folder") -> Path:
    """``path`` is an existing folder (symlinks followed); else one PlannerError line."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise PlannerError(f"{what} {path} does not exist") from None
    except OSError as err:
        raise PlannerError(f"{what} {path}: cannot read it ({err.strerror or err})") from None
    if not stat.S_ISDIR(mode):
        raise PlannerError(f"{what} {path} is {_kind(mode)}, not a folder")
    return path


@dataclass(frozen=True)
class Input:
    """Something a command reads. ``members`` None: the path itself and everything inside it; else
    only those entries of the folder (names relative to it) are the input."""

    path: Path
    what: str
    members: tuple[str, ...] | None = None

    def parts(self) -> list[Path]:
        """The resolved paths an output must leave alone."""
        top = real(self.path)
        return [top] if self.members is None else [real(top / m) for m in self.members]


@dataclass(frozen=True)
class Output:
    """Something a command writes: ``flag`` names it in messages (``--out``)."""

    path: Path
    flag: str


def check_outputs(outputs: Iterable[Output], inputs: Iterable[Input]) -> None:
    """The rule of this module for one command: PlannerError naming the first output that is, holds
    or would replace an input, or that another output of the command also names."""
    outputs = [o for o in outputs if o.path is not None]
    inputs = [i for i in inputs if i.path is not None]
    seen: dict[Path, str] = {}
    for out in outputs:
        target = real(out.path)
        if target in seen:
            raise PlannerError(f"{out.flag} {out.path} is also {seen[target]}: give them different paths")
        seen[target] = f"{out.flag}"
        for inp in inputs:
            for part in inp.parts():
                if target == part and inp.members is None:
                    raise PlannerError(f"{out.flag} {out.path} is the {inp.what} ({inp.path}); writing it would "
                                       f"destroy the input: give another path")
                if target == part:
                    raise PlannerError(f"{out.flag} {out.path} is part of the {inp.what} ({inp.path}); writing it "
                                       f"would destroy the input: give another path")
                if part.is_relative_to(target):
                    raise PlannerError(f"{out.flag} {out.path} holds the {inp.what} ({inp.path}); replacing it would "
                                       f"destroy the input: give another path")
                if target.is_relative_to(part) and os.path.lexists(target):
                    raise PlannerError(f"{out.flag} {out.path} is part of the {inp.what} ({inp.path}); writing it "
                                       f"would change the input: give a new path")
