"""Round-to-nearest against a per-group float64 reference, tiles, sizes and serialisation."""

from __future__ import annotations

import pytest
import torch

from engine.errors import EngineError
from engine.quant import GroupQuantizedWeight, RTNQuantizer, make_quantizer, weight_from_state
from engine.quant.packing import packed_length, unpack


def reference_rtn(w: torch.Tensor, bits: int, group: int, symmetric: bool) -> torch.Tensor:
    """Dequantized RTN weight, one group at a time, written straight from the definition."""
    maxq = 2**bits - 1
    out = torch.empty_like(w, dtype=torch.float64)
    for r in range(w.shape[0]):
        for c0 in range(0, w.shape[1], group):
            x = w[r, c0 : c0 + group].double()
            lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
            if symmetric:
                hi = max(-lo, hi)
                lo = -hi
            if lo == hi == 0:
                lo, hi = -1.0, 1.0
            scale = float(torch.tensor((hi - lo) / maxq).half())
            zero = 2 ** (bits - 1) if symmetric else min(max(round(-lo / scale), 0), maxq)
            q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
            out[r, c0 : c0 + group] = scale * (q - zero)
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("shape,group", [((12, 172), 32), ((5, 64), 64), ((7, 100), -1), ((3, 40), 7)])
def test_matches_reference(bits, symmetric, shape, group):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(bits * 7 + len(shape)))
    q = RTNQuantizer(bits=bits, group_size=group, symmetric=symmetric).quantize(w)
    g = shape[1] if group == -1 else group
    expected = reference_rtn(w, bits, g, symmetric)
    # float32 vs float64 division can flip an exact .5 tie; allow a handful of one-step differences
    diff = (q.dequantize(torch.float64) - expected).abs()
    assert (diff > 1e-6).float().mean() < 2e-3


@pytest.mark.parametrize("seed", range(8))
def test_zero_is_exact_and_error_bounded(seed):
    w = torch.randn(64, 172, generator=torch.Generator().manual_seed(seed))
    w[:, :5] = 0
    q = RTNQuantizer(bits=3, group_size=32).quantize(w)
    dense = q.dequantize()
    assert torch.all(dense[:, :5] == 0)
    scale_cols = q.scales.float().repeat_interleave(32, 1)[:, :172]
    # The fp16 scale can be up to 2**-11 short of range/7, so a clamped end of the range may
    # miss by 7 * 2**-11 scale on top of the half step.
    assert torch.all((dense - w).abs() <= scale_cols * (0.5 + 7 * 2**-11) + 1e-6)


def test_tiles_equal_slices_of_whole():
    w = torch.randn(50, 172)
    q = RTNQuantizer(bits=3, group_size=32).quantize(w)
    whole = q.dequantize()
    for rows, cols in [((0, 50), (0, 172)), ((3, 17), (5, 171)), ((49, 50), (160, 172)), ((10, 20), (33, 34))]:
        assert torch.equal(q.dequantize(rows=rows, cols=cols), whole[rows[0] : rows[1], cols[0] : cols[1]])


def test_permuted_storage_dequantizes_in_original_order():
    w = torch.randn(8, 172)
    perm = torch.randperm(172, generator=torch.Generator().manual_seed(0))
    stored = RTNQuantizer(bits=4, group_size=32).quantize(w[:, perm])
    permuted = GroupQuantizedWeight(
        unpack(stored.codes, 4, 172),
        stored.scales,
        unpack(stored.zeros, 4, 8 * stored.n_groups).view(8, -1),
        bits=4,
        group_size=32,
        in_features=172,
        perm=perm,
    )
    expected = torch.empty_like(w)
    expected[:, perm] = stored.dequantize()
    assert torch.equal(permuted.dequantize(), expected)
    assert torch.equal(permuted.dequantize(cols=(10, 90)), expected[:, 10:90])
    again = weight_from_state(permuted.state_dict(), permuted.manifest())
    assert torch.equal(again.dequantize(), expected)


@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, False), (3, 64, True), (2, -1, False)])
def test_size_accounting_and_round_trip(bits, group, symmetric):
    w = torch.randn(96, 172)
    q = RTNQuantizer(bits=bits, group_size=group, symmetric=symmetric).quantize(w)
    n_groups = 1 if group == -1 else -(-172 // group)
    zero_bytes = 0 if symmetric else packed_length(96 * n_groups, bits)
    expected = 96 * packed_length(172, bits) + 96 * n_groups * 2 + zero_bytes  # codes + fp16 scales + zeros
    assert q.nbytes == expected
    assert q.bits_per_weight == pytest.approx(8 * expected / (96 * 172))
    again = weight_from_state(q.state_dict(), q.manifest())
    assert torch.equal(again.dequantize(), q.dequantize())


@pytest.mark.parametrize("options", [{"bits": 5}, {"bits": 4, "group_size": 0}, {"bits": 4, "group_size": -3}])
def test_bad_settings_raise_one_line_errors(options):
    with pytest.raises(EngineError) as info:
        make_quantizer("rtn", **options)
    assert "\n" not in str(info.value)
    with pytest.raises(EngineError, match="unknown quantization method 'nope'"):
        make_quantizer("nope")
