"""LoftQ maths in pure torch: quantizers, bit packing, the alternating solver, residual tables.

No files, no printing, no device moves: every function runs where its inputs live (CPU or CUDA).
"""
# The version of the numbers this package computes: bump it whenever quantize, dequantize, loftq or
# residual_table return different values for the same input (planner caches are keyed by it).
__version__ = "2"

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
