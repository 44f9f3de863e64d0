"""Dense bit packing of integer codes along the last dimension.

A row of ``n`` codes of ``b`` bits becomes a little-endian bit stream in ``uint8``
bytes.  Codes are grouped into *chunks* of ``lcm(b, 8) / b`` values that fill
``lcm(b, 8) / 8`` whole bytes (2 bits: 4 codes per byte; 3 bits: 8 codes in 3
bytes, so codes cross byte boundaries; 4 bits: 2 per byte; 8 bits: 1 per byte).
Rows are padded with zero codes to a whole chunk, so every row starts on a byte
boundary and column tiles can be unpacked chunk by chunk.  All operations are
vectorised torch ops and run on any device; unpacking spreads each chunk's codes
into the bytes of one integer word with a few whole-tensor bit operations.
"""

from __future__ import annotations

import math
import sys

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


# bits -> (word dtype, steps): unpacking one chunk's codes into the bytes of one integer word.  Each step
# (keep, move, shift) keeps the low fields of every lane and moves the high ones up by ``shift`` bits,
# halving the fields per lane; after the last step field k sits in byte k, so on a little-endian host
# the word *is* the chunk's codes as uint8.  Three steps spread 3-bit codes from 24 bits into 64.
SPREAD: dict[int, tuple[torch.dtype, tuple[tuple[int, int, int], ...]]] = {
    4: (torch.int16, ((0x000F, 0x00F0, 4),)),
    2: (torch.int32, ((0x0000000F, 0x000000F0, 12), (0x00030003, 0x000C000C, 6))),
    3: (torch.int64, ((0x0000000000000FFF, 0x0000000000FFF000, 20),
                      (0x0000003F0000003F, 0x00000FC000000FC0, 10),
                      (0x0007000700070007, 0x0038003800380038, 5))),
}
LITTLE_ENDIAN = sys.byteorder == "little"


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``n`` codes of each row, as ``uint8``."""
    per_chunk, chunk_bytes = chunk_layout(bits)
    *lead, n_bytes = packed.shape
    n_chunks = n_bytes // chunk_bytes
    if per_chunk == 1:
        codes = packed
    elif LITTLE_ENDIAN:
        codes = _spread(_chunk_words(packed, bits), bits).view(torch.uint8)
    else:
        codes = _unpack_shifts(packed, bits)
    return codes.reshape(*lead, n_chunks * per_chunk)[..., :n]


def _chunk_words(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Each chunk's bytes as one little-endian integer of the spreading dtype (``[..., n_chunks]``)."""
    _, chunk_bytes = chunk_layout(bits)
    dtype = SPREAD[bits][0]
    if chunk_bytes == 1:
        return packed.to(dtype, memory_format=torch.contiguous_format)
    grouped = packed.view(*packed.shape[:-1], packed.shape[-1] // chunk_bytes, chunk_bytes)
    words = grouped[..., 0].to(dtype, memory_format=torch.contiguous_format)  # the word views its bytes later
    for k in range(1, chunk_bytes):
        words.bitwise_or_(grouped[..., k].to(dtype).bitwise_left_shift_(8 * k))
    return words


def _spread(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Field k of every chunk word moved to byte k (see ``SPREAD``); in place on ``words``."""
    for keep, move, shift in SPREAD[bits][1]:
        moved = (words & move).bitwise_left_shift_(shift)
        words = words.bitwise_and_(keep).bitwise_or_(moved)
    return words


def _unpack_shifts(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Portable unpacking (any byte order): one scalar shift per code position, stacked."""
    per_chunk, chunk_bytes = chunk_layout(bits)
    *lead, n_bytes = packed.shape
    mask = (1 << bits) - 1
    if chunk_bytes == 1:
        words = packed
    else:  # 3 bits: 8 codes in 3 bytes, read as one little-endian 24-bit word
        grouped = packed.view(*lead, n_bytes // chunk_bytes, chunk_bytes)
        words = grouped[..., 0].to(torch.int32)
        for k in range(1, chunk_bytes):
            words = words.bitwise_or_(grouped[..., k].to(torch.int32) << (8 * k))
    fields = [(words >> (bits * k)).bitwise_and_(mask).to(torch.uint8) for k in range(per_chunk)]
    return torch.stack(fields, dim=-1)


def unpack_columns(packed: torch.Tensor, bits: int, start: int, stop: int) -> torch.Tensor:
    """Codes ``[start, stop)`` of each row, unpacking only the chunks that hold them."""
    per_chunk, chunk_bytes = chunk_layout(bits)
    first, last = start // per_chunk, -(-stop // per_chunk)
    window = packed[..., first * chunk_bytes : last * chunk_bytes]
    offset = start - first * per_chunk
    return unpack(window.contiguous(), bits, offset + (stop - start))[..., offset:]
