"""The eager (reference) group-wise dequantization: ``scale * (code - zero)`` for whole groups of packed codes.

Whole-tensor torch operations, so it runs on any device; it is the CPU path and
the reference the Triton kernel is tested against.  ``torch.compile`` of it was
measured here: on one large tile it is several times faster, but compiling
takes 8-40 s per variant on this CPU and its dynamic-shape code was slower per
layer than eager in a real forward pass (see docs/offload.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.quant.packing import unpack_columns

BLOCK_NUMEL = 1 << 22  # ModuLoRA's default dequantization tile: training never splits further


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
    """``scale * (code - zero)`` for codes ``[lo, hi)`` of ``packed`` rows: whole groups, ``lo`` on a group start.

    ``scales`` and ``zeros`` (``None``: symmetric, zero at ``2**(bits-1)``) are
    ``[rows, n_groups]`` for exactly those groups; a ragged last group is padded.
    The arithmetic is float32 whatever ``dtype``: codes, zero points and float16
    scales make ``scale * (code - zero)`` exact there, so a lower-precision result
    is that value rounded once (and float32 arithmetic is the fast path on CPU).
    A lower-precision result of more than ``BLOCK_NUMEL`` weights is made a block of
    rows at a time, so the float32 intermediate stays one block's size.
    """
    rows, n_groups = scales.shape
    step = max(1, BLOCK_NUMEL // (n_groups * group_size))
    if dtype == torch.float32 or rows <= step:
        return _dequantize_float32(packed, scales, zeros, bits, group_size, lo, hi).to(dtype)
    out = torch.empty(rows, hi - lo, dtype=dtype, device=packed.device)
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        block_zeros = None if zeros is None else zeros[r0:r1]
        out[r0:r1] = _dequantize_float32(packed[r0:r1], scales[r0:r1], block_zeros, bits, group_size, lo, hi)
    return out


def _dequantize_float32(
    packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group_size: int, lo: int, hi: int
) -> torch.Tensor:
    n_groups = scales.shape[1]
    codes = unpack_columns(packed, bits, lo, hi).to(torch.float32)
    if hi - lo < n_groups * group_size:  # ragged last group
        codes = F.pad(codes, (0, n_groups * group_size - (hi - lo)))
    grouped = codes.view(codes.shape[0], n_groups, group_size)
    grouped.sub_(zeros.to(torch.float32).unsqueeze(-1) if zeros is not None else float(1 << (bits - 1)))
    grouped.mul_(scales.to(torch.float32).unsqueeze(-1))  # in place: one dense buffer per call
    return codes.view(codes.shape[0], -1)[:, : hi - lo]
