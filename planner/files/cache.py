"""On-disk cache of computed arrays (residual tables, sensitivities): safetensors + a JSON key.

A key hashes the inputs (weights, settings) *and* the versions of the code that produced the
numbers: the producer's own version string (``residual-tables/1``, ``fisher-errors/1``, bumped when
that module's output changes) and ``loftq.__version__`` (bumped when a quantizer's numbers change),
so a changed quantizer or scorer never reuses stale arrays. A file is trusted only if it parses,
its stored key equals the requested key and every tensor is finite; anything else is treated as
corrupt, logged and recomputed. Writes go to a temp file in the same folder and are renamed into
place.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open

log = logging.getLogger(__name__)



def default_cache_dir() -> Path:
    return Path(os.environ.get("LOFTQ_PLANNER_CACHE", Path.home() / ".cache" / "loftq-planner"))


def code_version(producer: str) -> dict[str, str]:
    """The code versions a cached result depends on: its producer's and loftq's."""
    import loftq

    if not isinstance(producer, str) or not producer:
        raise ValueError(f"producer must be a non-empty version string, got {producer!r}")
    return {"producer": producer, "loftq": loftq.__version__}


def cache_key(producer: str, payload: dict[str, Any]) -> str:
    """Hash of ``payload`` (the inputs) and :func:`code_version` of ``producer``."""
    blob = json.dumps({"code": code_version(producer), **payload}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def load_cached(path: Path, key: str, check: Callable[[dict[str, torch.Tensor]], str | None] | None = None
                ) -> dict[str, torch.Tensor] | None:
    """Tensors stored under ``key`` at ``path``, or None when missing or corrupt. ``check(tensors)``:
    why the values are out of their valid range (a Fisher error below 0, ...), or None when they are
    fine; values it rejects are recomputed like a corrupt file."""
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key:
                log.warning("cache %s was written for other settings; recomputing", path)
                return None
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # truncated, garbage, wrong format: all mean "recompute"
        log.warning("cache %s is corrupt (%s); recomputing", path, err)
        return None
    if not all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point()):
        log.warning("cache %s holds non-finite numbers; recomputing", path)
        return None
    problem = check(tensors) if check is not None else None
    if problem is not None:
        log.warning("cache %s holds values out of range (%s); recomputing", path, problem)
        return None
    return tensors


def non_negative(*names: str) -> Callable[[dict[str, torch.Tensor]], str | None]:
    """A ``check`` for :func:`load_cached`: the named tensors are present and have no negative or NaN entry."""
    def check(tensors: dict[str, torch.Tensor]) -> str | None:
        for name in names:
            if name not in tensors:
                return f"no {name}"
            if not bool((tensors[name] >= 0).all()):
                return f"{name} has negative or NaN entries"
        return None

    return check


def save_cached(path: Path, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> None:
    from planner.files.atomic import atomic_save_tensors

    atomic_save_tensors(path, tensors, {"key": key, **(meta or {})})
