"""OPTQ against independent references: RTN for a diagonal Hessian, a plain float64 OBS loop, RTN's error."""

from __future__ import annotations

import pytest
import torch

from engine.errors import EngineError
from engine.quant import LayerStats, OPTQQuantizer, RTNQuantizer, make_quantizer, weight_from_state
from engine.quant.groupwise import range_params, unpacked_codes
from engine.quant.optq import CLIP_SHRINKS, searched_ranges

PLAIN = {"act_order": False, "clip_search": False}  # OPTQ as published; each test turns on what it tests


def optq(bits: int = 4, group: int = 32, symmetric: bool = False, **options) -> OPTQQuantizer:
    return OPTQQuantizer(bits=bits, group_size=group, symmetric=symmetric, **(PLAIN | options))


SHAPES = [((24, 172), 32), ((16, 172), -1), ((12, 64), 64), ((10, 100), 48), ((8, 172), 7)]


def correlated_stats(n_in: int, seed: int, rows: int = 2048) -> LayerStats:
    """Statistics of strongly correlated inputs (a few latent directions plus noise) with uneven scales,
    like real activations."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(rows, n_in // 4, generator=g, dtype=torch.float64)
    x = latent @ torch.randn(n_in // 4, n_in, generator=g, dtype=torch.float64)
    x = (x + 0.3 * torch.randn(rows, n_in, generator=g, dtype=torch.float64)) * (torch.rand(n_in, generator=g) + 0.1)
    return LayerStats(x.T @ x, rows)


def output_error(weight: torch.Tensor, dense: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr((W - Q) H (W - Q)^T)``: the layer's expected squared output error, the quantity OPTQ minimizes."""
    delta = weight.double() - dense.double()
    return torch.einsum("ri,ij,rj->", delta, hessian, delta).item()


def reference_optq(w: torch.Tensor, hessian: torch.Tensor, bits: int, group: int, damp: float) -> torch.Tensor:
    """Dequantized OPTQ weight from the OBS update with an explicit inverse Hessian, in float64.

    One column at a time, no Cholesky factor, no lazy blocks: after rounding column
    ``i``, the remaining columns move by ``-err * Hinv[i, F] / Hinv[i, i]`` and
    column ``i`` is eliminated from ``Hinv`` (Frantar et al., eq. 2-3).
    """
    w = w.double().clone()
    n = w.shape[1]
    h = hessian.double().clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    hinv = torch.linalg.inv(h)
    out = torch.empty_like(w)
    for i in range(n):
        if i % group == 0:
            scale, zero = range_params(w[:, i : i + group].amin(1), w[:, i : i + group].amax(1), bits, False)
            scale, zero = scale.double(), zero.double()
        q = torch.clamp(torch.round(w[:, i] / scale) + zero, 0, 2**bits - 1)
        out[:, i] = scale * (q - zero)
        err = (w[:, i] - out[:, i]) / hinv[i, i]
        w[:, i:] -= err[:, None] * hinv[i, i:][None, :]
        hinv -= torch.outer(hinv[:, i], hinv[i, :]) / hinv[i, i]
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("shape,group", SHAPES)
def test_diagonal_hessian_reduces_to_rtn(bits, symmetric, shape, group):
    """With uncorrelated inputs no error is worth spreading: OPTQ must give RTN's codes and scales exactly."""
    g = torch.Generator().manual_seed(bits + 10 * shape[1])
    w = torch.randn(*shape, generator=g)
    stats = LayerStats(torch.diag(torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.05), 100)
    rtn = RTNQuantizer(bits=bits, group_size=group, symmetric=symmetric).quantize(w)
    variants = [{}, {"act_order": True, "static_groups": True}, {"block_size": 5}]
    for options in variants:
        q = optq(bits, group, symmetric, **options).quantize(w, stats)
        assert torch.equal(unpacked_codes(q), unpacked_codes(rtn)), options
        assert torch.equal(q.scales, rtn.scales), options
        assert symmetric or torch.equal(q.zeros, rtn.zeros), options
        assert not hasattr(q, "perm")


def test_clip_search_with_diagonal_hessian_is_independent_rounding():
    """With clip search on, a diagonal Hessian still just rounds each group against its searched range."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(20, 172, generator=g)
    diag = torch.rand(172, generator=g, dtype=torch.float64) + 0.05
    q = optq(3, 32, clip_search=True).quantize(w, LayerStats(torch.diag(diag), 100))
    for c0 in range(0, 172, 32):
        scale, zero = searched_ranges(w[:, c0 : c0 + 32], diag[c0 : c0 + 32].float(), 3, False, CLIP_SHRINKS)
        assert torch.equal(q.scales[:, c0 // 32].float(), scale)
        codes = torch.clamp(torch.round(w[:, c0 : c0 + 32] / scale[:, None]) + zero[:, None], 0, 7)
        assert torch.equal(unpacked_codes(q)[:, c0 : c0 + 32].float(), codes)


@pytest.mark.parametrize(("rows", "cols"), [(37, 64), (3000, 64), (200, 33)])
def test_clip_search_picks_each_row_s_first_least_error_shrink(rows, cols):
    """Against the search written out one candidate at a time: every shrink's range, its rounding, the
    importance-weighted error, and the first shrink with the least error per row (ties included: rows of equal
    values).  The shapes try all candidates in one batch, many batches, and a batch that ends short."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[::5, 3] *= 30.0  # outliers worth clipping
    w[1::7] = 0.01  # flat rows: every shrink gives the same error
    importance = torch.rand(cols, generator=g) + 0.1
    errors, params = [], []
    for shrink in CLIP_SHRINKS:
        scale, zero = range_params(shrink * w.amin(dim=1), shrink * w.amax(dim=1), 3, False)
        codes = torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, 7)
        errors.append(((w - scale[:, None] * (codes - zero[:, None])) ** 2 * importance).sum(dim=1))
        params.append((scale, zero))
    first = torch.stack(errors).argmin(dim=0)  # torch's argmin gives the first minimum
    scale, zero = searched_ranges(w, importance, 3, False, CLIP_SHRINKS)
    assert torch.equal(scale, torch.stack([params[k][0][r] for r, k in enumerate(first.tolist())]))
    assert torch.equal(zero, torch.stack([params[k][1][r] for r, k in enumerate(first.tolist())]))
    assert (first > 0).any() and (first == 0).any()  # some rows clipped, some not


