"""PEFT's ``loftq_init`` on the CPU: the same function with only its compute device changed.

PEFT hard-codes ``"cuda"`` (or xpu) as the compute device. We recompile its source with that one
assignment replaced, in PEFT's own module namespace, so everything else is PEFT's code.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch


def peft_loftq_init(device: str = "cpu") -> Callable:
    from peft.utils import loftq_utils

    src = inspect.getsource(loftq_utils.loftq_init)
    needle = 'compute_device = "xpu" if is_xpu_available() else "cuda"'
    if needle not in src:
        raise RuntimeError("PEFT's loftq_init changed; update tests/peft_ref.py")
    src = src.replace(needle, f"compute_device = {device!r}")
    namespace = dict(vars(loftq_utils))
    exec(compile(src, inspect.getsourcefile(loftq_utils) or "loftq_utils", "exec"), namespace)
    return torch.no_grad()(namespace["loftq_init"])
