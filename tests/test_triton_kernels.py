"""The Triton dequantization kernels against the eager reference, under Triton's CPU interpreter.

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
from engine.quant.qtip import TILE_ROWS, TrellisWeight  # noqa: E402
from engine.quant.quip import STAGES, QuipWeight  # noqa: E402
from engine.quant.trellis import STATE_BITS, code_table, pack_symbols  # noqa: E402


def _under_interpreter(name: str):
    """Module ``name`` as Triton's interpreter runs it on CPU tensors (reloaded back on leaving)."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    module = importlib.reload(importlib.import_module(name))
    yield module
    if previous is None:
        os.environ.pop("TRITON_INTERPRET")
    else:
        os.environ["TRITON_INTERPRET"] = previous
    importlib.reload(module)


@pytest.fixture(scope="module")
def interpreted():
    """The group-wise kernel module under the interpreter."""
    yield from _under_interpreter("engine.quant.kernels.triton_groupwise")


@pytest.fixture(scope="module")
def codebooks():
    """The codebook kernels (QuIP#, QTIP) under the interpreter."""
    yield from _under_interpreter("engine.quant.kernels.triton_codebooks")


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


# Random codes, not quantized weights: every code word (so every sign, parity and shift path of E8P) is drawn.
ROW_RANGES = [(0, 70), (5, 37), (33, 70), (69, 70)]  # ragged: mid-tile starts, a last partial tile, one row


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("rotate_out", [False, True])
def test_triton_quip_decoding_equals_eager_bit_for_bit(codebooks, bits, rotate_out):
    out_features, in_features, in_padded = 70, 100, 128
    gen = torch.Generator().manual_seed(bits * 2 + rotate_out)
    codes = [torch.randint(0, 1 << (16 if name == "e8p" else 8), (out_features, in_padded // 8), generator=gen)
             for name, _ in STAGES[bits]]
    scale = (torch.rand(1 if rotate_out else out_features, generator=gen) + 0.1).to(torch.float16)
    signs = torch.randint(0, 2, (in_padded,), generator=gen) * 2 - 1
    signs_out = torch.randint(0, 2, (out_features,), generator=gen) * 2 - 1 if rotate_out else None
    weight = QuipWeight(codes, scale, signs, signs_out, out_features=out_features, in_features=in_features,
                        bits=bits)
    stored = [getattr(weight, f"codes{i}") for i in range(len(weight.stages))]
    for r0, r1 in ROW_RANGES:
        want = weight.rotated(slice(r0, r1))
        got = codebooks.quip_rotated(stored, weight.stages, weight.scale, r0, r1)
        assert got.shape == want.shape and torch.equal(got.view(torch.int32), want.view(torch.int32)), (r0, r1)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_triton_trellis_decoding_equals_eager_bit_for_bit(codebooks, bits):
    out_features, in_features, in_padded = 70, 100, 128
    gen = torch.Generator().manual_seed(bits)
    symbols = torch.randint(0, 1 << bits, (out_features, in_padded // 8, 8), generator=gen)
    scale = (torch.rand(out_features, generator=gen) + 0.1).to(torch.float16)
    signs = torch.randint(0, 2, (in_padded,), generator=gen) * 2 - 1
    weight = TrellisWeight(symbols, scale, signs, out_features=out_features, in_features=in_features, bits=bits)
    for r0, r1 in ROW_RANGES:
        want = weight.rotated(slice(r0, r1))
        got = codebooks.trellis_rotated(weight.codes, weight.scale, bits, STATE_BITS, TILE_ROWS, r0, r1)
        assert got.shape == want.shape and torch.equal(got.view(torch.int32), want.view(torch.int32)), (r0, r1)


def test_triton_trellis_decoding_matches_the_state_definition(codebooks):
    """Independent of both implementations: each weight is ``table[state]``, the state its own symbol and the
    ones before it in its tile's sequence (zeros before the start), newest in the low bits."""
    bits, rows = 3, 40
    gen = torch.Generator().manual_seed(11)
    symbols = torch.randint(0, 1 << bits, (rows, 2, 8), generator=gen)
    scale = torch.ones(rows, dtype=torch.float16)
    got = codebooks.trellis_rotated(pack_symbols(symbols, bits), scale, bits, STATE_BITS, TILE_ROWS, 0, rows)
    table, window = code_table(STATE_BITS), STATE_BITS // bits
    for r, block, lane in [(0, 0, 0), (0, 1, 3), (1, 0, 0), (31, 1, 7), (32, 0, 2), (39, 1, 5)]:
        sequence = symbols[r - r % TILE_ROWS : r - r % TILE_ROWS + TILE_ROWS, block].reshape(-1)
        step = (r % TILE_ROWS) * 8 + lane
        state = sum(int(sequence[step - back]) << (bits * back) for back in range(window) if step - back >= 0)
        assert got[r, block * 8 + lane].item() == table[state].item()
