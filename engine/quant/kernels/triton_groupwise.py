"""The Triton group-wise dequantization kernel (CUDA): one pass from packed codes to the compute dtype.

Each program decodes a ``BLOCK_R x BLOCK_C`` tile: column ``j`` of a row lives
at bit ``(j mod codes-per-chunk) * bits`` of its chunk's little-endian bytes
(``engine.quant.packing``), so a code is one byte load, or two where a 3-bit
code crosses a byte boundary, a shift and a mask.  The arithmetic is the eager
path's, operation for operation (float32 ``(code - zero) * scale``, rounded
once to the output dtype), so both give the same bits; tests check that under
Triton's interpreter on the CPU (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.quant.packing import chunk_layout

BLOCK_R, BLOCK_C = 16, 128


@triton.jit
def _dequantize_kernel(
    packed_ptr, scales_ptr, zeros_ptr, out_ptr,
    rows, cols, lo, packed_stride, scales_stride, zeros_stride, out_stride,
    BITS: tl.constexpr, PER_CHUNK: tl.constexpr, CHUNK_BYTES: tl.constexpr, GROUP: tl.constexpr,
    SYMMETRIC: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    inside = (r < rows) & (c < cols)
    row = r.to(tl.int64)
    j = lo + c  # the column within the packed row
    bit = (j % PER_CHUNK) * BITS
    byte = (j // PER_CHUNK) * CHUNK_BYTES + bit // 8
    shift = bit % 8
    word = tl.load(packed_ptr + row * packed_stride + byte, mask=inside, other=0).to(tl.int32)
    if CHUNK_BYTES > 1:  # 3 bits: a code may continue in the next byte
        crosses = inside & (shift + BITS > 8)
        high = tl.load(packed_ptr + row * packed_stride + byte + 1, mask=crosses, other=0).to(tl.int32)
        word = word | (high << 8)
    code = (word >> shift) & ((1 << BITS) - 1)
    group = c // GROUP
    scale = tl.load(scales_ptr + row * scales_stride + group, mask=inside, other=0).to(tl.float32)
    if SYMMETRIC:
        zero = float(1 << (BITS - 1))
    else:
        zero = tl.load(zeros_ptr + row * zeros_stride + group, mask=inside, other=0).to(tl.float32)
    value = (code.to(tl.float32) - zero) * scale
    if ROUND_BF16:  # round to nearest even by hand: the interpreter's own float32 -> bfloat16 cast truncates
        raw = value.to(tl.int32, bitcast=True)
        tl.store(out_ptr + row * out_stride + c, ((raw + 0x7FFF + ((raw >> 16) & 1)) >> 16).to(tl.int16), mask=inside)
    else:
        tl.store(out_ptr + row * out_stride + c, value.to(out_ptr.dtype.element_ty), mask=inside)


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def dequantize_groups(
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    lo: int,
    hi: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Same contract as :func:`engine.quant.kernels.eager.dequantize_groups`, in one kernel launch."""
    per_chunk, chunk_bytes = chunk_layout(bits)
    rows, cols = packed.shape[0], hi - lo
    packed, scales = _rows_contiguous(packed), _rows_contiguous(scales)
    out = torch.empty(rows, cols, dtype=dtype, device=packed.device)
    if rows == 0 or cols == 0:
        return out
    if zeros is not None:
        zeros = _rows_contiguous(zeros)
    grid = (triton.cdiv(rows, BLOCK_R), triton.cdiv(cols, BLOCK_C))
    bf16 = dtype == torch.bfloat16
    _dequantize_kernel[grid](
        packed, scales, scales if zeros is None else zeros, out.view(torch.int16) if bf16 else out,
        rows, cols, lo, packed.stride(0), scales.stride(0), 0 if zeros is None else zeros.stride(0), out.stride(0),
        BITS=bits, PER_CHUNK=per_chunk, CHUNK_BYTES=chunk_bytes, GROUP=group_size, SYMMETRIC=zeros is None,
        ROUND_BF16=bf16, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C,
    )
    return out
