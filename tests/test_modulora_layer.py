"""ModuLoRA layer: gradients against dense float64 autograd, and no dense weight saved for backward."""

from __future__ import annotations

import pytest
import torch

from engine.lora import ModuLoRALinear
from engine.quant import RTNQuantizer


def make_layer(out_f: int, in_f: int, bits: int, rank: int, dtype: torch.dtype, tile_numel=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    qweight = RTNQuantizer(bits=bits, group_size=32).quantize(torch.randn(out_f, in_f, generator=gen))
    layer = ModuLoRALinear(
        qweight, torch.randn(out_f, generator=gen), rank=rank, alpha=2 * rank, compute_dtype=dtype,
        adapter_dtype=dtype, tile_numel=tile_numel,
    )
    if rank:
        with torch.no_grad():
            layer.lora_b.normal_(generator=gen)  # a trained-looking adapter, so every gradient term matters
    return layer


def dense_reference(layer: ModuLoRALinear, x: torch.Tensor, grad_y: torch.Tensor):
    """The same function in float64 with ordinary autograd on the dequantized weight."""
    w = layer.base.dequantize(torch.float64)
    xr = x.detach().double().requires_grad_()
    a = layer.lora_a.detach().double().requires_grad_()
    b = layer.lora_b.detach().double().requires_grad_()
    y = xr @ w.T + layer.bias.double() + layer.scaling * (xr @ a.T) @ b.T
    y.backward(grad_y.double())
    return y.detach(), xr.grad, a.grad, b.grad


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-4)])
@pytest.mark.parametrize("shape,tile_numel", [((64, 172), 64 * 64), ((45, 100), None), ((172, 200), 172 * 70)])
def test_gradients_match_float64_reference(bits, dtype, tol, shape, tile_numel):
    layer = make_layer(*shape, bits=bits, rank=8, dtype=dtype, tile_numel=tile_numel, seed=bits)
    gen = torch.Generator().manual_seed(100 + bits)
    x = torch.randn(3, 5, shape[1], generator=gen, dtype=dtype, requires_grad=True)
    grad_y = torch.randn(3, 5, shape[0], generator=gen, dtype=dtype)
    y = layer(x)
    y.backward(grad_y)
    y_ref, gx, ga, gb = dense_reference(layer, x, grad_y)
    assert rel_err(y.detach(), y_ref) < tol
    assert rel_err(x.grad, gx) < tol
    assert rel_err(layer.lora_a.grad, ga) < tol
    assert rel_err(layer.lora_b.grad, gb) < tol


def test_bfloat16_compute_is_close():
    layer = make_layer(64, 172, bits=4, rank=4, dtype=torch.bfloat16)
    layer.lora_a.data, layer.lora_b.data = layer.lora_a.data.float(), layer.lora_b.data.float()
    x = torch.randn(4, 172, requires_grad=True)
    grad_y = torch.randn(4, 64)
    layer(x).backward(grad_y)
    _, gx, ga, gb = dense_reference(layer, x, grad_y)
    assert layer.lora_a.grad.dtype == torch.float32
    for got, ref in [(x.grad, gx), (layer.lora_a.grad, ga), (layer.lora_b.grad, gb)]:
        assert rel_err(got, ref) < 2e-2


def test_rank_zero_is_the_quantized_linear():
    layer = make_layer(30, 172, bits=3, rank=0, dtype=torch.float32)
    x = torch.randn(2, 172, requires_grad=True)
    expected = x @ layer.base.dequantize().T + layer.bias
    assert torch.allclose(layer(x), expected, atol=1e-5)


@pytest.mark.parametrize("tile_numel", [None, 64 * 512])
def test_no_dense_weight_is_saved_for_backward(tile_numel):
    out_f, in_f = 512, 384
    stack = torch.nn.Sequential(*[make_layer(out_f if i % 2 == 0 else in_f, in_f if i % 2 == 0 else out_f, 4, 8,
                                             torch.float32, tile_numel, seed=i) for i in range(3)])
    saved: list[torch.Size] = []

    def pack_hook(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.shape)
        return t

    x = torch.randn(2, in_f, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        y = stack(x)
    y.sum().backward()
    weight_numel = out_f * in_f
    assert saved, "expected the layers to save their inputs"
    assert all(torch.Size(s).numel() < weight_numel // 8 for s in saved), saved
    assert x.grad is not None and all(layer.lora_a.grad is not None for layer in stack)
