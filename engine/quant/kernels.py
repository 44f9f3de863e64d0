"""Dequantization kernels, fused by ``torch.compile`` where this machine can compile them.

Eagerly, unpacking and scaling a tile takes one pass over memory per torch op
(widen, shift and mask each code position, stack, convert, subtract, multiply);
compiled with Inductor the chain becomes one loop, 10-50x faster on CPU.  The
compiled and eager functions compute the same values (float32 bit for bit;
the tests compare both against float64 references).  ``MODULORA_COMPILE=0``
turns compilation off; if compiling fails (no C++ compiler, an unsupported
backend) the eager function is used, with one warning.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from functools import wraps
from typing import TypeVar

import torch
import torch.nn.functional as F

from engine.quant.packing import unpack_columns

log = logging.getLogger(__name__)
F_ = TypeVar("F_", bound=Callable[..., torch.Tensor])
# (bits, group size, dtype, symmetric) variants a process may compile before falling back to eager
RECOMPILE_LIMIT = 64


def compiled(fn: F_) -> F_:
    """``fn`` compiled with dynamic shapes on first call, or ``fn`` itself where that is off or fails."""
    if os.environ.get("MODULORA_COMPILE", "1") == "0":
        return fn
    state: dict[str, Callable[..., torch.Tensor]] = {}

    @wraps(fn)
    def run(*args, **kwargs):
        if "fn" not in state:
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
            state["fn"] = torch.compile(fn, dynamic=True)
        try:
            return state["fn"](*args, **kwargs)
        except Exception as exc:  # compilation needs a working toolchain; the eager path always works
            if state["fn"] is fn:
                raise
            log.warning("torch.compile of %s failed (%s); dequantizing eagerly", fn.__name__, exc)
            state["fn"] = fn
            return fn(*args, **kwargs)

    return run  # type: ignore[return-value]


@compiled
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
    codes = F.pad(codes, (0, n_groups * group_size - (hi - lo)))
    grouped = codes.view(codes.shape[0], n_groups, group_size)
    zero = zeros.to(dtype).unsqueeze(-1) if zeros is not None else float(1 << (bits - 1))
    return ((grouped - zero) * scales.to(dtype).unsqueeze(-1)).view(codes.shape[0], -1)
