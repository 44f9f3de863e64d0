"""Randomized Hadamard transforms for QuIP#-style incoherence processing.

A Hadamard matrix of order ``n`` is built as a Kronecker product
``Sylvester(2^k) ⊗ B`` with ``B`` either ``[1]`` or a Paley matrix: Paley I
gives order ``q + 1`` for a prime ``q ≡ 3 (mod 4)`` (12, 20, 24, 44, 48, 60, ...),
Paley II order ``2 (q + 1)`` for a prime ``q ≡ 1 (mod 4)`` (12, 28, 36, 60, ...).
Dimensions with no such order (172 = 4 · 43, for instance) are zero-padded to the
next one (172 -> 176 = 4 · 44): the padded transform is exactly orthogonal, costs
a few percent more codes on those layers, and needs no stored matrix.  (A seeded
random orthogonal factor would avoid the padding but is not a Hadamard matrix,
and the lattice code needs the input width padded to a multiple of 8 anyway.)

:class:`RandomHadamard` is the orthogonal map ``T = H diag(s) / sqrt(n_pad)``
with random signs ``s``, applied along the last dimension after zero-padding.
It costs ``O(n log n + n·m)`` per vector (butterflies for the power-of-two
factor, a dense ``m × m`` product for the Paley factor).
"""

from __future__ import annotations

import math

import torch

from engine.errors import EngineError
from engine.quant.base import host_constant


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q[i, j] = χ(j - i)``: the quadratic character mod a prime ``q`` (χ(0) = 0)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if r in squares else -1.0 for r in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _paley(m: int) -> torch.Tensor | None:
    """A Paley Hadamard matrix of order ``m``, or ``None`` if neither construction applies."""
    if m % 4:
        return None
    q = m - 1
    if _is_prime(q) and q % 4 == 3:  # Paley I: I + [[0, 1^T], [-1, Q]]
        core = torch.zeros(m, m, dtype=torch.float64)
        core[0, 1:], core[1:, 0], core[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
        return torch.eye(m, dtype=torch.float64) + core
    q = m // 2 - 1
    if _is_prime(q) and q % 4 == 1:  # Paley II from the symmetric conference matrix
        conf = torch.zeros(m // 2, m // 2, dtype=torch.float64)
        conf[0, 1:], conf[1:, 0], conf[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
        h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        diag = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return torch.kron(conf, h2) + torch.kron(torch.eye(m // 2, dtype=torch.float64), diag)
    return None


@host_constant
def factorization(n: int) -> tuple[int, torch.Tensor] | None:
    """``(2^k, B)`` with ``n = 2^k · len(B)`` and ``B`` a Hadamard base (``[[1]]`` or Paley), smallest base first."""
    if n < 1:
        return None
    power = n & -n  # largest power of two dividing n
    while power >= 1:
        m = n // power
        base = torch.ones(1, 1, dtype=torch.float64) if m == 1 else _paley(m)
        if base is not None:
            return power, base
        power //= 2
    return None


def padded_size(n: int, multiple: int = 1) -> int:
    """Smallest ``n' >= n``, a multiple of ``multiple``, that has a Hadamard matrix here."""
    size = -(-n // multiple) * multiple
    while factorization(size) is None:
        size += multiple
    return size


def _sylvester_rows(rows: torch.Tensor, power: int) -> torch.Tensor:
    """Rows of the Sylvester matrix of order ``power``: ``S[a, b] = (-1)^popcount(a & b)``."""
    bits = rows[:, None] & torch.arange(power, device=rows.device)[None, :]
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits = bits >> 1
    return 1.0 - 2.0 * parity.to(torch.float64)


def hadamard_matrix(n: int) -> torch.Tensor:
    """The unnormalised (±1) Hadamard matrix of order ``n`` used here: ``H Hᵀ = n I``."""
    fact = factorization(n)
    if fact is None:
        raise EngineError(f"no Hadamard matrix of order {n} here; pad with padded_size({n})")
    power, base = fact
    return torch.kron(_sylvester_rows(torch.arange(power), power), base)


def hadamard_rows(n: int, r0: int, r1: int, transpose: bool = False) -> torch.Tensor:
    """Rows ``[r0, r1)`` of ``H`` (or of ``Hᵀ``), without building the whole matrix."""
    power, base = factorization(n)
    m = base.shape[0]
    base = base.T if transpose else base
    rows = torch.arange(r0, r1)
    sylv = _sylvester_rows(rows // m, power)
    return (sylv[:, :, None] * base[rows % m][:, None, :]).reshape(len(rows), n)


def fast_hadamard(x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """``x Hᵀ`` (or ``x H`` with ``transpose``) along the last dimension, unnormalised."""
    n = x.shape[-1]
    fact = factorization(n)
    if fact is None:
        raise EngineError(f"no Hadamard matrix of order {n} here; pad with padded_size({n})")
    power, base = fact
    lead = x.shape[:-1]
    y = x.reshape(-1, power, base.shape[0])
    if base.shape[0] > 1:
        b = base.to(x)
        y = y @ (b if transpose else b.T)
    h = 1
    while h < power:  # Sylvester butterflies (symmetric, so transpose changes nothing)
        y = y.reshape(-1, power // (2 * h), 2, h, base.shape[0])
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2)
        h *= 2
    return y.reshape(*lead, n)


def random_signs(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` random ±1 values (float32) from ``generator``."""
    return 1.0 - 2.0 * torch.randint(0, 2, (n,), generator=generator, device=generator.device).to(torch.float32)


class RandomHadamard:
    """``T = H diag(signs) / sqrt(n_pad)`` acting on vectors zero-padded from ``n`` to ``n_pad``."""

    def __init__(self, n: int, signs: torch.Tensor) -> None:
        self.n, self.n_pad = n, signs.shape[0]
        if self.n_pad < n or factorization(self.n_pad) is None:
            raise EngineError(f"cannot build a Hadamard transform of order {self.n_pad} for width {n}")
        self.signs = signs
        self.norm = 1.0 / math.sqrt(self.n_pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``pad(x) Tᵀ`` along the last dimension: ``[..., n] -> [..., n_pad]``."""
        x = torch.nn.functional.pad(x, (0, self.n_pad - self.n))
        return fast_hadamard(x * self.signs.to(x)) * self.norm

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """``(y T)[..., :n]``: undoes :meth:`forward` (``[..., n_pad] -> [..., n]``)."""
        x = fast_hadamard(y, transpose=True) * self.signs.to(y) * self.norm
        return x[..., : self.n]

    def inverse_rows(self, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``[r0, r1)`` of ``Tᵀ`` as a dense ``[r1 - r0, n_pad]`` matrix (``r1 <= n``)."""
        rows = hadamard_rows(self.n_pad, r0, r1, transpose=True) * self.norm
        return (self.signs[r0:r1, None].double() * rows).to(dtype)
