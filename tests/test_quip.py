"""QuIP#: Hadamard transforms, E8P codebook, block LDLQ, the packed format, and quality on the real model."""

from __future__ import annotations

import copy

import pytest
import torch

from engine.errors import EngineError
from engine.data import calibration_windows, read_text
from engine.eval import perplexity
from engine.model import load_quantized, quantize_calibrated, save_quantized
from engine.quant import LayerStats, QuipQuantizer, QuipWeight, make_quantizer, weight_from_state
from engine.quant.e8p import e8_ball, e8_ball_encode, e8p_decode, e8p_encode, source_set
from engine.quant.hadamard import RandomHadamard, fast_hadamard, hadamard_matrix, padded_size, random_signs
from engine.quant.quip import STAGES, block_ldl, ldlq, rotated_hessian, rvq_block_encoder, rvq_encode

from conftest import TRAIN_TXT

ALL_CODES = torch.arange(1 << 16)


def _in_e8(points: torch.Tensor) -> torch.Tensor:
    """E8 = D8 ∪ (D8 + 1/2): all-integer or all-half-integer coordinates with an even sum."""
    frac = points - points.floor()
    same_coset = (frac == 0).all(-1) | (frac == 0.5).all(-1)
    return same_coset & (points.sum(-1) % 2 == 0)


