"""Dequantization kernels behind one seam: a backend per device.

``dequantize_groups`` (group-wise codes to floats) has two implementations with
the same arguments and bit-identical results: the eager torch one (any device;
the CPU path and the reference) and a Triton kernel (CUDA).  The codebook formats
(QuIP#'s lattice codes, QTIP's trellis symbols) decode eagerly in their own
modules and through ``codebook_kernels`` on CUDA, bit for bit the same.  The backend is
chosen by the tensors' device; ``MODULORA_KERNELS=eager`` forces the reference
everywhere (to compare, or where Triton is missing).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import cache
from types import ModuleType

import torch

from engine.quant.kernels import eager

DequantizeGroups = Callable[..., torch.Tensor]
BACKENDS = ("eager", "triton")
# What each backend declares it dequantizes (3-bit, group 64, to bf16), G weights/s, and where that was measured:
# the planner's rate unless the user gives one.
DECLARED_GWEIGHTS = {
    "triton": (130.0, "an 11008 x 4096 weight on an H200, docs/gpu.md"),
    "eager": (0.72, "a 4096 x 4096 weight on 2 CPU threads, docs/dequant.md"),
}


def declared_rate(device_type: str) -> tuple[float, str]:
    """(G weights/s, where measured) of the backend that dequantizes on ``device_type``."""
    backend = "triton" if device_type == "cuda" else "eager"
    rate, source = DECLARED_GWEIGHTS[backend]
    return rate, f"declared by the {backend} kernel: 3-bit g64 to bf16, {source}"


@cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def backend_for(device: torch.device) -> str:
    """``triton`` for CUDA tensors (when Triton is installed and not switched off), else ``eager``."""
    forced = os.environ.get("MODULORA_KERNELS")
    if forced in BACKENDS:
        return forced
    return "triton" if device.type == "cuda" and _triton_available() else "eager"


def groupwise_kernel(backend: str) -> DequantizeGroups:
    if backend == "triton":
        from engine.quant.kernels import triton_groupwise

        return triton_groupwise.dequantize_groups
    return eager.dequantize_groups


def codebook_kernels(device: torch.device) -> ModuleType | None:
    """The Triton kernels that decode QuIP#'s and QTIP's rotated weights, when ``device``'s backend is Triton;
    ``None``: the formats' own eager decoding."""
    if backend_for(device) != "triton":
        return None
    from engine.quant.kernels import triton_codebooks

    return triton_codebooks


def dequantize_groups(packed: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    """:func:`engine.quant.kernels.eager.dequantize_groups`, by the backend of ``packed``'s device."""
    return groupwise_kernel(backend_for(packed.device))(packed, *args, **kwargs)


__all__ = [
    "BACKENDS", "DECLARED_GWEIGHTS", "backend_for", "codebook_kernels", "declared_rate", "dequantize_groups",
    "groupwise_kernel",
]
