"""Write GGUF files llama.cpp reads, shaped like an existing one, with gguf-py's reference quantizers.

A written file takes a template GGUF's metadata (architecture, hyper-parameters, tokenizer) and tensors; the ones
named in ``replaced`` get new float values, stored in a chosen type.  The tensor table is written first and the
data one tensor at a time in the file's order, so a caller computing the values (a merged decoder block) holds one
block at a time.  A matrix whose rows are not a whole number of the type's blocks (e.g. a 172-wide FFN input with
32-weight blocks) is stored in ``fallback`` (float16 by default), as llama.cpp's quantizer does.  gguf-py quantizes
the legacy types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) and floats, not the K-quants.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import numpy as np
from gguf import (
    GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, Keys, LlamaFileType,
)
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from engine.errors import EngineError
from engine.quant.adapters.gguf_blocks import ggml_type

FloatValues = Callable[[str], np.ndarray]  # a replaced tensor's new values (float32, the template's shape)


def writable_type(name: str) -> GGMLQuantizationType:
    """The GGML type called ``name`` if gguf-py can write it."""
    qtype = ggml_type(name)
    block_size = GGML_QUANT_SIZES[qtype][0]
    try:
        gguf_quantize(np.zeros((1, block_size), dtype=np.float32), qtype)
    except NotImplementedError:
        raise EngineError(f"gguf-py cannot quantize to {qtype.name}; it can write "
                          "F32, F16, BF16, Q8_0, Q5_1, Q5_0, Q4_1, Q4_0") from None
    return qtype


def write_like(
    template: str | Path, dst: str | Path, replaced: Collection[str], values: FloatValues, qtype: str,
    fallback: str = "F16",
) -> dict[str, str]:
    """Write ``dst`` (atomically): ``template`` with each tensor named in ``replaced`` set to ``values(name)`` in
    ``qtype`` (``fallback`` where its rows do not split into ``qtype``'s blocks); returns ``{tensor: type}`` of
    those.  ``values`` is called once per replaced tensor, in the file's order."""
    target, spare = writable_type(qtype), writable_type(fallback)
    reader = GGUFReader(template)
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp")
    writer = GGUFWriter(tmp, reader.fields[Keys.General.ARCHITECTURE].contents())
    for field in reader.fields.values():
        if field.name in (Keys.General.ARCHITECTURE, Keys.General.FILE_TYPE) or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself, or set below
        sub_type = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
    writer.add_file_type(LlamaFileType.ALL_F32 if target == GGMLQuantizationType.F32
                         else LlamaFileType[f"MOSTLY_{target.name}"])
    chosen: dict[str, str] = {}
    for tensor in reader.tensors:
        if tensor.name in replaced:
            rows, row_length = _float_shape(tensor)
            qt = target if row_length % GGML_QUANT_SIZES[target][0] == 0 else spare
            row_bytes = row_length // GGML_QUANT_SIZES[qt][0] * GGML_QUANT_SIZES[qt][1]
            writer.add_tensor_info(tensor.name, (rows, row_bytes), np.dtype(np.uint8), rows * row_bytes, raw_dtype=qt)
            chosen[tensor.name] = qt.name
        else:
            writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, int(tensor.data.nbytes),
                                   raw_dtype=tensor.tensor_type)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in reader.tensors:
            if tensor.name in chosen:
                new = np.ascontiguousarray(values(tensor.name), dtype=np.float32)
                if new.shape != _float_shape(tensor):
                    raise EngineError(f"{template}: {tensor.name} is {_float_shape(tensor)}, "
                                      f"its new values {new.shape}")
                data = gguf_quantize(new, ggml_type(chosen[tensor.name])).view(np.uint8)
            else:
                data = tensor.data
            writer.write_tensor_data(np.ascontiguousarray(data))
        writer.close()
        os.replace(tmp, dst)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return chosen


def _float_shape(tensor: Any) -> tuple[int, int]:
    """A GGUF matrix's shape as a float array, ``(rows, row_length)`` (GGUF lists dimensions innermost first)."""
    return int(tensor.shape[1]), int(tensor.shape[0])


def quantize_gguf(src: str | Path, dst: str | Path, qtype: str, fallback: str = "F16") -> dict[str, str]:
    """Write ``dst``: ``src`` with its decoder block matrices (``blk.N.*``, 2-D) quantized; returns
    ``{tensor: type}`` for those."""
    tensors = {t.name: t for t in GGUFReader(src).tensors if t.name.startswith("blk.") and len(t.shape) == 2}
    return write_like(src, dst, tensors, lambda name: gguf_dequantize(tensors[name].data, tensors[name].tensor_type),
                      qtype, fallback)
