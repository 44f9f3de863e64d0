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
from engine.quant.groupwise import GroupQuantizedWeight
from engine.quant.rtn import RTNQuantizer

__all__ = [
    "FORMATS",
    "QUANTIZERS",
    "GroupQuantizedWeight",
    "LayerStats",
    "QuantizedWeight",
    "Quantizer",
    "RTNQuantizer",
    "make_quantizer",
    "register_format",
    "register_quantizer",
    "weight_from_state",
]
