"""The quantization-agnostic ModuLoRA autograd function.

``y = x W^T + s (x A^T) B^T`` where ``W`` is only ever available through the
packed weight's own products (``qweight.matmul`` and ``matmul_t``, by default
tiled dequantization).  Forward and backward both re-materialise ``W`` (in tiles
of at most ``tile_numel`` elements when set, bounding the transient dense
buffer); the context saves ``x``, ``A``, ``B`` and ``x A^T`` but never the dense
weight.
This is the ModuLoRA paper's backward pass (Yin et al., 2023): it works for any
quantizer because it needs nothing but a dequantize method.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

from engine.quant.base import QuantizedWeight

# oneDNN's own test of whether this CPU has native (or AVX-512) half-precision GEMMs.
HALF_MATMUL_CHECKS = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}


@functools.cache
def cpu_has_half_matmul(dtype: torch.dtype) -> bool:
    try:
        return bool(getattr(torch.ops.mkldnn, HALF_MATMUL_CHECKS[dtype])())
    except (AttributeError, RuntimeError):  # a build without oneDNN: the generic kernels, slow in half precision
        return False


def matmul_dtype(compute_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the layer's matmuls run in: the compute dtype, but float32 for a half type on a CPU without
    half-precision GEMMs.

    There torch falls back to slow generic kernels: on an AVX2 machine a [512, 2816] x [2816, 1024] bfloat16
    product took 150-4250 ms depending on operand layout (the input gradient's layout is the slowest), against
    25 ms upcast to float32 and cast back.  The saved activations and the layer's output stay in the compute
    dtype; only the transient operands are float32.
    """
    if device.type == "cpu" and compute_dtype in HALF_MATMUL_CHECKS and not cpu_has_half_matmul(compute_dtype):
        return torch.float32
    return compute_dtype


# float32 elements of one upcast operand of a float layer's product (16 MiB): bounds what the upcast adds to a
# pass's memory (a whole 7B layer's float32 copy and its input's, 0.4 GiB, broke a 4 GiB quantize budget).
PRODUCT_CHUNK = 1 << 22


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for a float layer, answered in ``x``'s dtype.  Without gradients, where :func:`matmul_dtype`
    upcasts (half precision on a CPU without half GEMMs: 8x faster), the product runs in float32 chunks of the
    weight's rows and the input's tokens of at most :data:`PRODUCT_CHUNK` elements each; with gradients it is
    torch's own product (its saved operands stay in the layer's dtype)."""
    dtype = matmul_dtype(weight.dtype, weight.device)
    if dtype == weight.dtype or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return F.linear(x, weight, bias)
    step = max(1, PRODUCT_CHUNK // weight.shape[1])  # weight rows, and input tokens, per chunk
    flat = x.reshape(-1, x.shape[-1])
    out = flat.new_empty(flat.shape[0], weight.shape[0])
    for r0 in range(0, weight.shape[0], step):
        w = weight[r0 : r0 + step].to(dtype)
        b = None if bias is None else bias[r0 : r0 + step].to(dtype)
        for t0 in range(0, flat.shape[0], step):
            out[t0 : t0 + step, r0 : r0 + step] = F.linear(flat[t0 : t0 + step].to(dtype), w, b)
    return out.view(*x.shape[:-1], weight.shape[0])


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
        mm_dtype = matmul_dtype(compute_dtype, x.device)
        xc = x.to(mm_dtype)
        y = qweight.matmul(xc, tile_numel)
        xa = None
        if lora_a is not None:
            xa = xc @ lora_a.to(mm_dtype).T
            y = y + scaling * (xa @ lora_b.to(mm_dtype).T)
        ctx.qweight, ctx.scaling, ctx.tile_numel, ctx.mm_dtype = qweight, scaling, tile_numel, mm_dtype
        ctx.input_dtype = x.dtype
        ctx.save_for_backward(x, lora_a, lora_b, xa)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, lora_a, lora_b, xa = ctx.saved_tensors
        dt, s = ctx.mm_dtype, ctx.scaling
        g = grad_y.to(dt)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = ctx.qweight.matmul_t(g, ctx.tile_numel)
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
