"""Lattice codebooks of QuIP# for vectors of 8 weights: E8P (2 bits/weight) and a 1-bit E8 ball.

**E8P** (Tseng et al., 2024, "QuIP#"): 2^16 points of the shifted lattice
``E8 + 1/4``, so 16 bits per 8 weights.  A *source set* ``A`` holds 256
vectors of positive half-integers: the 227 absolute values of points of
``D8 + 1/2`` (the half-integer coset of ``E8``) with squared norm <= 10, plus 29
vectors with five 3/2's and three 1/2's (norm² 12; the same 29 as the reference
code).  A code word is

    bits 15..8  index ``a`` into ``A``
    bits 7..1   signs of coordinates 7..1 (bit i set: coordinate i negative)
    bit 0       shift: set -> ``+1/4``, clear -> ``-1/4``

and the sign of coordinate 0 is implied: the number of negative coordinates has
the parity of ``sum(A[a])``, which puts ``s ⊙ A[a]`` in ``E8``; the point is
``s ⊙ A[a] ± 1/4``.  Every point therefore lies in ``E8 + 1/4`` (``x - 1/4`` is
either ``s ⊙ A[a] ∈ E8`` or ``s ⊙ A[a] - 1/2 ∈ D8``).

Encoding is exact nearest-point search without enumerating the 2^16 points: for
a shift ``t`` and source vector ``a``, the best signs are ``sign(y)`` (``y = x -
t``), and if their parity is wrong the cheapest fix flips the coordinate with the
smallest ``a_i |y_i|``.  That is 2 × 256 candidates per vector; a matrix product
bounds all of them from below (the distance with the parity ignored), and only the
few the bound cannot rule out are scored exactly.

**E8 1-bit ball** (the residual stage of QuIP#'s 3-bit code): the 241 points of
``E8`` with squared norm <= 2 plus 15 of the 16 points ``±2 e_i`` (``-2 e_7``
left out), 256 points, 8 bits per 8 weights; encoded by brute force.
"""

from __future__ import annotations

import itertools

import torch

from engine.quant.base import host_constant

DIM = 8

# Positions of the three 1/2's in the 29 norm-12 source vectors (the other five coordinates are 3/2).
_NORM12_HALVES = (
    (1, 2, 3), (0, 2, 3), (0, 1, 3), (0, 1, 2),
    (3, 6, 7), (3, 5, 7), (3, 4, 7), (3, 5, 6), (3, 4, 6), (3, 4, 5),
    (2, 6, 7), (2, 5, 7), (2, 4, 7), (2, 5, 6), (2, 4, 6), (2, 4, 5),
    (1, 6, 7), (1, 5, 7), (1, 4, 7), (1, 5, 6), (1, 4, 6),
    (0, 4, 5), (0, 6, 7), (0, 5, 7), (0, 4, 7), (0, 5, 6), (0, 4, 6),
    (0, 1, 4), (2, 3, 7),
)  # fmt: skip


@host_constant
def source_set() -> torch.Tensor:
    """The 256 × 8 source set ``A`` (float32): the 227 of norm² <= 10 (lexicographic), then the 29 of norm² 12."""
    halves = torch.tensor([0.5, 1.5, 2.5])
    ball = torch.cartesian_prod(*[halves] * DIM)
    ball = ball[(ball**2).sum(-1) <= 10]
    norm12 = torch.full((len(_NORM12_HALVES), DIM), 1.5)
    for row, positions in enumerate(_NORM12_HALVES):
        norm12[row, list(positions)] = 0.5
    return torch.cat([ball, norm12])


@host_constant
def source_parity() -> torch.Tensor:
    """``sum(A[a]) mod 2`` (the sums are integers): the parity of the count of negative coordinates."""
    return (source_set().sum(-1).round().long() % 2).bool()


def e8p_decode(codes: torch.Tensor) -> torch.Tensor:
    """E8P points ``[..., 8]`` (float32) of 16-bit codes (any integer dtype; int16 bit patterns allowed)."""
    c = codes.to(torch.int32) & 0xFFFF
    a = c >> 8
    neg = ((c[..., None] >> torch.arange(DIM, dtype=torch.int32, device=c.device)) & 1).bool()
    neg[..., 0] = (neg[..., 1:].sum(-1) % 2).bool() ^ source_parity().to(c.device)[a]
    shift = torch.where((c & 1).bool(), 0.25, -0.25)
    return torch.where(neg, -1.0, 1.0) * source_set().to(c.device)[a] + shift[..., None]


