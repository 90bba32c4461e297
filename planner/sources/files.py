"""Weight files of a Hugging Face folder: safetensors only, read one tensor at a time.

Pickle checkpoints (``.bin``, ``.pt``, ...) are refused: unpickling can run arbitrary code.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open

from planner.errors import PlannerError

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MIB = 1 << 20


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding the model's weights (from the shard index when there is one).

    Adapter files (``adapter_model.safetensors``) are not model weights and are skipped.
    """
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as err:
            raise PlannerError(f"{index}: unreadable shard index ({err})") from None
        files = sorted({folder / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise PlannerError(f"{folder}: shard index names missing files: {', '.join(missing[:3])}")
        return files
    files = sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("adapter_"))
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise PlannerError(f"{folder} holds only pickle weights ({', '.join(pickles[:3])}); pickle is refused "
                           "because loading it can run code: convert the model to safetensors")
    raise PlannerError(f"{folder} holds no *.safetensors weight files")


class WeightIndex:
    """Checkpoint key -> safetensors file, read from the shard index or from the file headers."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files = weight_files(folder)
        index = folder / INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.file_of = {key: folder / name for key, name in weight_map.items()}
        else:
            self.file_of = {}
            for path in self.files:
                with safe_open(str(path), framework="pt") as handle:  # parses the header only
                    self.file_of.update((key, path) for key in handle.keys())

    def __contains__(self, key: object) -> bool:
        return key in self.file_of

    def keys(self) -> list[str]:
        return list(self.file_of)

    def read(self, key: str) -> torch.Tensor:
        """One tensor as stored (dtype, layout). The file is opened for this read only: a kept
        memory map would leave every page read so far resident, and peak memory would grow to the
        size of the shard instead of the tensor."""
        with safe_open(str(self.file_of[key]), framework="pt") as handle:
            return handle.get_tensor(key)


def fingerprint(files: Sequence[Path], root: Path) -> str:
    """sha256 over each file's name relative to ``root``, its size, and its content: whole when the
    file is at most 2 MiB, else its first and last MiB. A safetensors header (every tensor's name,
    dtype, shape and offset) is hashed in full as canonical JSON (safetensors writes its metadata
    map in no fixed order, so two writes of the same weights differ in header bytes), then the first
    and last MiB of the data. Cheap on 15 GB checkpoints; a change confined to the middle of a large
    file with the same header goes unnoticed."""
    digest = hashlib.sha256(b"loftq-planner weights v2\0")
    for path in sorted(files, key=lambda p: str(p.relative_to(root))):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(root)}\0{size}\0".encode())
        with open(path, "rb") as f:
            start = 0
            if path.suffix == ".safetensors" and size >= 8:
                n = int.from_bytes(f.read(8), "little")
                try:
                    header = json.loads(f.read(n))
                except ValueError:
                    raise PlannerError(f"{path}: not a valid safetensors file (unreadable header)") from None
                digest.update(json.dumps(header, sort_keys=True).encode())
                start = 8 + n
            f.seek(start)
            if size - start <= 2 * MIB:
                digest.update(f.read())
            else:
                digest.update(f.read(MIB))
                f.seek(size - MIB)
                digest.update(f.read(MIB))
    return digest.hexdigest()
