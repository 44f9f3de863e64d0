"""QTIP: the trellis encoder against brute force, its storage, and the quantizer against QuIP#'s lattice codes."""

from __future__ import annotations

import itertools

import pytest
import torch

from conftest import layer_stats
from engine.errors import EngineError
from engine.quant import LayerStats, make_quantizer, weight_from_state
from engine.quant.qtip import TILE_ROWS, TrellisWeight
from engine.quant.quip import STAGES, rvq_encode
from engine.quant.trellis import code_table, pack_symbols, trellis_decode, unpack_symbols, viterbi_encode


@pytest.mark.parametrize(("bits", "state_bits", "steps"), [(2, 6, 5), (3, 6, 4), (2, 4, 6)])
def test_viterbi_finds_the_best_of_every_symbol_stream(bits, state_bits, steps):
    """The encoder's squared error equals the minimum over all 2^(bits x steps) streams, each decoded."""
    table = code_table(state_bits)
    x = torch.randn(3, steps, generator=torch.Generator().manual_seed(bits + steps), dtype=torch.float64)
    streams = torch.tensor(list(itertools.product(range(1 << bits), repeat=steps)))
    every = trellis_decode(streams, bits, table).double()  # [streams, steps]
    brute = ((every[None] - x[:, None]) ** 2).sum(-1).min(dim=1).values
    symbols = viterbi_encode(x, bits, table)
    found = ((trellis_decode(symbols, bits, table).double() - x) ** 2).sum(-1)
    torch.testing.assert_close(found, brute, rtol=1e-6, atol=1e-9)


def test_a_state_is_its_last_symbols_and_sequences_start_from_zero():
    """Decoding by hand: the state is the newest L / k symbols, newest in the low bits, zeros before a start."""
    table = torch.arange(64, dtype=torch.float32)  # table[s] = s: the decoded value is the state itself
    symbols = torch.tensor([1, 2, 3, 0, 3, 1])
    want = [1, 2 + 4, 3 + 8 + 16, 0 + 12 + 32, 3 + 0 + 48, 1 + 12 + 0]
    assert trellis_decode(symbols, 2, table).tolist() == want
    # two sequences of 3 back to back: the second starts from a zero history
    assert trellis_decode(symbols, 2, table, period=3).tolist() == [1, 6, 27, 0, 3, 1 + 12]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_symbols_pack_into_bits_bytes_per_eight_and_back(bits):
    symbols = torch.randint(0, 1 << bits, (5, 7, 8), generator=torch.Generator().manual_seed(bits))
    packed = pack_symbols(symbols, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 7, bits)
    assert torch.equal(unpack_symbols(packed, bits), symbols)


def test_trellis_codes_beat_e8p_on_gaussian_data_at_three_bits():
    """The module's claim: on unit Gaussian data at 3 bits, the trellis's mean squared error is well below that of
    QuIP#'s E8P with a residual E8 stage, each at its best scale of those tried."""
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    table = code_table()

    def trellis(scale: float) -> float:
        return ((trellis_decode(viterbi_encode(x / scale, 3, table), 3, table) * scale - x) ** 2).mean().item()

    def lattice(scale: float) -> float:
        return ((rvq_encode((x / scale).reshape(-1, 8), STAGES[3])[1].reshape(x.shape) * scale - x) ** 2).mean().item()

    best_trellis = min(trellis(s) for s in (1.0, 1.1))
    best_lattice = min(lattice(s) for s in (0.95, 1.05, 1.15))
    assert best_trellis < 0.7 * best_lattice, (best_trellis, best_lattice)


def _correlated_stats(n: int, seed: int) -> LayerStats:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * n, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    return LayerStats(x.T @ x, 4 * n)


def _proxy_loss(w: torch.Tensor, qweight, stats: LayerStats) -> float:
    error = (w - qweight.dequantize(torch.float64)).double()
    return torch.trace(error @ stats.hessian @ error.T).item()


@pytest.mark.parametrize("bits", [3, 4])
def test_qtip_rounds_a_layer_closer_than_quip_at_the_same_bits(bits):
    """The proxy loss tr(E H Eᵀ) of QTIP against QuIP#'s, same incoherence, same layer and Hessian."""
    w = 0.05 * torch.randn(70, 48, generator=torch.Generator().manual_seed(3))
    stats = _correlated_stats(48, bits)
    qtip = make_quantizer("qtip", bits=bits).quantize(w, stats)
    quip = make_quantizer("quip", bits=bits).quantize(w, stats)
    assert _proxy_loss(w, qtip, stats) < 0.85 * _proxy_loss(w, quip, stats)


def test_stored_bits_rows_and_reload():
    """``bits`` bits per weight in the codes; any row slice equals the same rows of the whole decode; the state
    dict and config rebuild the same weight, and a layout this version cannot read is one line."""
    w = 0.05 * torch.randn(2 * TILE_ROWS + 7, 40, generator=torch.Generator().manual_seed(4))
    qweight = make_quantizer("qtip", bits=3, tune_iters=0).quantize(w, layer_stats(40))
    assert isinstance(qweight, TrellisWeight) and qweight.in_padded % 8 == 0
    assert qweight.codes.numel() * 8 == 3 * w.shape[0] * qweight.in_padded
    whole = qweight.rotated()
    for r0, r1 in ((0, 71), (5, 40), (33, 34), (64, 71)):
        assert torch.equal(qweight.rotated(slice(r0, r1)), whole[r0:r1])
    manifest = {"format": qweight.format_name, **qweight.config()}
    again = weight_from_state(dict(qweight.state_dict()), manifest)
    assert torch.equal(again.dequantize(), qweight.dequantize())
    with pytest.raises(EngineError, match="unsupported layout"):
        weight_from_state(dict(qweight.state_dict()), {**manifest, "state_bits": 16})
