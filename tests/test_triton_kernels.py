"""The Triton dequantization kernel against the eager reference, under Triton's CPU interpreter.

``TRITON_INTERPRET=1`` must be set before ``triton.jit`` wraps the kernel, so the
kernel module is (re)imported here with it set; on a machine with CUDA the same
comparison runs on the GPU (``cuda`` marker).
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

pytest.importorskip("triton")

from engine.quant.kernels import eager  # noqa: E402
from engine.quant.packing import SUPPORTED_BITS, pack  # noqa: E402


@pytest.fixture(scope="module")
def interpreted():
    """The kernel module as Triton's interpreter runs it on CPU tensors."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    import engine.quant.kernels.triton_groupwise as module

    module = importlib.reload(module)
    yield module
    if previous is None:
        os.environ.pop("TRITON_INTERPRET")
    else:
        os.environ["TRITON_INTERPRET"] = previous
    importlib.reload(module)


def _case(rows: int, cols: int, bits: int, group: int, symmetric: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    n_groups = -(-cols // group)
    codes = torch.randint(0, 1 << bits, (rows, cols), generator=gen)
    scales = (torch.rand(rows, n_groups, generator=gen) * 0.1 + 1e-3).to(torch.float16)
    zeros = None if symmetric else torch.randint(0, 1 << bits, (rows, n_groups), generator=gen).to(torch.uint8)
    return pack(codes, bits), scales, zeros


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_groupwise_equals_eager_bit_for_bit(interpreted, bits, symmetric, dtype):
    # ragged everywhere: rows not a multiple of the block, a short last group, a tile starting mid-row
    rows, cols, group = 37, 300, 64
    packed, scales, zeros = _case(rows, cols, bits, group, symmetric, seed=bits * 10 + symmetric)
    for lo, hi in [(0, cols), (128, 300), (64, 192)]:
        g0, g1 = lo // group, -(-hi // group)
        tile_zeros = None if zeros is None else zeros[:, g0:g1]
        want = eager.dequantize_groups(packed, scales[:, g0:g1], tile_zeros, bits, group, lo, hi, dtype)
        got = interpreted.dequantize_groups(packed, scales[:, g0:g1], tile_zeros, bits, group, lo, hi, dtype)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got.view(torch.uint8) if dtype != torch.float32 else got.view(torch.int32),
                           want.view(torch.uint8) if dtype != torch.float32 else want.view(torch.int32))


def test_triton_groupwise_matches_float64_reference(interpreted):
    """Independent of both implementations: ``scale * (code - zero)`` computed in float64 from the raw codes."""
    bits, group, rows, cols = 3, 32, 9, 100
    gen = torch.Generator().manual_seed(7)
    codes = torch.randint(0, 8, (rows, cols), generator=gen)
    scales = torch.rand(rows, 4, generator=gen).to(torch.float16)
    zeros = torch.randint(0, 8, (rows, 4), generator=gen).to(torch.uint8)
    got = interpreted.dequantize_groups(pack(codes, bits), scales, zeros, bits, group, 0, cols, torch.float32)
    index = torch.arange(cols) // group
    want = (codes.double() - zeros.double()[:, index]) * scales.double()[:, index]
    assert torch.equal(got.double(), want)
