"""Write a quantized copy of a float GGUF model with gguf-py's reference quantizers.

This makes quantized GGUF files without llama.cpp, for tests and for users who
want one: the metadata and every non-matrix tensor are copied, and each decoder
block matrix (``blk.N.*``, 2-D) is quantized with ``gguf.quants.quantize``.  A matrix
whose rows are not a whole number of blocks (e.g. a 172-wide FFN input with
32-weight blocks) is stored in ``fallback`` (float16 by default), as llama.cpp's
quantizer does.  gguf-py quantizes the legacy types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0)
but not the K-quants.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, Keys
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from engine.errors import EngineError
from engine.quant.adapters.gguf_blocks import ggml_type


def _can_quantize(qtype: GGMLQuantizationType) -> bool:
    block_size = GGML_QUANT_SIZES[qtype][0]
    try:
        gguf_quantize(np.zeros((1, block_size), dtype=np.float32), qtype)
    except NotImplementedError:
        return False
    return True


def quantize_gguf(src: str | Path, dst: str | Path, qtype: str, fallback: str = "F16") -> dict[str, str]:
    """Write ``dst``: ``src`` with its decoder block matrices quantized; returns ``{tensor: type}`` for those."""
    target, spare = ggml_type(qtype), ggml_type(fallback)
    for t in (target, spare):
        if not _can_quantize(t):
            raise EngineError(f"gguf-py cannot quantize to {t.name}; it can write Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, F16, BF16")
    reader = GGUFReader(src)
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp")
    writer = GGUFWriter(tmp, reader.fields[Keys.General.ARCHITECTURE].contents())
    for field in reader.fields.values():
        if field.name == Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        sub_type = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
    chosen: dict[str, str] = {}
    for tensor in reader.tensors:
        if tensor.name.startswith("blk.") and len(tensor.shape) == 2:
            qt = target if int(tensor.shape[0]) % GGML_QUANT_SIZES[target][0] == 0 else spare
            rows = gguf_quantize(gguf_dequantize(tensor.data, tensor.tensor_type), qt)
            writer.add_tensor(tensor.name, rows, raw_dtype=qt)
            chosen[tensor.name] = qt.name
        else:
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return chosen
