"""Where work runs: one default (CUDA when present), one parser, one check of a user's device flag."""
from __future__ import annotations

import torch

from planner.errors import PlannerError


def default_device() -> torch.device:
    """CUDA when this machine has a GPU, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """``name`` as a device, or :func:`default_device` when None / empty."""
    return torch.device(name) if name else default_device()


def check_local_device(name: str | None, flag: str) -> None:
    """A device this machine can run on, or one line naming what is wrong (before any work starts)."""
    if not name:
        return
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise PlannerError(f"{flag} {name!r} is not a device; use cpu or cuda[:N]") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise PlannerError(f"{flag} {name}: no CUDA GPU is available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise PlannerError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise PlannerError(f"{flag} {name!r}: only cpu and cuda are supported")
