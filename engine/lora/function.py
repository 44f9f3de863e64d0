"""The quantization-agnostic ModuLoRA autograd function.

``y = x W^T + s (x A^T) B^T`` where ``W`` is only ever available through
``qweight.dequantize``.  Forward and backward both re-materialise ``W`` (in tiles of at
most ``tile_numel`` elements when set, bounding the transient dense buffer); the
context saves ``x``, ``A``, ``B`` and ``x A^T`` but never the dense weight.
This is the ModuLoRA paper's backward pass (Yin et al., 2023): it works for any
quantizer because it needs nothing but a dequantize method.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from engine.quant.base import QuantizedWeight

TILE_ALIGN = 64  # column tiles are multiples of this, so they start on group and packing-chunk boundaries


def _resident(weight: torch.Tensor) -> torch.Tensor:
    """Refuse a shape-only placeholder: CPU matmuls against ``meta`` tensors return garbage silently."""
    if weight.is_meta:
        raise RuntimeError("quantized weight is not resident: its decoder block was not streamed in")
    return weight


def _spans(n: int, step: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, step):
        yield start, min(start + step, n)


def quantized_matmul(x: torch.Tensor, qweight: QuantizedWeight, tile_numel: int | None) -> torch.Tensor:
    """``x @ W^T``; with a tile budget, ``W`` is dequantized a block of input columns at a time
    and the partial products accumulate in place into one output buffer."""
    n_out, n_in = qweight.out_features, qweight.in_features
    if tile_numel is None or tile_numel >= n_out * n_in:
        return x @ _resident(qweight.dequantize(x.dtype)).T
    step = max(TILE_ALIGN, tile_numel // n_out // TILE_ALIGN * TILE_ALIGN)
    x2 = x.reshape(-1, n_in)
    y = torch.zeros(x2.shape[0], n_out, dtype=x.dtype, device=x.device)
    for c0, c1 in _spans(n_in, step):
        y.addmm_(x2[:, c0:c1], _resident(qweight.dequantize(x.dtype, cols=(c0, c1))).T)
    return y.view(*x.shape[:-1], n_out)


def quantized_matmul_transposed(g: torch.Tensor, qweight: QuantizedWeight, tile_numel: int | None) -> torch.Tensor:
    """``g @ W`` (the input gradient); with a tile budget, accumulated over blocks of ``W``'s rows."""
    n_out, n_in = qweight.out_features, qweight.in_features
    if tile_numel is None or tile_numel >= n_out * n_in:
        return g @ _resident(qweight.dequantize(g.dtype))
    step = max(1, tile_numel // n_in)
    g2 = g.reshape(-1, n_out)
    out = torch.zeros(g2.shape[0], n_in, dtype=g.dtype, device=g.device)
    for r0, r1 in _spans(n_out, step):
        out.addmm_(g2[:, r0:r1], _resident(qweight.dequantize(g.dtype, rows=(r0, r1))))
    return out.view(*g.shape[:-1], n_in)


class ModuLoRAFunction(torch.autograd.Function):
    """Fused base + LoRA matmul; gradients for ``x``, ``A`` and ``B`` only (``W`` is frozen)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        lora_a: torch.Tensor | None,
        lora_b: torch.Tensor | None,
        qweight: QuantizedWeight,
        scaling: float,
        tile_numel: int | None,
        compute_dtype: torch.dtype,
    ) -> torch.Tensor:
        xc = x.to(compute_dtype)
        y = quantized_matmul(xc, qweight, tile_numel)
        xa = None
        if lora_a is not None:
            xa = xc @ lora_a.to(compute_dtype).T
            y = y + scaling * (xa @ lora_b.to(compute_dtype).T)
        ctx.qweight, ctx.scaling, ctx.tile_numel, ctx.compute_dtype = qweight, scaling, tile_numel, compute_dtype
        ctx.input_dtype = x.dtype
        ctx.save_for_backward(x, lora_a, lora_b, xa)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, lora_a, lora_b, xa = ctx.saved_tensors
        dt, s = ctx.compute_dtype, ctx.scaling
        g = grad_y.to(dt)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = quantized_matmul_transposed(g, ctx.qweight, ctx.tile_numel)
        if lora_a is not None:
            gb = g @ lora_b.to(dt)  # [..., r]
            if ctx.needs_input_grad[0]:
                grad_x = grad_x + s * (gb @ lora_a.to(dt))
            g2 = g.reshape(-1, g.shape[-1])
            if ctx.needs_input_grad[2]:
                grad_b = (s * (g2.T @ xa.reshape(-1, xa.shape[-1]))).to(lora_b.dtype)
            if ctx.needs_input_grad[1]:
                x2 = x.to(dt).reshape(-1, x.shape[-1])
                grad_a = (s * (gb.reshape(-1, gb.shape[-1]).T @ x2)).to(lora_a.dtype)
        if grad_x is not None:
            grad_x = grad_x.to(ctx.input_dtype)
        return grad_x, grad_a, grad_b, None, None, None, None
