"""Memory budgets: ``11GB`` = 11e9 bytes, ``11GiB`` = 11 * 2**30, plain numbers are bytes, ``auto``
reads the free memory of the current CUDA GPU. Bad input raises a one-line PlannerError."""
from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation

from planner.errors import PlannerError

UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
MAX_BUDGET = 10**15  # 1 PB: far beyond any accelerator's memory, and a plan's byte counts stay exact
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def free_gpu_bytes() -> int:
    """Free memory of the current CUDA device (``torch.cuda.mem_get_info``); PlannerError without one."""
    import torch

    if not torch.cuda.is_available():
        raise PlannerError("--budget auto needs a CUDA GPU and none is visible; give a size such as 11GB")
    free, _total = torch.cuda.mem_get_info()
    return int(free)


def parse_budget(text: str | int | float) -> int:
    """``"11GB"`` -> 11_000_000_000, ``"11GiB"`` -> 11 * 2**30, ``"900MB"``, ``"123"`` (bytes), ``"auto"``.

    Units (case-insensitive): B, KB, MB, GB, TB (powers of 10) and KiB, MiB, GiB, TiB (powers of 2).
    Fractions round down to whole bytes. Zero, negative, non-finite or unreadable budgets raise.
    """
    if isinstance(text, bool):
        raise PlannerError(f"budget must be a size such as 11GB, got {text!r}")
    if isinstance(text, (int, float)):
        if not math.isfinite(text):
            raise PlannerError(f"budget must be a positive size, got {text!r}")
        value, unit = Decimal(str(text)), "b"
    else:
        raw = str(text).strip()
        if raw.lower() == "auto":
            return free_gpu_bytes()
        if raw.startswith("-"):
            raise PlannerError(f"budget must be positive, got {raw!r}")
        m = _PATTERN.match(raw)
        if not m:
            raise PlannerError(f"cannot read budget {raw!r}; use e.g. 11GB (=11e9 bytes), 11GiB, 900MB or a byte count")
        try:
            value, unit = Decimal(m.group(1)), (m.group(2) or "b").lower()
        except InvalidOperation:
            raise PlannerError(f"cannot read budget {raw!r}") from None
        if unit not in UNITS:
            known = ", ".join(u.upper() if u != "b" else "B" for u in UNITS).replace("IB", "iB")
            raise PlannerError(f"unknown unit {m.group(2)!r} in budget {raw!r}; known: {known}")
    if value <= 0:
        raise PlannerError(f"budget must be a positive size, got {text!r}")
    if value.adjusted() > 30 or value * UNITS[unit] > MAX_BUDGET:  # also keeps Decimal and float maths finite
        raise PlannerError(f"budget {text!r} is beyond any machine (the most accepted is 1PB); use e.g. 11GB")
    nbytes = int(value * UNITS[unit])  # exact decimal arithmetic: 2.3GB is 2_300_000_000
    if nbytes <= 0:
        raise PlannerError(f"budget {text!r} is less than one byte")
    return nbytes


def format_bytes(n: int, binary: bool = False) -> str:
    """``11_000_000_000`` -> ``"11.00 GB"`` (``binary=True``: ``"10.24 GiB"``); small values in B/kB/MB."""
    base, names = (1024, ("B", "KiB", "MiB", "GiB", "TiB")) if binary else (1000, ("B", "kB", "MB", "GB", "TB"))
    value, i = float(n), 0
    while abs(value) >= base and i < len(names) - 1:
        value /= base
        i += 1
    return f"{int(value)} B" if i == 0 else f"{value:.2f} {names[i]}"
