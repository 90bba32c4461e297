"""PEFT's ``loftq_init`` on a chosen device: the same function with only its compute device changed.

PEFT picks the compute device itself: up to 0.21 it hard-codes ``"cuda"`` (or xpu), from 0.22 it
calls ``infer_device()``, which on a CPU machine gives ``"cpu"`` anyway. We recompile its source with
that one assignment replaced, in PEFT's own module namespace, so everything else is PEFT's code.
"""
from __future__ import annotations

import inspect
import re
from typing import Callable

import torch

# The single line of loftq_init that sets its compute device, whatever it is set from.
_ASSIGNMENT = re.compile(r"^(?P<indent>[ \t]+)compute_device = .+$", re.MULTILINE)


def peft_loftq_init(device: str = "cpu") -> Callable:
    from peft.utils import loftq_utils

    src = inspect.getsource(loftq_utils.loftq_init)
    found = _ASSIGNMENT.findall(src)
    if len(found) != 1:
        raise RuntimeError(
            f"PEFT's loftq_init sets compute_device {len(found)} times (expected once); "
            "update tests/peft_ref.py")
    src = _ASSIGNMENT.sub(lambda m: f"{m['indent']}compute_device = {device!r}", src)
    namespace = dict(vars(loftq_utils))
    exec(compile(src, inspect.getsourcefile(loftq_utils) or "loftq_utils", "exec"), namespace)
    return torch.no_grad()(namespace["loftq_init"])
