"""The group-wise dequantization kernel: ``scale * (code - zero)`` for whole groups of packed codes.

One function with tensor-and-int arguments, so a faster implementation
(``torch.compile``, a fused C++ or Triton kernel) can replace it in one place.
``torch.compile`` of it was measured here: on one large tile it is several
times faster, but compiling takes 8-40 s per variant on this CPU and its
dynamic-shape code was slower per layer than eager in a real forward pass,
so the eager version stays until a kernel wins end to end (see docs/offload.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.quant.packing import unpack_columns


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
    """
    n_groups = scales.shape[1]
    codes = unpack_columns(packed, bits, lo, hi).to(dtype)
    if hi - lo < n_groups * group_size:  # ragged last group
        codes = F.pad(codes, (0, n_groups * group_size - (hi - lo)))
    grouped = codes.view(codes.shape[0], n_groups, group_size)
    grouped.sub_(zeros.to(dtype).unsqueeze(-1) if zeros is not None else float(1 << (bits - 1)))
    grouped.mul_(scales.to(dtype).unsqueeze(-1))  # in place: one dense buffer per call
    return codes.view(codes.shape[0], -1)
