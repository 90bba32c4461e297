"""LoftQ maths in pure torch: quantizers (NF2/3/4/8, uniform, int8), bit packing, the alternating solver, residual tables;
QuIP#-style Hadamard rotations in :mod:`loftq.hadamard` (imported from there: ``rotate``, ``signs``, ...).

No files, no printing, no device moves: every function runs where its inputs live (CPU or CUDA).
"""
# The version of the numbers this package computes: bump it whenever quantize, dequantize, loftq or
# residual_table return different values for the same input (planner caches are keyed by it).
# 2: a batched residual_table with double_quant quantizes each matrix on its own (1 shared the
# second-level constants across the stack).
# 3: residual_table's spectra by block Krylov in the table dtype (loftq.spectral) instead of a
# randomized eigensolver on an fp32 Gram; loftq(svd="randomized") added (svd="exact" unchanged).
# 4: the q4_0 / iq4_nl GGUF encoders choose block scales under the rms+|w| weighted error (gguf_fit).
# 5: so do the q2_k, q4_k and q6_k encoders (q3_k keeps least squares: measured no better).
__version__ = "7"

from .codebooks import int8_codebook, nf_codebook, uniform_codebook
from .packing import pack, packed_numel, unpack
from .quant import (METHODS, QuantConfig, QuantizedTensor, check_finite, dequantize, expected_nbytes,
                    parse_quant_name, quant_name, quantize, stored_absmax)
from .registry import Registry

__all__ = [
    "METHODS", "QuantConfig", "QuantizedTensor", "Registry", "check_finite", "dequantize",
    "expected_nbytes", "int8_codebook", "nf_codebook", "pack", "packed_numel", "parse_quant_name", "quant_name",
    "quantize",
    "stored_absmax", "uniform_codebook", "unpack",
]
from .gguf_quants import (GGUF_TYPES, GGUFTensor, GGUFType, allowed_types, gguf_nbytes, gguf_quantize,
                          gguf_type)

__all__ += ["GGUF_TYPES", "GGUFTensor", "GGUFType", "allowed_types", "gguf_nbytes", "gguf_quantize", "gguf_type"]
from .solver import DEFAULT_RANKS, LoftQResult, calibration_factor, loftq, residual_table

__all__ += ["DEFAULT_RANKS", "LoftQResult", "calibration_factor", "loftq", "residual_table"]
from .rounding import ROUNDINGS, quantize_feedback

__all__ += ["ROUNDINGS", "quantize_feedback"]
