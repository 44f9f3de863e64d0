"""Tiles that cost what they say: with a tile budget, a ModuLoRA layer's forward and backward each decode every
weight of every format once (at most 1.05x the matrix), counted where each format decodes; and the tiled products
equal the untiled ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quantize as gguf_quantize

from engine.lora import ModuLoRALinear
from engine.quant import GGUFWeight, LayerStats, make_quantizer
from engine.quant.adapters import bnb4bit, gguf_blocks, hqq_quant
from engine.quant import groupwise, qtip, quip

OUT, IN = 192, 512
TILE = OUT * IN // 5  # five tiles or so a product


def stats(seed: int) -> LayerStats:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, IN, generator=g, dtype=torch.float64) @ torch.randn(IN, IN, generator=g, dtype=torch.float64)
    return LayerStats(x.T @ x, 1024)


def gguf_weight(w: torch.Tensor, qtype: str) -> GGUFWeight:
    """``w`` in GGML blocks (gguf-py's encoder); K-quants, which it cannot encode, as random valid blocks."""
    if qtype.endswith("_K"):
        from test_adapters import _random_blocks

        block_size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]][0]
        raw = _random_blocks(qtype, rows=w.shape[0], blocks_per_row=w.shape[1] // block_size, seed=0)
        return GGUFWeight(torch.from_numpy(raw.copy()), qtype, w.shape[1])
    encoded = gguf_quantize(w.numpy(), GGMLQuantizationType[qtype])
    raw = torch.from_numpy(np.ascontiguousarray(encoded).view(np.uint8).reshape(w.shape[0], -1).copy())
    return GGUFWeight(raw, qtype, w.shape[1])


FORMATS = {
    "rtn 3-bit g32": lambda w: make_quantizer("rtn", bits=3, group_size=32).quantize(w),
    "rtn 4-bit g128": lambda w: make_quantizer("rtn", bits=4, group_size=128).quantize(w),
    "optq act-order": lambda w: make_quantizer("optq", bits=3, group_size=32, clip_search=False).quantize(w, stats(1)),
    "optq per row": lambda w: make_quantizer("optq", bits=4, group_size=-1).quantize(w, stats(2)),
    "quip# input": lambda w: make_quantizer("quip", bits=2, tune_iters=0).quantize(w, stats(3)),
    "quip# both": lambda w: make_quantizer("quip", bits=2, incoherence="both", tune_iters=0).quantize(w, stats(4)),
    "qtip": lambda w: make_quantizer("qtip", bits=3, tune_iters=0).quantize(w, stats(5)),
    "nf4": lambda w: make_quantizer("nf4", group_size=64).quantize(w),
    "hqq": lambda w: make_quantizer("hqq", bits=3, group_size=64).quantize(w),
    "gguf Q4_K": lambda w: gguf_weight(w, "Q4_K"),
    "gguf Q8_0": lambda w: gguf_weight(w, "Q8_0"),
}


class DecodeCounter:
    """Wraps each format's decoding core (the functions that expand packed codes to floats) to add up how many
    weights they produce; the wrapped functions run as before."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.weights = 0
        for owner, name in ((groupwise, "dequantize_groups"), (quip.QuipWeight, "rotated"),
                            (bnb4bit.BnB4BitWeight, "_dequantize_run"), (hqq_quant.HQQWeight, "_dequantize_groups"),
                            (gguf_blocks, "dequantize_blocks"), (qtip, "trellis_decode")):
            monkeypatch.setattr(owner, name, self.counting(getattr(owner, name)))

    def counting(self, decode):
        def wrapped(*args, **kwargs):
            out = decode(*args, **kwargs)
            self.weights += out.numel()
            return out

        return wrapped


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_weight_is_decoded_once_per_product(fmt, monkeypatch):
    w = 0.05 * torch.randn(OUT, IN, generator=torch.Generator().manual_seed(0))
    qweight = FORMATS[fmt](w)
    layer = ModuLoRALinear(qweight, rank=4, alpha=8.0, tile_numel=TILE)
    x = torch.randn(3, 5, IN, requires_grad=True)
    counter = DecodeCounter(monkeypatch)
    y = layer(x)
    forward = counter.weights
    y.square().sum().backward()
    backward = counter.weights - forward
    assert 0 < forward <= 1.05 * OUT * IN, (fmt, forward / (OUT * IN))
    assert 0 < backward <= 1.05 * OUT * IN, (fmt, backward / (OUT * IN))


@pytest.mark.parametrize("fmt", FORMATS)
def test_tiled_products_equal_the_dense_weights(fmt):
    """``x Wᵀ`` and ``g W`` in tiles against the same products with the whole weight dequantized in float64."""
    w = 0.05 * torch.randn(OUT, IN, generator=torch.Generator().manual_seed(0))
    qweight = FORMATS[fmt](w)
    dense = qweight.dequantize(torch.float64)
    x, g = torch.randn(11, IN), torch.randn(11, OUT)
    torch.testing.assert_close(qweight.matmul(x, TILE).double(), x.double() @ dense.T, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(qweight.matmul_t(g, TILE).double(), g.double() @ dense, rtol=1e-4, atol=1e-4)
