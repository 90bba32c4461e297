"""Fingerprints of a model's weight files: what caches, studies and plans are keyed by.

Two versions, both computed from the same files:

- **content** (v3, :func:`content_fingerprint`): sha256 over every byte of every weight, with each
  file's name relative to the model folder: a safetensors file counts by its tensors (the header's
  names, dtypes, shapes and offsets as canonical JSON, without the free-form ``__metadata__``) and
  all of its data; any other file by all of its bytes. Any edit to a weight anywhere changes it: a
  NaN written into the middle of a shard, or a finite change to one tensor. A file's digest is kept in
  a small memo beside the cache (:class:`Memo`), valid while the file's device, inode, size, mtime
  and ctime are unchanged (any write changes ctime, even one that restores mtime), so a command
  reads each file in full once after it changes, not once per command.
- **partial** (v2, :func:`partial_fingerprint`): the safetensors header in full plus the first and
  last MiB of each file's data (whole files up to 2 MiB). What plans before this version recorded
  as ``model.weights_sha256``; still written beside the content fingerprint, so those plans and
  older planners keep reading new plans, and still checked.

A single file (a GGUF to convert) has :func:`file_digest`: its content alone, not its name, so a
renamed copy is the same model.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import BinaryIO, Sequence

from planner.errors import PlannerError

log = logging.getLogger(__name__)

MIB = 1 << 20
MAX_HEADER = 100 * MIB  # safetensors' own limit on the JSON header
READ = 8 * MIB
MEMO_VERSION = 1


class Memo:
    """File digests keyed by the file's resolved path, valid while its stat identity holds.
    ``folder`` None: no memo (every digest reads the file)."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder

    @staticmethod
    def _identity(st: os.stat_result) -> list[int]:
        return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]

    def _path(self, path: Path) -> Path | None:
        if self.folder is None:
            return None
        name = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
        return self.folder / f"{name}.json"

    def get(self, path: Path, st: os.stat_result) -> str | None:
        memo = self._path(path)
        if memo is None or not memo.is_file():
            return None
        try:
            entry = json.loads(memo.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(entry, dict) or entry.get("v") != MEMO_VERSION or entry.get("stat") != self._identity(st):
            return None
        digest = entry.get("sha256")
        return digest if isinstance(digest, str) and len(digest) == 64 else None

    def put(self, path: Path, st: os.stat_result, digest: str) -> None:
        memo = self._path(path)
        if memo is None:
            return
        from planner.files.atomic import atomic_write_bytes

        try:
            atomic_write_bytes(memo, json.dumps({"v": MEMO_VERSION, "path": str(path.resolve()),
                                                 "stat": self._identity(st), "sha256": digest}).encode())
        except PlannerError as err:  # a read-only cache costs a re-read next time, nothing else
            log.info("fingerprint memo not written: %s", err)


def _header(f: BinaryIO, path: Path, size: int) -> dict:
    """The JSON header of an open safetensors file (positioned after it on return)."""
    n = int.from_bytes(f.read(8), "little")
    if size < 8 or n > min(size - 8, MAX_HEADER):
        raise PlannerError(f"{path}: not a valid safetensors file (header length {n} B, file {size} B)")
    try:
        header = json.loads(f.read(n))
    except ValueError:
        raise PlannerError(f"{path}: not a valid safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise PlannerError(f"{path}: not a valid safetensors file (header is not an object)")
    return header


def file_digest(path: Path, memo: Memo | None = None) -> str:
    """sha256 of what ``path`` holds (memoised while the file is unchanged): a safetensors file's
    tensor index and all of its data, any other file's every byte."""
    st = os.stat(path)
    memo = memo or Memo(None)
    cached = memo.get(path, st)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if path.suffix == ".safetensors":
            header = _header(f, path, st.st_size)
            header.pop("__metadata__", None)  # free-form text (a conversion's source name): not a weight
            h.update(b"safetensors\0" + json.dumps(header, sort_keys=True).encode() + b"\0")
        while chunk := f.read(READ):
            h.update(chunk)
    if os.stat(path).st_ctime_ns != st.st_ctime_ns:
        raise PlannerError(f"{path} changed while it was read; run the command again")
    digest = h.hexdigest()
    memo.put(path, st, digest)
    return digest


def content_fingerprint(files: Sequence[Path], root: Path, memo: Memo | None = None) -> str:
    """The v3 fingerprint: each file's name relative to ``root``, size and whole-content digest."""
    digest = hashlib.sha256(b"loftq-planner weights v3\0")
    for path in sorted(files, key=lambda p: str(p.relative_to(root))):
        digest.update(f"{path.relative_to(root)}\0{path.stat().st_size}\0{file_digest(path, memo)}\0".encode())
    return digest.hexdigest()


def partial_fingerprint(files: Sequence[Path], root: Path) -> str:
    """The v2 fingerprint: sha256 over each file's name relative to ``root``, its size, and its
    content: whole when the file is at most 2 MiB, else its first and last MiB; a safetensors header
    (every tensor's name, dtype, shape and offset) is hashed in full as canonical JSON (safetensors
    writes its metadata map in no fixed order)."""
    digest = hashlib.sha256(b"loftq-planner weights v2\0")
    for path in sorted(files, key=lambda p: str(p.relative_to(root))):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(root)}\0{size}\0".encode())
        with open(path, "rb") as f:
            if path.suffix == ".safetensors" and size >= 8:
                digest.update(json.dumps(_header(f, path, size), sort_keys=True).encode())
            start = f.tell()
            if size - start <= 2 * MIB:
                digest.update(f.read())
            else:
                digest.update(f.read(MIB))
                f.seek(size - MIB)
                digest.update(f.read(MIB))
    return digest.hexdigest()
