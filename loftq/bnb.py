"""Our NF4 codes as bitsandbytes sees them: a ``QuantState`` over the same packed bytes (no copy).

Used by the runtime (bnb's dequantize kernel on CUDA) and by the stock-transformers export, so the
mapping lives below both. bitsandbytes is imported only when a state is built.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .codebooks import DQ_BLOCK, nf_codebook, uniform_codebook

if TYPE_CHECKING:
    from .quant import QuantizedTensor


def bnb_quant_state(qt: "QuantizedTensor", dtype: torch.dtype):
    """A bitsandbytes ``QuantState`` describing our NF4 codes (double-quantized constants included)."""
    from bitsandbytes.functional import QuantState

    dev = qt.packed.device
    kwargs = dict(shape=torch.Size(qt.shape), code=nf_codebook(4).to(dev), blocksize=qt.block,
                  quant_type="nf4", dtype=dtype)
    if qt.absmax is not None:
        return QuantState(absmax=qt.absmax, **kwargs)
    state2 = QuantState(absmax=qt.absmax_scale, code=uniform_codebook(8).to(dev), blocksize=DQ_BLOCK,
                        dtype=torch.float32)
    return QuantState(absmax=qt.absmax_codes, offset=qt.absmax_offset, state2=state2, **kwargs)
