"""Bitshift trellis codes (QTIP, Tseng et al., 2024): ``k`` bits per weight, each weight decoded from a window of
``L`` bits of the code stream.

A sequence of ``T`` weights is stored as ``T`` symbols of ``k`` bits.  The state
at step ``t`` is the last ``L / k`` symbols up to ``t`` (symbols before the
sequence's start are zero), and the weight is ``table[state]``.  So a weight's
value depends on ``L`` bits while it costs only ``k``: consecutive weights share
``L - k`` bits, and the encoder (Viterbi, the exact minimum of the squared error
over all ``2^(kT)`` streams) chooses the whole sequence at once.  This is trellis
coded quantization: on unit Gaussian data at 3 bits (``L = 12``) its mean squared
error was 0.019, against 0.031 for QuIP#'s E8P with a residual E8 stage, and 0.075
against 0.092 at 2 bits (256 x 256 values, each at its best scale;
``tests/test_qtip.py`` checks the 3-bit ratio).

The table holds the Gaussian quantiles ``Φ⁻¹((π(s) + ½) / 2^L)`` in the order of
the bijection ``π(s) = s · a mod 2^L`` (``a`` odd, near ``2^L`` times the golden
ratio's fraction): the ``2^k`` successors of one state, which differ in their
newest symbol ``b``, sit at quantile positions ``base + b · a``, a Weyl sequence,
so each state can reach values spread over the whole distribution.  The table is
computed, not stored (QTIP's "compute-based codes" without their hash).

QTIP makes its sequences tail-biting; here a sequence starts from the all-zero
history instead, which costs no bits and only narrows the first ``L / k - 1``
steps' choices, and leaves the encoder exact.
"""

from __future__ import annotations

import math

import torch

STATE_BITS = 12  # L: a multiple of 2, 3 and 4, so a state is a whole number of symbols (and fits an int16)
ERROR_STEPS = 16  # steps whose squared errors against every state are made at once (B x 16 x 2^L floats)


def code_table(state_bits: int = STATE_BITS, device: torch.device | str = "cpu") -> torch.Tensor:
    """``table[s]`` for every state ``s`` (float32, ``[2^L]``), made on ``device``."""
    size = 1 << state_bits
    multiplier = int((math.sqrt(5) - 1) / 2 * size) | 1
    states = torch.arange(size, dtype=torch.int64, device=device)
    position = (states * multiplier) % size
    return torch.special.ndtri((position.double() + 0.5) / size).float()


def viterbi_encode(x: torch.Tensor, bits: int, table: torch.Tensor) -> torch.Tensor:
    """The symbols (int64 ``[B, T]``, each in ``[0, 2^bits)``) whose decoding is nearest ``x`` ``[B, T]`` in
    squared error, for each of the ``B`` sequences.

    States are ``[top k bits | middle L - k | newest k]``; a state's predecessors share its top ``L - k`` bits
    as their low ones, so the best way into every state is a minimum over ``2^k`` predecessors, computed for all
    states of all sequences at once, one step at a time.
    """
    state_bits = int(math.log2(table.numel()))
    batch, steps = x.shape
    fan, middle = 1 << bits, 1 << (state_bits - bits)
    cost = torch.full((batch, fan * middle), math.inf, device=x.device)
    cost[:, 0] = 0.0  # the all-zero history
    back = torch.empty(steps, batch, middle, dtype=torch.uint8, device=x.device)
    values = table.to(device=x.device, dtype=torch.float32)
    x = x.float()
    for t0 in range(0, steps, ERROR_STEPS):  # the squared errors of a few steps at once: fewer, larger kernels
        errors = (x[:, t0 : t0 + ERROR_STEPS, None] - values).square_().view(batch, -1, middle, fan)
        for t in range(t0, min(t0 + ERROR_STEPS, steps)):
            best, back[t] = cost.view(batch, fan, middle).min(dim=1)  # over the top k bits of the previous state
            cost = (errors[:, t - t0] + best[:, :, None]).view(batch, -1)
    # the predecessor of each state, as a whole state: top bits from the pass, the rest from the state itself
    previous = (back.to(torch.int16) << (state_bits - bits)) | torch.arange(middle, dtype=torch.int16, device=x.device)
    del back
    state = cost.argmin(dim=1)
    symbols = []
    for t in reversed(range(steps)):
        symbols.append(state & (fan - 1))
        state = previous[t].gather(1, (state >> bits)[:, None])[:, 0].long()
    return torch.stack(symbols[::-1], dim=1)


def trellis_decode(symbols: torch.Tensor, bits: int, table: torch.Tensor, period: int | None = None) -> torch.Tensor:
    """``table[state]`` for every symbol of ``symbols`` ``[..., T]`` (float32).  With ``period``, the last axis
    holds several sequences of ``period`` symbols back to back (the last may be shorter), each from a zero
    history."""
    state_bits = int(math.log2(table.numel()))
    window, steps = state_bits // bits, symbols.shape[-1]
    position = torch.arange(steps, device=symbols.device) % (period or steps)
    symbols = symbols.long()
    state = symbols.clone()
    for back in range(1, window):
        earlier = torch.nn.functional.pad(symbols[..., :-back], (back, 0))
        state |= torch.where(position >= back, earlier, 0) << (bits * back)
    return table.to(symbols.device)[state]


def pack_symbols(symbols: torch.Tensor, bits: int) -> torch.Tensor:
    """Symbols ``[..., 8]`` of ``bits`` bits -> ``bits`` bytes per 8 (uint8 ``[..., bits]``), little-endian."""
    shifts = torch.arange(8, device=symbols.device) * bits
    word = (symbols.long() << shifts).sum(-1)  # at most 32 bits
    return ((word[..., None] >> (torch.arange(bits, device=symbols.device) * 8)) & 0xFF).to(torch.uint8)


def unpack_symbols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_symbols`: int64 ``[..., 8]``."""
    word = (packed.long() << (torch.arange(bits, device=packed.device) * 8)).sum(-1)
    return (word[..., None] >> (torch.arange(8, device=packed.device) * bits)) & ((1 << bits) - 1)
