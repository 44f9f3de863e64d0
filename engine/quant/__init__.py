"""Quantizers and the packed weights they produce.

Importing this package registers the built-in quantizers and formats.
"""

from engine.quant.base import (
    FORMATS,
    QUANTIZERS,
    LayerStats,
    QuantizedWeight,
    Quantizer,
    make_quantizer,
    register_format,
    register_quantizer,
    weight_from_state,
)
from engine.quant.adapters import BnB4BitWeight, FP4Quantizer, GGUFWeight, HQQQuantizer, HQQWeight, NF4Quantizer
from engine.quant.groupwise import GroupQuantizedWeight
from engine.quant.optq import OPTQQuantizer
from engine.quant.quip import QuipQuantizer, QuipWeight
from engine.quant.rtn import RTNQuantizer

__all__ = [
    "FORMATS",
    "QUANTIZERS",
    "BnB4BitWeight",
    "FP4Quantizer",
    "GGUFWeight",
    "GroupQuantizedWeight",
    "HQQQuantizer",
    "HQQWeight",
    "LayerStats",
    "NF4Quantizer",
    "OPTQQuantizer",
    "QuantizedWeight",
    "Quantizer",
    "QuipQuantizer",
    "QuipWeight",
    "RTNQuantizer",
    "make_quantizer",
    "register_format",
    "register_quantizer",
    "weight_from_state",
]
