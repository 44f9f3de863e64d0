"""The quantization-agnostic ModuLoRA autograd function.

``y = x W^T + s (x A^T) B^T`` where ``W`` is only ever available through
``qweight.dequantize``.  Forward and backward both re-materialise ``W`` (in row
tiles when ``tile_rows`` is set, bounding the transient dense buffer); the
context saves ``x``, ``A``, ``B`` and ``x A^T`` but never the dense weight.
This is the ModuLoRA paper's backward pass (Yin et al., 2023): it works for any
quantizer because it needs nothing but a dequantize method.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from engine.quant.base import QuantizedWeight


def _row_tiles(n_rows: int, tile_rows: int | None) -> Iterator[tuple[int, int]]:
    step = tile_rows or n_rows
    for start in range(0, n_rows, step):
        yield start, min(start + step, n_rows)


def quantized_matmul(x: torch.Tensor, qweight: QuantizedWeight, tile_rows: int | None) -> torch.Tensor:
    """``x @ W^T`` with ``W`` dequantized (in tiles of output rows) to ``x.dtype``."""
    if tile_rows is None or tile_rows >= qweight.out_features:
        return x @ qweight.dequantize(x.dtype).T
    return torch.cat(
        [x @ qweight.dequantize(x.dtype, rows=span).T for span in _row_tiles(qweight.out_features, tile_rows)],
        dim=-1,
    )


def quantized_matmul_transposed(g: torch.Tensor, qweight: QuantizedWeight, tile_rows: int | None) -> torch.Tensor:
    """``g @ W`` (the input gradient), accumulated over tiles of ``W``'s rows."""
    if tile_rows is None or tile_rows >= qweight.out_features:
        return g @ qweight.dequantize(g.dtype)
    out = None
    for r0, r1 in _row_tiles(qweight.out_features, tile_rows):
        part = g[..., r0:r1] @ qweight.dequantize(g.dtype, rows=(r0, r1))
        out = part if out is None else out.add_(part)
    return out


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
        tile_rows: int | None,
        compute_dtype: torch.dtype,
    ) -> torch.Tensor:
        xc = x.to(compute_dtype)
        y = quantized_matmul(xc, qweight, tile_rows)
        xa = None
        if lora_a is not None:
            xa = xc @ lora_a.to(compute_dtype).T
            y = y + scaling * (xa @ lora_b.to(compute_dtype).T)
        ctx.qweight, ctx.scaling, ctx.tile_rows, ctx.compute_dtype = qweight, scaling, tile_rows, compute_dtype
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
            grad_x = quantized_matmul_transposed(g, ctx.qweight, ctx.tile_rows)
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
