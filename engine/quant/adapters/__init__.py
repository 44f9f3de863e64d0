"""Third-party quantizers behind the engine's interface, each library used as a black box.

* :mod:`.bnb4bit`: bitsandbytes NF4 / FP4 (``--method nf4|fp4``).
* :mod:`.hqq_quant`: HQQ, half-quadratic quantization (``--method hqq``).
* :mod:`.gguf_blocks`: GGML block formats read from GGUF files (Q4_0 ... Q8_0, Q2_K ... Q6_K).
* :mod:`.gptq_packed`, :mod:`.awq_packed`: the packed tensors of hub GPTQ (2, 3, 4, 8 bits) and AWQ checkpoints.

The libraries are imported lazily, on first quantize or dequantize, so importing
the engine stays fast and a saved model of another format loads without them.
"""

from engine.quant.adapters.awq_packed import AWQPackedWeight
from engine.quant.adapters.bnb4bit import BnB4BitQuantizer, BnB4BitWeight, FP4Quantizer, NF4Quantizer
from engine.quant.adapters.gguf_blocks import GGUFWeight
from engine.quant.adapters.gptq_packed import GPTQPackedWeight
from engine.quant.adapters.hqq_quant import HQQQuantizer, HQQWeight

__all__ = [
    "AWQPackedWeight",
    "BnB4BitQuantizer",
    "BnB4BitWeight",
    "FP4Quantizer",
    "GGUFWeight",
    "GPTQPackedWeight",
    "HQQQuantizer",
    "HQQWeight",
    "NF4Quantizer",
]