def e8p_encode(x: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """16-bit codes (int32 in ``[0, 2^16)``) of the nearest E8P points to ``x`` ``[..., 8]``."""
    lead = x.shape[:-1]
    flat = x.reshape(-1, DIM).float()
    out = torch.empty(flat.shape[0], dtype=torch.int32, device=flat.device)
    for start in range(0, flat.shape[0], chunk):
        out[start : start + chunk] = _encode_chunk(flat[start : start + chunk])
    return out.reshape(lead)


SHIFTS = ((1, 0.25), (0, -0.25))  # (shift bit, shift), in the order ties are settled
CANDIDATES = 16  # (shift, a) pairs scored exactly per vector after the bound prunes the other 496
MARGIN = 1e-3  # the bound must exceed the best exact distance by this to skip the full search


def _shift_scores(y: torch.Tensor, a: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Exact squared distances from ``y = x - t`` ``[N, 8]`` to the best signed ``A[a]`` for every source
    vector (``a`` None: ``[N, 256]``) or for given ``a`` ``[N, K]``; with the sign flags behind each distance."""
    src, parity = source_set().to(y.device), source_parity().to(y.device)
    mag, neg = y.abs(), y < 0
    chosen = src[None, :, :] if a is None else src[a]
    prods = mag[:, None, :] * chosen  # [N, 256 or K, 8]
    low, low_at = prods.min(-1)
    wrong = (neg.sum(-1) % 2).bool()[:, None] != (parity[None, :] if a is None else parity[a])
    score = prods.sum(-1) - 2.0 * low * wrong
    dist = (y**2).sum(-1, keepdim=True) + (chosen**2).sum(-1) - 2.0 * score
    return dist, neg, wrong, low_at


def _code(y: torch.Tensor, a: torch.Tensor, shift_bit: torch.Tensor) -> torch.Tensor:
    """The code of source vector ``a`` ``[N]`` under the best signs for ``y`` ``[N, 8]``."""
    _, neg, wrong, low_at = _shift_scores(y, a[:, None])
    rows = torch.arange(y.shape[0], device=y.device)
    neg[rows, low_at[:, 0]] ^= wrong[:, 0]  # wrong parity: flip the cheapest coordinate
    sign_bits = (neg[:, 1:].int() << torch.arange(1, DIM, dtype=torch.int32, device=y.device)).sum(-1)
    return (a.int() << 8) | sign_bits.int() | shift_bit.int()


def _encode_chunk(x: torch.Tensor) -> torch.Tensor:
    """Nearest codes: a lower bound on all 512 distances (one matrix product: the distance ignoring the sign
    parity) keeps ``CANDIDATES`` pairs to score exactly; vectors whose best exact distance does not clear the
    next bound by ``MARGIN`` are searched in full, so the result is the full search's, ties included."""
    src = source_set().to(x.device)
    ys = torch.stack([x - shift for _, shift in SHIFTS])  # [2, N, 8]
    # |y|² + |A[a]|² - 2 |y|·A[a] as one product: rows [|y|, |y|², 1] (vector-major, shifts interleaved)
    # times columns [-2 A[a], 1, |A[a]|²]; row n of the [N, 512] view holds index shift_index * 256 + a.
    ones = torch.ones(*ys.shape[:2], 1, device=x.device)
    rows_in = torch.cat([ys.abs(), (ys**2).sum(-1, keepdim=True), ones], -1).transpose(0, 1).reshape(-1, DIM + 2)
    cols = torch.cat([-2.0 * src, ones[0, :1].expand(len(src), 1), (src**2).sum(-1, keepdim=True)], -1)
    bound = (rows_in @ cols.T).view(x.shape[0], -1)
    kept_bound, kept = bound.topk(CANDIDATES + 1, dim=-1, largest=False)
    kept, next_bound = kept[:, :CANDIDATES], kept_bound[:, CANDIDATES]
    shift_index, a = kept // 256, kept % 256
    dist = torch.stack([_shift_scores(ys[s], a)[0] for s in range(len(SHIFTS))]).gather(0, shift_index[None])[0]
    best = dist.min(-1, keepdim=True).values
    first = torch.where(dist == best, kept, bound.shape[-1]).min(-1).values  # ties: the full search's order
    exact = best[:, 0] < next_bound - MARGIN
    rows = torch.arange(x.shape[0], device=x.device)
    bits = torch.tensor([bit for bit, _ in SHIFTS], device=x.device)
    code = _code(ys[first // 256, rows], first % 256, bits[first // 256])
    if not bool(exact.all()):
        code[~exact] = _encode_full(x[~exact])
    return code


def _encode_full(x: torch.Tensor) -> torch.Tensor:
    """Nearest codes by scoring all 2 × 256 (shift, a) pairs."""
    best_dist = best_code = None
    for shift_bit, shift in SHIFTS:
        y = x - shift
        dist, _, _, _ = _shift_scores(y)
        dist, a = dist.min(-1)
        code = _code(y, a, torch.full_like(a, shift_bit))
        if best_dist is None:
            best_dist, best_code = dist, code
        else:
            better = dist < best_dist
            best_code = torch.where(better, code, best_code)
            best_dist = torch.minimum(dist, best_dist)
    return best_code


@host_constant
def e8_ball() -> torch.Tensor:
    """The 256 × 8 one-bit E8 codebook: origin, 112 integer and 128 half-integer roots, 15 of ``±2 e_i``."""
    points = [torch.zeros(DIM)]
    for i, j in itertools.combinations(range(DIM), 2):
        for si, sj in itertools.product((1.0, -1.0), repeat=2):
            p = torch.zeros(DIM)
            p[i], p[j] = si, sj
            points.append(p)
    halves = torch.cartesian_prod(*[torch.tensor([0.5, -0.5])] * DIM)
    points.extend(halves[(halves < 0).sum(-1) % 2 == 0])
    for sign in (1.0, -1.0):
        for i in range(DIM - (sign < 0)):
            p = torch.zeros(DIM)
            p[i] = 2.0 * sign
            points.append(p)
    return torch.stack(points)


def e8_ball_decode(codes: torch.Tensor) -> torch.Tensor:
    """Points ``[..., 8]`` of 8-bit codes (any integer dtype)."""
    return e8_ball().to(codes.device)[codes.to(torch.long) & 0xFF]


def e8_ball_encode(x: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """8-bit codes (int32) of the nearest points of :func:`e8_ball` (brute force over 256)."""
    grid = e8_ball().to(x.device)
    grid_norm = (grid**2).sum(-1)
    lead = x.shape[:-1]
    flat = x.reshape(-1, DIM).float()
    out = torch.empty(flat.shape[0], dtype=torch.int32, device=x.device)
    for start in range(0, flat.shape[0], chunk):
        part = flat[start : start + chunk]
        out[start : start + chunk] = (grid_norm[None, :] - 2.0 * part @ grid.T).argmin(-1).int()
    return out.reshape(lead)
