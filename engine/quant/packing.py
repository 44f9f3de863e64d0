"""Dense bit packing of integer codes along the last dimension.

A row of ``n`` codes of ``b`` bits becomes a little-endian bit stream in ``uint8``
bytes.  Codes are grouped into *chunks* of ``lcm(b, 8) / b`` values that fill
``lcm(b, 8) / 8`` whole bytes (2 bits: 4 codes per byte; 3 bits: 8 codes in 3
bytes, so codes cross byte boundaries; 4 bits: 2 per byte; 8 bits: 1 per byte).
Rows are padded with zero codes to a whole chunk, so every row starts on a byte
boundary and column tiles can be unpacked chunk by chunk.  All operations are
vectorised torch ops and run on any device.
"""

from __future__ import annotations

import math

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
# bits -> (codes per chunk, bytes per chunk): a chunk is lcm(bits, 8) bits (a table, not math.lcm,
# so that torch.compile traces the unpacking without a graph break)
CHUNK_LAYOUT = {bits: (math.lcm(bits, 8) // bits, math.lcm(bits, 8) // 8) for bits in SUPPORTED_BITS}


def chunk_layout(bits: int) -> tuple[int, int]:
    """(codes per chunk, bytes per chunk) for a bit width."""
    if bits not in CHUNK_LAYOUT:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    return CHUNK_LAYOUT[bits]


def packed_length(n: int, bits: int) -> int:
    """Bytes one packed row of ``n`` codes occupies."""
    per_chunk, chunk_bytes = chunk_layout(bits)
    return -(-n // per_chunk) * chunk_bytes


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` along the last dim into ``uint8``."""
    per_chunk, chunk_bytes = chunk_layout(bits)
    *lead, n = codes.shape
    n_chunks = -(-n // per_chunk)
    padded = torch.zeros(*lead, n_chunks * per_chunk, dtype=torch.int32, device=codes.device)
    padded[..., :n] = codes.to(torch.int32)
    chunks = padded.view(*lead, n_chunks, per_chunk)
    shifts = torch.arange(per_chunk, device=codes.device, dtype=torch.int32) * bits
    words = (chunks << shifts).sum(-1, dtype=torch.int32)
    byte_shifts = torch.arange(chunk_bytes, device=codes.device, dtype=torch.int32) * 8
    out = (words.unsqueeze(-1) >> byte_shifts) & 0xFF
    return out.to(torch.uint8).reshape(*lead, n_chunks * chunk_bytes)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``n`` codes of each row, as ``uint8``."""
    per_chunk, chunk_bytes = chunk_layout(bits)
    *lead, n_bytes = packed.shape
    n_chunks = n_bytes // chunk_bytes
    mask = (1 << bits) - 1
    if chunk_bytes == 1:  # 2, 4, 8 bits: whole bytes, no widening
        words = packed
    else:  # 3 bits: 8 codes in 3 bytes, read as one little-endian 24-bit word
        grouped = packed.view(*lead, n_chunks, chunk_bytes)
        words = grouped[..., 0].to(torch.int32)
        for k in range(1, chunk_bytes):
            words = words.bitwise_or_(grouped[..., k].to(torch.int32) << (8 * k))
    # one scalar shift per code position: much faster than a broadcast shift on CPU
    fields = [(words >> (bits * k)).bitwise_and_(mask).to(torch.uint8) for k in range(per_chunk)]
    codes = torch.stack(fields, dim=-1) if per_chunk > 1 else fields[0]
    return codes.reshape(*lead, n_chunks * per_chunk)[..., :n]


def unpack_columns(packed: torch.Tensor, bits: int, start: int, stop: int) -> torch.Tensor:
    """Codes ``[start, stop)`` of each row, unpacking only the chunks that hold them."""
    per_chunk, chunk_bytes = chunk_layout(bits)
    first, last = start // per_chunk, -(-stop // per_chunk)
    window = packed[..., first * chunk_bytes : last * chunk_bytes]
    offset = start - first * per_chunk
    return unpack(window.contiguous(), bits, offset + (stop - start))[..., offset:]
