"""Quantizers and the packed weights they produce.

Importing this package registers the built-in quantizers and formats.
"""

from engine.quant.base import (
    FORMATS,
    QUANTIZERS,
    LayerStats,
    QuantizedWeight,
    Quantizer,
    all_options,
    make_quantizer,
    methods_taking,
    quantizer_class,
    register_format,
    register_quantizer,
    weight_from_state,
)
# Registration order is the order methods are listed in: the engine's own first, then third-party formats.
from engine.quant.groupwise import GroupQuantizedWeight  # isort: skip
from engine.quant.rtn import RTNQuantizer  # isort: skip
from engine.quant.optq import OPTQQuantizer  # isort: skip
from engine.quant.quip import QuipQuantizer, QuipWeight  # isort: skip
from engine.quant.qtip import QtipQuantizer, TrellisWeight  # isort: skip
from engine.quant.adapters import (
    AWQPackedWeight, BnB4BitWeight, FP4Quantizer, GGUFWeight, GPTQPackedWeight, HQQQuantizer, HQQWeight, NF4Quantizer,
)

__all__ = [
    "FORMATS",
    "QUANTIZERS",
    "AWQPackedWeight",
    "BnB4BitWeight",
    "FP4Quantizer",
    "GGUFWeight",
    "GPTQPackedWeight",
    "GroupQuantizedWeight",
    "HQQQuantizer",
    "HQQWeight",
    "LayerStats",
    "NF4Quantizer",
    "OPTQQuantizer",
    "QtipQuantizer",
    "QuantizedWeight",
    "Quantizer",
    "QuipQuantizer",
    "QuipWeight",
    "RTNQuantizer",
    "TrellisWeight",
    "all_options",
    "make_quantizer",
    "methods_taking",
    "quantizer_class",
    "register_format",
    "register_quantizer",
    "weight_from_state",
]