@pytest.mark.parametrize("block_size", [1, 16, 128])
@pytest.mark.parametrize("group", [32, 48, -1])
def test_matches_float64_obs_reference(block_size, group):
    """Lazy blocks and the Cholesky form change nothing but float rounding."""
    w = torch.randn(32, 172, generator=torch.Generator().manual_seed(3))
    stats = correlated_stats(172, seed=4)
    q = optq(3, group, block_size=block_size).quantize(w, stats)
    expected = reference_optq(w, stats.hessian, 3, 172 if group == -1 else group, 0.01)
    dense = q.dequantize(torch.float64)
    # a float32 tie can flip one code and nudge later columns; the bulk must agree exactly
    assert (dense - expected).abs().le(1e-4).float().mean() > 0.97
    assert output_error(w, dense, stats.hessian) == pytest.approx(
        output_error(w, expected, stats.hessian), rel=0.02
    )


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize(
    "options",
    [{}, {"act_order": True}, {"act_order": True, "static_groups": True}, {"static_groups": True}, {"clip_search": True}],
)
@pytest.mark.parametrize("group", [32, -1])
def test_lower_output_error_than_rtn(bits, options, group):
    w = torch.randn(48, 172, generator=torch.Generator().manual_seed(bits))
    stats = correlated_stats(172, seed=bits + 1)
    rtn = output_error(w, RTNQuantizer(bits=bits, group_size=group).quantize(w).dequantize(), stats.hessian)
    error = output_error(w, optq(bits, group, **options).quantize(w, stats).dequantize(), stats.hessian)
    assert error < 0.5 * rtn


def test_act_order_is_stored_as_a_permutation_and_round_trips():
    w = torch.randn(16, 172, generator=torch.Generator().manual_seed(5))
    stats = correlated_stats(172, seed=6)
    q = optq(4, 32, act_order=True).quantize(w, stats)
    expected_perm = torch.argsort(stats.hessian.diagonal(), descending=True, stable=True)
    assert torch.equal(q.perm.long(), expected_perm)
    assert q.manifest()["act_order"] is True
    again = weight_from_state(q.state_dict(), q.manifest())
    assert torch.equal(again.dequantize(), q.dequantize())
    assert torch.equal(again.dequantize(cols=(30, 100)), q.dequantize()[:, 30:100])


def test_dead_inputs_get_zero_weights():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(7))
    stats = correlated_stats(64, seed=8)
    dead = [0, 5, 63]
    stats.xtx[dead, :] = 0
    stats.xtx[:, dead] = 0
    for options in [{}, {"act_order": True}]:
        dense = optq(3, 32, **options).quantize(w, stats).dequantize()
        assert torch.isfinite(dense).all()
        assert torch.all(dense[:, dead] == 0)


def test_bad_input_is_a_one_line_error():
    w = torch.randn(4, 64)
    with pytest.raises(EngineError, match="needs calibration statistics"):
        optq().quantize(w)
    with pytest.raises(EngineError, match=r"layer needs \(64, 64\)"):
        optq().quantize(w, LayerStats(torch.eye(32, dtype=torch.float64), 1))
    with pytest.raises(EngineError, match="not positive definite"):
        optq(damp=0).quantize(w, LayerStats(-torch.eye(64, dtype=torch.float64), 1))
    for options in [{"damp": -1.0}, {"block_size": 0}, {"bits": 5}]:
        with pytest.raises(EngineError) as info:
            make_quantizer("optq", **options)
        assert "\n" not in str(info.value)
    assert make_quantizer("optq").needs_calibration


def test_a_layer_no_calibration_row_reached_is_rounded_to_nearest():
    """An expert the router sent no calibration token to has empty statistics (count 0, merged away across
    shards): it is quantized as RTN would (not zeroed as dead inputs are), and a shard that saw rows wins a merge."""
    from engine.model import quantize_model

    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(5))
    layer = torch.nn.Sequential(torch.nn.Linear(64, 16, bias=False))
    layer[0].weight.data = w.clone()
    empty = LayerStats(torch.empty(0), 0)
    seen = LayerStats(torch.eye(64, dtype=torch.float64), 3)
    assert empty.merge(seen) is seen and seen.merge(empty) is seen
    quantize_model(layer, optq(3, 32, False), ["0"], {"0": empty})
    rtn = RTNQuantizer(bits=3, group_size=32).quantize(w)
    assert torch.equal(unpacked_codes(layer[0].base), unpacked_codes(rtn))
    assert torch.equal(layer[0].base.scales, rtn.scales) and torch.equal(layer[0].base.zeros, rtn.zeros)
