"""Weight files of a Hugging Face folder: safetensors only, read one tensor at a time.

Pickle checkpoints (``.bin``, ``.pt``, ...) are refused: unpickling can run arbitrary code. The
files named here are the only ones the planner reads weights from: streamed layers, the full model
(:meth:`WeightIndex.lazy_state`) and the fingerprint all cover the same set. Every file must lie
inside the model folder once symlinks are resolved (a hub snapshot's links into its own ``blobs/``
excepted), and every header is checked when the index is built, so a truncated or corrupt file is
one line before any work starts.
"""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from loftq.quant import count_nonfinite

from planner.files.paths import check_input_file, contained
from planner.files.tensors import open_safetensors
from planner.errors import PlannerError

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def folder_roots(folder: Path) -> tuple[Path, ...]:
    """Where the files of a model folder may live: the folder, and for a Hugging Face hub snapshot
    (``models--org--name/snapshots/REV``) the repository's ``blobs/`` its links point into."""
    if folder.parent.name == "snapshots":
        return folder, folder.parent.parent / "blobs"
    return (folder,)


def _weight_map(folder: Path) -> dict[str, str]:
    index = folder / INDEX_NAME
    try:
        weight_map = json.loads(contained(index, folder_roots(folder)).read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise PlannerError(f"{index}: unreadable shard index ({type(err).__name__}: {err})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) and isinstance(k, str)
                                                   for k, v in weight_map.items()):
        raise PlannerError(f"{index}: weight_map must map tensor names to file names")
    for name in sorted(set(weight_map.values())):
        if Path(name).is_absolute() or ".." in Path(name).parts or not name.endswith(".safetensors"):
            raise PlannerError(f"{index}: shard {name!r} is not a .safetensors file inside {folder}; refusing it")
    return weight_map


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding the model's weights (from the shard index when there is one).

    Adapter files (``adapter_model.safetensors``) are not model weights and are skipped.
    """
    roots = folder_roots(folder)
    if (folder / INDEX_NAME).is_file():
        files = sorted({folder / name for name in _weight_map(folder).values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise PlannerError(f"{folder}: shard index names missing files: {', '.join(missing[:3])}")
    else:
        files = sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("adapter_"))
    for path in files:
        contained(path, roots)
        check_input_file(path, "weight file")  # a FIFO or device named *.safetensors is never opened
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise PlannerError(f"{folder} holds only pickle weights ({', '.join(pickles[:3])}); pickle is refused "
                           "because loading it can run code: convert the model to safetensors")
    raise PlannerError(f"{folder} holds no *.safetensors weight files")


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """PlannerError naming the tensor when it holds NaN or Inf (a corrupt checkpoint)."""
    bad = count_nonfinite(tensor)
    if bad:
        raise PlannerError(f"{name}: the weight has {bad} non-finite value(s) (NaN or Inf); "
                           "the checkpoint is corrupt")


class WeightIndex:
    """Checkpoint key -> safetensors file. Every file's header is parsed here (truncated or corrupt
    files fail now, in one line); with a shard index, each named tensor must be in its file."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files = weight_files(folder)
        self.file_of: dict[str, Path] = {}
        for path in self.files:
            with open_safetensors(path) as handle:  # parses the header only
                self.file_of.update((key, path) for key in handle.keys())
        if (folder / INDEX_NAME).is_file():
            weight_map = {key: folder / name for key, name in _weight_map(folder).items()}
            wrong = [key for key, path in weight_map.items() if self.file_of.get(key) != path]
            if wrong:
                raise PlannerError(f"{folder / INDEX_NAME}: {wrong[0]} is not in {weight_map[wrong[0]].name}")
            self.file_of = weight_map

    def __contains__(self, key: object) -> bool:
        return key in self.file_of

    def keys(self) -> list[str]:
        return list(self.file_of)

    def read(self, key: str) -> torch.Tensor:
        """One tensor as stored (dtype, layout); non-finite values raise PlannerError naming it.
        The file is opened for this read only: a kept memory map would leave every page read so far
        resident, and peak memory would grow to the size of the shard instead of the tensor."""
        with open_safetensors(self.file_of[key]) as handle:
            tensor = handle.get_tensor(key)
        check_finite(key, tensor)
        return tensor

    @contextlib.contextmanager
    def lazy_state(self) -> Iterator[dict[str, Any]]:
        """key -> lazy safetensors slice of every indexed tensor (the files stay open, memory-mapped,
        until the block ends): what transformers' loader reads from, without reading it twice."""
        with contextlib.ExitStack() as stack:
            handles = {path: stack.enter_context(open_safetensors(path)) for path in self.files}
            yield {key: handles[path].get_slice(key) for key, path in self.file_of.items()}
