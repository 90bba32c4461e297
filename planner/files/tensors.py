"""Reading safetensors files the user may have altered: every failure is one PlannerError line."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open

from planner.errors import PlannerError
from planner.files.paths import check_input_file, one_line


@contextlib.contextmanager
def open_safetensors(path: Path, device: str = "cpu") -> Iterator[Any]:
    """``safe_open`` whose failures (missing, not a regular file, truncated or corrupt header or
    data) are one PlannerError line."""
    check_input_file(path, "safetensors file")
    try:
        handle = safe_open(str(path), framework="pt", device=device)
    except (SafetensorError, OSError) as err:
        raise PlannerError(f"{path}: not a readable safetensors file ({one_line(err)})") from None
    with handle:
        try:
            yield handle
        except SafetensorError as err:
            raise PlannerError(f"{path}: corrupt safetensors data ({one_line(err)})") from None


def load_tensors(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (see :func:`open_safetensors` for the errors)."""
    with open_safetensors(path, device) as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}
