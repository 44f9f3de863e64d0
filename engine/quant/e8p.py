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
smallest ``a_i |y_i|``.  That is 2 × 256 candidates per vector.

**E8 1-bit ball** (the residual stage of QuIP#'s 3-bit code): the 241 points of
``E8`` with squared norm <= 2 plus 15 of the 16 points ``±2 e_i`` (``-2 e_7``
left out), 256 points, 8 bits per 8 weights; encoded by brute force.
"""

from __future__ import annotations

import itertools
from functools import lru_cache

import torch

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


@lru_cache(maxsize=None)
def source_set() -> torch.Tensor:
    """The 256 × 8 source set ``A`` (float32): the 227 of norm² <= 10 (lexicographic), then the 29 of norm² 12."""
    halves = torch.tensor([0.5, 1.5, 2.5])
    ball = torch.cartesian_prod(*[halves] * DIM)
    ball = ball[(ball**2).sum(-1) <= 10]
    norm12 = torch.full((len(_NORM12_HALVES), DIM), 1.5)
    for row, positions in enumerate(_NORM12_HALVES):
        norm12[row, list(positions)] = 0.5
    return torch.cat([ball, norm12])


@lru_cache(maxsize=None)
def _source_parity() -> torch.Tensor:
    """``sum(A[a]) mod 2`` (the sums are integers): the parity of the count of negative coordinates."""
    return (source_set().sum(-1).round().long() % 2).bool()


def e8p_decode(codes: torch.Tensor) -> torch.Tensor:
    """E8P points ``[..., 8]`` (float32) of 16-bit codes (any integer dtype; int16 bit patterns allowed)."""
    c = codes.to(torch.int32) & 0xFFFF
    a = c >> 8
    neg = ((c[..., None] >> torch.arange(DIM, dtype=torch.int32)) & 1).bool()
    neg[..., 0] = (neg[..., 1:].sum(-1) % 2).bool() ^ _source_parity().to(c.device)[a]
    shift = torch.where((c & 1).bool(), 0.25, -0.25)
    return torch.where(neg, -1.0, 1.0) * source_set().to(c.device)[a] + shift[..., None]


def e8p_encode(x: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """16-bit codes (int32 in ``[0, 2^16)``) of the nearest E8P points to ``x`` ``[..., 8]``."""
    lead = x.shape[:-1]
    flat = x.reshape(-1, DIM).float()
    out = torch.empty(flat.shape[0], dtype=torch.int32)
    for start in range(0, flat.shape[0], chunk):
        out[start : start + chunk] = _encode_chunk(flat[start : start + chunk])
    return out.reshape(lead)


def _encode_chunk(x: torch.Tensor) -> torch.Tensor:
    src, parity = source_set(), _source_parity()
    src_norm = (src**2).sum(-1)
    best_dist = best_code = None
    for shift_bit, shift in ((1, 0.25), (0, -0.25)):
        y = x - shift
        mag = y.abs()
        neg = y < 0
        prods = mag[:, None, :] * src[None, :, :]  # [N, 256, 8]
        low, low_at = prods.min(-1)
        wrong = (neg.sum(-1) % 2).bool()[:, None] != parity[None, :]
        score = prods.sum(-1) - 2.0 * low * wrong
        dist = (y**2).sum(-1, keepdim=True) + src_norm[None, :] - 2.0 * score
        dist, a = dist.min(-1)
        rows = torch.arange(x.shape[0])
        flip = wrong[rows, a]
        neg[rows[flip], low_at[rows, a][flip]] ^= True
        sign_bits = (neg[:, 1:].int() << torch.arange(1, DIM, dtype=torch.int32)).sum(-1, dtype=torch.int32)
        code = (a.int() << 8) | sign_bits | shift_bit
        if best_dist is None:
            best_dist, best_code = dist, code
        else:
            better = dist < best_dist
            best_code = torch.where(better, code, best_code)
            best_dist = torch.minimum(dist, best_dist)
    return best_code


@lru_cache(maxsize=None)
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
    grid = e8_ball()
    grid_norm = (grid**2).sum(-1)
    lead = x.shape[:-1]
    flat = x.reshape(-1, DIM).float()
    out = torch.empty(flat.shape[0], dtype=torch.int32)
    for start in range(0, flat.shape[0], chunk):
        part = flat[start : start + chunk]
        out[start : start + chunk] = (grid_norm[None, :] - 2.0 * part @ grid.T).argmin(-1).int()
    return out.reshape(lead)
