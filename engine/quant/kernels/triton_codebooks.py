"""Triton kernels (CUDA) that decode the codebook formats' rotated weights: QuIP#'s E8P lattice codes with their
residual stage, and QTIP's bitshift trellis symbols, each scaled by its row's scale, in one pass.

Each program decodes a ``BLOCK_R x BLOCK_C`` tile of ``scale ⊙ decode(codes)`` (the weight in the incoherence
basis; the Hadamard transforms stay with the layer).  Column ``c`` is lane ``c mod 8`` of the ``c / 8``-th code of
its row, so every lane reads its code and builds its own value: no cross-lane step.  The arithmetic is the eager
path's operation for operation (``engine.quant.quip`` / ``engine.quant.qtip``: float32 table values, signs as
``±1 *``, the residual stage divided by its gain with IEEE rounding, then times the scale), so both give the same
bits; tests check that under Triton's interpreter on the CPU (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.quant.e8p import DIM, e8_ball, source_set, source_parity
from engine.quant.trellis import code_table

BLOCK_R, BLOCK_C = 16, 128
STAGE_KINDS = {"e8p": 1, "e8": 2}  # a residual stage's codebook, as the kernel's constant (0: no second stage)


@triton.jit
def _e8p_lane(code, lane, source_ptr, parity_ptr, inside):
    """Lane ``lane`` of the E8P point of 16-bit ``code``: ``±A[a]_lane ± 1/4`` (``engine.quant.e8p``)."""
    c = code & 0xFFFF
    a = c >> 8
    neg = (c >> lane) & 1
    flips = (c >> 1) & 0x7F  # lane 0's sign makes the count of negative lanes match A[a]'s parity
    flips = flips ^ (flips >> 4)
    flips = flips ^ (flips >> 2)
    flips = (flips ^ (flips >> 1)) & 1
    parity = tl.load(parity_ptr + a, mask=inside, other=0).to(tl.int32)
    neg = tl.where(lane == 0, flips ^ parity, neg)
    value = tl.load(source_ptr + a * 8 + lane, mask=inside, other=0.0)
    shift = tl.where((c & 1) == 1, 0.25, -0.25)
    return tl.where(neg == 1, -1.0, 1.0) * value + shift


@triton.jit
def _quip_kernel(
    codes0_ptr, codes1_ptr, scale_ptr, source_ptr, parity_ptr, ball_ptr, out_ptr,
    r0, rows, cols, codes0_stride, codes1_stride, out_stride, gain1,
    STAGE1: tl.constexpr, ROW_SCALES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    inside = (r < rows) & (c < cols)
    row = (r0 + r).to(tl.int64)
    block, lane = c // 8, c % 8
    code = tl.load(codes0_ptr + row * codes0_stride + block, mask=inside, other=0).to(tl.int32)
    value = _e8p_lane(code, lane, source_ptr, parity_ptr, inside)
    if STAGE1 != 0:
        code1 = tl.load(codes1_ptr + row * codes1_stride + block, mask=inside, other=0).to(tl.int32)
        if STAGE1 == 1:
            residual = _e8p_lane(code1, lane, source_ptr, parity_ptr, inside)
        else:
            residual = tl.load(ball_ptr + (code1 & 0xFF) * 8 + lane, mask=inside, other=0.0)
        value = value + tl.math.div_rn(residual, gain1)
    if ROW_SCALES:
        scale = tl.load(scale_ptr + row, mask=inside, other=0).to(tl.float32)
    else:
        scale = tl.load(scale_ptr).to(tl.float32)
    tl.store(out_ptr + r.to(tl.int64) * out_stride + c, value * scale, mask=inside)


def quip_rotated(codes: list[torch.Tensor], stages: tuple[tuple[str, float], ...], scale: torch.Tensor, r0: int,
                 r1: int) -> torch.Tensor:
    """``scale ⊙ rvq_decode(codes)`` for stored rows ``[r0, r1)`` (float32 ``[rows, 8 * codes per row]``):
    :meth:`engine.quant.quip.QuipWeight.rotated` in one kernel launch."""
    if stages[0][0] != "e8p" or len(stages) > 2 or stages[0][1] != 1.0:
        raise ValueError(f"no Triton kernel for the QuIP# stages {stages}")
    device = codes[0].device
    rows, cols = r1 - r0, codes[0].shape[1] * DIM
    out = torch.empty(rows, cols, dtype=torch.float32, device=device)
    if rows == 0 or cols == 0:
        return out
    second = codes[1] if len(stages) == 2 else codes[0]
    tables = _tables(device)
    grid = (triton.cdiv(rows, BLOCK_R), triton.cdiv(cols, BLOCK_C))
    _quip_kernel[grid](
        codes[0], second, scale, tables["source"], tables["parity"], tables["ball"], out,
        r0, rows, cols, codes[0].stride(0), second.stride(0), out.stride(0),
        stages[1][1] if len(stages) == 2 else 1.0,
        STAGE1=STAGE_KINDS[stages[1][0]] if len(stages) == 2 else 0, ROW_SCALES=len(scale) > 1,
        BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C,
    )
    return out


@triton.jit
def _trellis_kernel(
    codes_ptr, scale_ptr, table_ptr, out_ptr, r0, rows, cols, codes_stride, out_stride,
    BITS: tl.constexpr, WINDOW: tl.constexpr, TILE_ROWS: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    inside = (r < rows) & (c < cols)
    row = r0 + r
    block, lane = c // 8, c % 8
    tile = row - row % TILE_ROWS
    step = (row % TILE_ROWS) * 8 + lane  # the position in the tile's sequence (its rows' 8 lanes back to back)
    state = tl.full((BLOCK_R, BLOCK_C), 0, tl.int32)
    for back in tl.static_range(WINDOW):  # the state: this symbol and the WINDOW - 1 before it, newest lowest
        earlier = step - back
        present = inside & (earlier >= 0)
        earlier = tl.maximum(earlier, 0)
        at = (tile + earlier // 8).to(tl.int64) * codes_stride + block * BITS
        bit = (earlier % 8) * BITS
        word = tl.load(codes_ptr + at + bit // 8, mask=present, other=0).to(tl.int32)
        if BITS == 3:  # a 3-bit symbol may continue in the next byte
            crosses = present & ((bit % 8) + BITS > 8)
            word = word | (tl.load(codes_ptr + at + bit // 8 + 1, mask=crosses, other=0).to(tl.int32) << 8)
        symbol = (word >> (bit % 8)) & ((1 << BITS) - 1)
        state = state | (tl.where(present, symbol, 0) << (BITS * back))
    value = tl.load(table_ptr + state, mask=inside, other=0.0)
    scale = tl.load(scale_ptr + row, mask=inside, other=0).to(tl.float32)
    tl.store(out_ptr + r.to(tl.int64) * out_stride + c, value * scale, mask=inside)


def trellis_rotated(codes: torch.Tensor, scale: torch.Tensor, bits: int, state_bits: int, tile_rows: int, r0: int,
                    r1: int) -> torch.Tensor:
    """``scale ⊙ decode(symbols)`` for stored rows ``[r0, r1)`` of packed trellis symbols (uint8
    ``[rows, blocks, bits]``; float32 ``[rows, 8 * blocks]``): :meth:`engine.quant.qtip.TrellisWeight.rotated`
    in one kernel launch, each row decoded from its own tile's symbols."""
    rows, cols = r1 - r0, codes.shape[1] * DIM
    out = torch.empty(rows, cols, dtype=torch.float32, device=codes.device)
    if rows == 0 or cols == 0:
        return out
    codes = codes if codes.is_contiguous() else codes.contiguous()
    grid = (triton.cdiv(rows, BLOCK_R), triton.cdiv(cols, BLOCK_C))
    _trellis_kernel[grid](
        codes, scale, _tables(codes.device, state_bits)["trellis"], out, r0, rows, cols, codes.stride(0),
        out.stride(0), BITS=bits, WINDOW=state_bits // bits, TILE_ROWS=tile_rows, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C,
    )
    return out


_TABLES: dict[tuple[str, int], dict[str, torch.Tensor]] = {}


def _tables(device: torch.device, state_bits: int | None = None) -> dict[str, torch.Tensor]:
    """The codebooks on ``device``, made there once per device (and trellis state width)."""
    key = (str(device), state_bits or 0)
    if key not in _TABLES:
        if state_bits is None:
            _TABLES[key] = {"source": source_set().to(device).contiguous(),
                            "parity": source_parity().to(device=device, dtype=torch.int8),
                            "ball": e8_ball().to(device).contiguous()}
        else:
            _TABLES[key] = {"trellis": code_table(state_bits, device)}
    return _TABLES[key]
