"""Bit packing: round trips on ragged shapes, the exact bit layout, column tiles."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.quant.packing import SUPPORTED_BITS, pack, packed_length, unpack, unpack_columns

shapes = st.tuples(st.integers(1, 7), st.integers(1, 300))


def random_codes(rows: int, cols: int, bits: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, (rows, cols), generator=gen, dtype=torch.int64)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, bits=st.sampled_from(SUPPORTED_BITS), seed=st.integers(0, 2**31))
def test_round_trip_ragged(shape, bits, seed):
    codes = random_codes(*shape, bits, seed)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (shape[0], packed_length(shape[1], bits))
    assert torch.equal(unpack(packed, bits, shape[1]).long(), codes)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, bits=st.sampled_from(SUPPORTED_BITS), seed=st.integers(0, 2**31), data=st.data())
def test_column_tiles(shape, bits, seed, data):
    codes = random_codes(*shape, bits, seed)
    start = data.draw(st.integers(0, shape[1] - 1))
    stop = data.draw(st.integers(start + 1, shape[1]))
    tile = unpack_columns(pack(codes, bits), bits, start, stop)
    assert torch.equal(tile.long(), codes[:, start:stop])


def reference_bitstream(codes: torch.Tensor, bits: int) -> bytes:
    """Little-endian bit stream built one bit at a time (independent of the vectorised packer)."""
    stream = []
    for value in codes.tolist():
        stream.extend((value >> k) & 1 for k in range(bits))
    stream.extend([0] * (-len(stream) % 8))
    return bytes(sum(bit << k for k, bit in enumerate(stream[i : i + 8])) for i in range(0, len(stream), 8))


def test_layout_matches_bit_by_bit_reference():
    for bits in SUPPORTED_BITS:
        codes = random_codes(1, 172, bits, bits)[0]
        packed = pack(codes.unsqueeze(0), bits)[0]
        expected = reference_bitstream(codes, bits)
        assert bytes(packed.tolist())[: len(expected)] == expected


def test_three_bit_codes_cross_byte_boundaries():
    codes = torch.tensor([[7, 7, 7, 0, 0, 0, 0, 0]])
    # bits 0-8 set: the third code straddles bytes 0 and 1
    assert pack(codes, 3).tolist() == [[0xFF, 0x01, 0x00]]


def test_storage_is_dense():
    for bits in SUPPORTED_BITS:
        assert packed_length(4096, bits) * 8 == 4096 * bits


def test_portable_unpacking_matches_the_fast_path():
    """The shift-and-stack path (used on big-endian hosts) gives the same codes as word spreading."""
    from engine.quant.packing import _unpack_shifts

    for bits in SUPPORTED_BITS:
        codes = random_codes(3, 203, bits, bits)
        packed = pack(codes, bits)
        portable = _unpack_shifts(packed, bits).reshape(3, -1)[:, :203]
        assert torch.equal(portable, unpack(packed, bits, 203))
        assert torch.equal(portable.long(), codes)