# --- Hadamard -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 4, 8, 12, 20, 24, 28, 36, 44, 60, 64, 76, 108, 176, 256])
def test_hadamard_matrices_satisfy_the_definition(n: int) -> None:
    h = hadamard_matrix(n)
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))
    x = torch.randn(5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    torch.testing.assert_close(fast_hadamard(x), x @ h.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(fast_hadamard(x, transpose=True), x @ h, rtol=0, atol=1e-12)


def test_sizes_without_hadamard_matrix_are_padded() -> None:
    assert padded_size(172, 8) == 176  # 172 = 4 * 43 has none here; 176 = 4 * 44 (Paley, q = 43)
    assert padded_size(64, 8) == 64 and padded_size(172) == 176 and padded_size(100, 8) == 104
    with pytest.raises(EngineError, match="no Hadamard matrix of order 172"):
        hadamard_matrix(172)


@pytest.mark.parametrize("n", [64, 172, 100, 13, 1])
def test_random_hadamard_is_an_exact_isometry(n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    t = RandomHadamard(n, random_signs(padded_size(n, 8), gen).double())
    eye = torch.eye(n, dtype=torch.float64)
    forward = t.forward(eye)  # rows: images of the basis vectors, [n, n_pad]
    torch.testing.assert_close(forward @ forward.T, eye, rtol=0, atol=1e-12)
    full = RandomHadamard(t.n_pad, t.signs).forward(torch.eye(t.n_pad, dtype=torch.float64))
    torch.testing.assert_close(full @ full.T, torch.eye(t.n_pad, dtype=torch.float64), rtol=0, atol=1e-12)
    x = torch.randn(7, n, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(t.inverse(t.forward(x)), x, rtol=0, atol=1e-12)
    dense_inverse = t.inverse(torch.eye(t.n_pad, dtype=torch.float64)).T  # Tᵀ restricted to the first n rows
    torch.testing.assert_close(t.inverse_rows(0, n, torch.float64), dense_inverse, rtol=0, atol=1e-12)


# --- E8P codebook -------------------------------------------------------------------------------


def test_e8p_source_set() -> None:
    src = source_set()
    norms = (src**2).sum(-1)
    assert src.shape == (256, 8) and len(src.unique(dim=0)) == 256
    assert bool(((src * 2) % 2 == 1).all()), "positive half-integers"
    assert int((norms <= 10).sum()) == 227 and bool((norms[227:] == 12).all())
    # the 227: every |x| for x in D8 + 1/2 with |x|^2 <= 10, by brute force over the coset
    halves = torch.cartesian_prod(*[torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5])] * 8)
    coset = halves[(halves.sum(-1) % 2 == 0) & ((halves**2).sum(-1) <= 10)]
    assert torch.equal(coset.abs().unique(dim=0), src[:227].unique(dim=0))


def test_e8p_codebook_is_65536_points_of_e8_plus_quarter() -> None:
    points = e8p_decode(ALL_CODES)
    assert len(points.unique(dim=0)) == 1 << 16
    assert bool(_in_e8(points - 0.25).all())
    some = torch.randperm(1 << 16, generator=torch.Generator().manual_seed(0))[:8192]
    assert torch.equal(e8p_encode(points[some]), some.int())  # a point encodes to itself


def test_e8p_encode_is_the_nearest_point_by_brute_force() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1500, 8, generator=gen) * torch.rand(1500, 1, generator=gen) * 2.5
    x[:500] = torch.randn(500, 8, generator=gen) * 5  # beyond the codebook, where the pruning bound is loose
    # and a few vectors take the full search
    grid = e8p_decode(ALL_CODES).double()
    brute = torch.cat([torch.cdist(part.double(), grid).argmin(-1) for part in x.split(250)])
    codes = e8p_encode(x).long()
    assert (codes == brute).float().mean() > 0.999  # ties aside, the very same point
    dist_enc = ((x.double() - grid[codes]) ** 2).sum(-1)
    dist_brute = ((x.double() - grid[brute]) ** 2).sum(-1)
    torch.testing.assert_close(dist_enc, dist_brute, rtol=0, atol=1e-5)


def test_one_bit_e8_ball() -> None:
    ball = e8_ball().double()
    assert len(ball.unique(dim=0)) == 256 and bool(_in_e8(ball).all())
    norms = (ball**2).sum(-1)
    assert int((norms <= 2).sum()) == 241 and int((norms == 4).sum()) == 15
    x = torch.randn(2000, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(e8_ball_encode(x).long(), torch.cdist(x.double(), ball).argmin(-1))


# --- LDLQ ---------------------------------------------------------------------------------------


def _spd(n: int, gen: torch.Generator) -> torch.Tensor:
    mix = torch.randn(n, n, dtype=torch.float64, generator=gen)
    x = torch.randn(4 * n, n, dtype=torch.float64, generator=gen) @ mix
    return x.T @ x / (4 * n) + 0.01 * torch.eye(n, dtype=torch.float64)


def test_block_ldl_factorizes_the_hessian() -> None:
    h = _spd(32, torch.Generator().manual_seed(2))
    lower = block_ldl(h)
    blocks = lower.view(4, 8, 4, 8)
    for i in range(4):
        assert torch.allclose(blocks[i, :, i, :], torch.eye(8, dtype=torch.float64), atol=1e-12)
        assert bool((blocks[i, :, i + 1 :, :] == 0).all())
    inv = torch.linalg.inv(lower)
    d = inv @ h @ inv.T  # must be block diagonal
    mask = torch.block_diag(*[torch.ones(8, 8, dtype=torch.bool)] * 4)
    assert d[~mask].abs().max() < 1e-9


@pytest.mark.parametrize("disposable", [False, True])
@pytest.mark.parametrize("n", [64, 172, 2100])
def test_rotated_hessian_is_the_dense_two_sided_transform(n: int, disposable: bool, monkeypatch) -> None:
    """``T H Tᵀ`` made in place, a slice at a time (slices of 512 here, so widths above it take several), against
    the dense float64 product with the Hadamard matrix, padding included; statistics handed over are used up (made
    into it when no padding widens them) and give the same bits."""
    monkeypatch.setattr("engine.quant.quip.ROTATE_ROWS", 512)
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(3 * n, n, dtype=torch.float64, generator=gen)
    stats = LayerStats(x.T @ x, 3 * n)
    n_pad = padded_size(n, 8)
    signs = random_signs(n_pad, gen).double()
    t = hadamard_matrix(n_pad).double() * signs / n_pad**0.5  # T = H diag(signs) / sqrt(n_pad)
    h_pad = torch.zeros(n_pad, n_pad, dtype=torch.float64)
    h_pad[:n, :n] = 2 * stats.xtx / stats.count
    got = rotated_hessian(stats, RandomHadamard(n, signs))
    torch.testing.assert_close(got, t @ h_pad @ t.T, rtol=0, atol=1e-9 * h_pad.abs().max().item())
    given = LayerStats(stats.xtx.clone(), stats.count, disposable=disposable)
    sums = given.xtx.data_ptr()
    again = rotated_hessian(given, RandomHadamard(n, signs))
    assert torch.equal(again, got)
    assert given.xtx.numel() == (0 if disposable else n * n)
    assert (again.data_ptr() == sums) == (disposable and n_pad == n)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_ldlq_with_diagonal_hessian_is_nearest_rounding(bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(24, 48, dtype=torch.float64, generator=gen)
    h = torch.diag(torch.rand(48, dtype=torch.float64, generator=gen) + 0.1)
    codes, rounded = ldlq(w, h, rvq_block_encoder(STAGES[bits]), tune_iters=3)
    nearest_codes, nearest = rvq_encode(w.view(24, 6, 8), STAGES[bits])
    for got, want in zip(codes.unbind(-1), nearest_codes):
        assert torch.equal(got, want)
    torch.testing.assert_close(rounded, nearest.view(24, 48).double())


def test_ldlq_beats_nearest_rounding_on_a_correlated_hessian() -> None:
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(32, 64, dtype=torch.float64, generator=gen)
    h = _spd(64, gen)

    def loss(rounded: torch.Tensor) -> float:
        e = w - rounded
        return torch.trace(e @ h @ e.T).item()

    nearest = rvq_encode(w.view(32, 8, 8), STAGES[2])[1].view(32, 64).double()
    plain = loss(ldlq(w, h, rvq_block_encoder(STAGES[2]))[1])
    tuned = loss(ldlq(w, h, rvq_block_encoder(STAGES[2]), tune_iters=5)[1])
    assert tuned <= plain < 0.8 * loss(nearest)


# --- the packed weight --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bits", "shape", "incoherence"),
    [
        (2, (64, 172), "input"),
        (3, (172, 64), "input"),
        (4, (40, 24), "input"),
        (2, (172, 64), "both"),
        (3, (64, 172), "both"),
    ],
)
def test_weight_round_trips_and_tiles(bits: int, shape: tuple[int, int], incoherence: str) -> None:
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(*shape, generator=gen) * 0.1
    x = torch.randn(512, shape[1], dtype=torch.float64, generator=gen)
    stats = LayerStats(x.T @ x, 512)
    qw = QuipQuantizer(bits=bits, incoherence=incoherence, tune_iters=1).quantize(w, stats)
    dense = qw.dequantize()
    assert dense.shape == w.shape and ((dense - w).norm() / w.norm()) < {2: 0.4, 3: 0.2, 4: 0.12}[bits]
    rebuilt = weight_from_state(dict(qw.state_dict()), qw.manifest())
    assert isinstance(rebuilt, QuipWeight) and torch.equal(rebuilt.dequantize(), dense)
    torch.testing.assert_close(qw.dequantize(rows=(3, 17)), dense[3:17], rtol=0, atol=1e-6)
    torch.testing.assert_close(qw.dequantize(cols=(5, 20)), dense[:, 5:20])
    assert qw.dequantize(torch.float16).dtype == torch.float16
    both = incoherence == "both"
    rows, in_pad = padded_size(shape[0]) if both else shape[0], padded_size(shape[1], 8)
    codes = rows * in_pad * bits // 8  # 16 bits (E8P) or 8 bits (E8 ball) per 8 weights and stage
    scales = 2 * (1 if both else rows)  # float16: one per layer, or one per row
    signs = -(-in_pad // 8) + (-(-rows // 8) if both else 0)
    assert qw.nbytes == rebuilt.nbytes == codes + scales + signs


def test_same_weight_same_codes_and_bad_input() -> None:
    gen = torch.Generator().manual_seed(9)
    w = torch.randn(16, 16, generator=gen)
    x = torch.randn(64, 16, dtype=torch.float64, generator=gen)
    stats = LayerStats(x.T @ x, 64)
    q = make_quantizer("quip", bits=2)
    assert torch.equal(q.quantize(w, stats).codes0, q.quantize(w.clone(), stats).codes0)
    with pytest.raises(EngineError, match="calibration"):
        q.quantize(w)
    with pytest.raises(EngineError, match="does not match"):
        q.quantize(w, LayerStats(torch.eye(8, dtype=torch.float64), 1))
    with pytest.raises(EngineError, match="bits: expected one of 2, 3, 4, got 8"):
        make_quantizer("quip", bits=8)
    with pytest.raises(EngineError, match="not positive definite"):  # padded inputs carry no curvature
        make_quantizer("quip", damp=0.0).quantize(torch.randn(8, 12), LayerStats(torch.eye(12, dtype=torch.float64), 1))
    with pytest.raises(EngineError, match="incoherence: expected one of input, both, got 'output'"):
        make_quantizer("quip", incoherence="output")


# --- the real model -----------------------------------------------------------------------------

# Issue 3 asks for at most half the best OPTQ 2-bit perplexity (reference GPTQ 2-bit g32: ~104; reference
# QuIP# without fine-tuning, down_proj left in float: ~48).  Measured here: 16.6 with every layer quantized.
QUIP_2BIT_MAX_PPL = 26.0


@pytest.fixture(scope="module")
def quip2_model(float_model):
    model, tokenizer = float_model
    model = copy.deepcopy(model)
    windows = calibration_windows(tokenizer, read_text(TRAIN_TXT), n_windows=128, seq_len=256, seed=0)
    names = quantize_calibrated(model, make_quantizer("quip", bits=2), windows, mode="independent", asym_alpha=0.0)
    assert any(name.endswith("down_proj") for name in names) and len(names) == 35
    return model, tokenizer


def test_quip_2bit_perplexity_on_the_real_model(quip2_model, valid_windows) -> None:
    ppl = perplexity(quip2_model[0], valid_windows, progress=False).ppl
    assert ppl <= QUIP_2BIT_MAX_PPL, f"QuIP# 2-bit perplexity {ppl:.2f}"


def test_quantized_model_saves_and_loads_identically(quip2_model, valid_windows, tmp_path) -> None:
    model, tokenizer = quip2_model
    save_quantized(model, tokenizer, tmp_path / "q", {"quantizer": {"method": "quip", "bits": 2}})
    loaded, _, manifest = load_quantized(tmp_path / "q")
    assert {layer["format"] for layer in manifest["layers"].values()} == {"quip_e8p"}
    with torch.no_grad():
        batch = valid_windows[:4]
        assert torch.equal(loaded(input_ids=batch).logits, model(input_ids=batch).logits)
