"""QuIP#: randomized Hadamard incoherence, E8P lattice codes, block LDLQ rounding (Tseng et al., 2024).

For a weight ``W`` (``[m, n]``) with input Hessian ``H``:

1. *Incoherence*: ``W' = U W Vᵀ`` and ``H' = V H Vᵀ`` with ``V`` (and, in mode
   ``"both"``, ``U``) random-sign Hadamard transforms (:mod:`engine.quant.hadamard`;
   widths zero-padded to a Hadamard order, the input width also to a multiple
   of 8).  The proxy loss ``tr((W - Ŵ) H (W - Ŵ)ᵀ)`` is unchanged by the
   rotation, and the rows of ``W'`` have near-Gaussian entries that suit a
   ball-shaped lattice code.
2. *Scale*: ``W'`` is divided by ``rms / c`` (``c`` per bit width chosen by
   measuring perplexity on the shared model, :data:`DEFAULT_RMS`).  Mode
   ``"both"`` (QuIP# as published) keeps one scale per layer.  Mode ``"input"``
   (the default) leaves the output side unrotated and keeps one float16 scale
   per output row: on the shared model this is far better (2-bit perplexity
   ~17 against ~39), because the low-rank q/k projections put very different
   magnitudes on their output rows, and an output rotation spreads the same
   error over all of them where per-row scales keep each row's error in
   proportion to the row, as downstream attention scores need.  It costs 16 bits per
   row (0.25 bits per weight at 64 inputs, 0.004 at 4096).
3. *Block LDLQ*: ``H' = L D Lᵀ`` with ``L`` unit lower block-triangular (8 × 8
   blocks); blocks of 8 columns are rounded last to first, each to the nearest
   code point of ``W'_k + (W' - Ŵ')_{>k} L_{>k,k}``, which feeds the error of
   the already-rounded blocks forward; then ``tune_iters`` passes of block
   coordinate descent (QuIP#'s default 10).  With a diagonal ``H`` all of this
   is plain nearest rounding.
4. *Codes*: 2 bits = one E8P stage (16 bits per 8 weights); 3 and 4 bits add a
   residual stage (residual vector quantization, as QuIP#'s E8P12RVQ3B/4B): the
   residual times a gain is rounded to the 1-bit E8 ball (3 bits) or to E8P again
   (4 bits).

Dequantization decodes the codes and applies ``Uᵀ Ŵ' V``.  Without an output
rotation a row tile decodes only its rows; with one, it multiplies all decoded
rows by the dense rows of ``Uᵀ`` it needs.  A column tile is cut from whole rows.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from engine.errors import EngineError
from engine.options import Option
from engine.quant.base import (
    LayerStats, QuantizedWeight, Quantizer, Span, register_format, register_quantizer, row_tiled_matmul,
    row_tiled_matmul_t,
)
from engine.quant.e8p import DIM, e8_ball_decode, e8_ball_encode, e8p_decode, e8p_encode
from engine.quant.hadamard import RandomHadamard, padded_size, random_signs
from engine.quant.kernels import codebook_kernels

# name -> (encode, decode, storage dtype of one code per 8 weights)
Coder = Callable[[torch.Tensor], torch.Tensor]
CODEBOOKS: dict[str, tuple[Coder, Coder, torch.dtype]] = {
    "e8p": (e8p_encode, e8p_decode, torch.int16),
    "e8": (e8_ball_encode, e8_ball_decode, torch.uint8),
}
# bits -> residual stages (codebook, gain): stage i rounds (x - sum of earlier stages) * gain.
STAGES: dict[int, tuple[tuple[str, float], ...]] = {
    2: (("e8p", 1.0),),
    3: (("e8p", 1.0), ("e8", 2.04)),
    4: (("e8p", 1.0), ("e8p", 3.45)),
}
# incoherence mode -> bits -> target RMS of the scaled, rotated weight (W' / scale), chosen by measuring
# perplexity on the shared model (QuIP#'s own constants, about 0.9-1.0, suit large models' weights).
DEFAULT_RMS: dict[str, dict[int, float]] = {
    "input": {2: 1.2, 3: 0.95, 4: 0.85},
    "both": {2: 1.25, 3: 0.95, 4: 0.7},
}
SCALE_DTYPE = torch.float16


def _to_storage(codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Codes in ``[0, 2^bits)`` as the bit pattern of a signed/unsigned storage dtype."""
    bits = torch.iinfo(dtype).bits
    if dtype.is_signed:
        codes = (codes.to(torch.int32) + (1 << (bits - 1))) % (1 << bits) - (1 << (bits - 1))
    return codes.to(dtype)


def rvq_encode(x: torch.Tensor, stages: tuple[tuple[str, float], ...]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Codes of each residual stage for vectors ``x`` ``[..., 8]``, and the reconstruction."""
    approx = torch.zeros_like(x, dtype=torch.float32)
    codes = []
    for name, gain in stages:
        encode, decode, _ = CODEBOOKS[name]
        code = encode((x - approx) * gain)
        approx = approx + decode(code) / gain
        codes.append(code)
    return codes, approx


def rvq_decode(codes: list[torch.Tensor], stages: tuple[tuple[str, float], ...]) -> torch.Tensor:
    return sum(CODEBOOKS[name][1](code) / gain for code, (name, gain) in zip(codes, stages))


def diagonal_blocks(matrix: torch.Tensor, block: int = DIM) -> torch.Tensor:
    """The ``block × block`` diagonal blocks of a square matrix, ``[n / block, block, block]``."""
    count = matrix.shape[0] // block
    return torch.diagonal(matrix.reshape(count, block, count, block), dim1=0, dim2=2).permute(2, 0, 1)


def block_ldl(hessian: torch.Tensor, block: int = DIM) -> torch.Tensor:
    """Unit lower block-triangular ``L`` with ``H = L D Lᵀ`` (``D`` block diagonal), from a Cholesky factor.

    ``L[:, k] = C[:, k] C_kk^{-1}`` is solved into the factor's own storage a block column at a time, so one
    matrix of ``H``'s size is made here, not three.
    """
    chol = torch.linalg.cholesky(hessian)
    diag = diagonal_blocks(chol, block).clone()
    for k in range(chol.shape[0] // block):
        c0, c1 = k * block, (k + 1) * block
        chol[c0:, c0:c1] = torch.linalg.solve_triangular(diag[k], chol[c0:, c0:c1], upper=False, left=False)
    return chol


# a block of 8 columns ``[m, 8]`` -> its codes ``[m, ...]`` and its rounded values ``[m, 8]``
BlockEncoder = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def rvq_block_encoder(stages: tuple[tuple[str, float], ...]) -> BlockEncoder:
    """Each row's 8 columns to the nearest point of the residual lattice code: codes ``[m, stages]``."""
    def encode(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes, values = rvq_encode(target, stages)
        return torch.stack(codes, dim=-1), values

    return encode


def ldlq(
    weight: torch.Tensor, hessian: torch.Tensor, encode: BlockEncoder, tune_iters: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block LDLQ: the codes of every block of 8 columns ``[m, n / 8, ...]`` and the rounded weight ``[m, n]``
    (``n % 8 == 0``), each block rounded by ``encode``.

    ``tune_iters`` extra passes of block coordinate descent follow (as QuIP#'s
    ``quip_tune_iters``): each block is re-rounded at its loss-optimal value given
    all other blocks, ``Ŵ_k + (W - Ŵ) H_{:,k} H_{k,k}^{-1}``.
    """
    m, n = weight.shape
    blocks = n // DIM
    lower = block_ldl(hessian)
    rounded = torch.zeros_like(weight)
    error = weight.clone()  # W - Ŵ, updated a block of columns at a time rather than recomputed per block
    codes: list[torch.Tensor | None] = [None] * blocks

    def put(k: int, target: torch.Tensor) -> None:
        c0, c1 = k * DIM, (k + 1) * DIM
        codes[k], values = encode(target)
        rounded[:, c0:c1] = values.to(rounded.dtype)
        error[:, c0:c1] = weight[:, c0:c1] - rounded[:, c0:c1]

    for k in reversed(range(blocks)):
        c0, c1 = k * DIM, (k + 1) * DIM
        put(k, weight[:, c0:c1] + error[:, c1:] @ lower[c1:, c0:c1])
    if tune_iters:
        diag_inv = torch.linalg.inv(diagonal_blocks(hessian))
        for _ in range(tune_iters):
            for k in reversed(range(blocks)):
                c0, c1 = k * DIM, (k + 1) * DIM
                put(k, rounded[:, c0:c1] + error @ hessian[:, c0:c1] @ diag_inv[k])
    return torch.stack(codes, dim=1), rounded


def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    """±1 vector -> bits (1 = negative), 8 per byte, little-endian."""
    neg = (signs < 0).to(torch.int32)
    neg = torch.nn.functional.pad(neg, (0, -len(neg) % 8))
    return (neg.view(-1, 8) << torch.arange(8, dtype=torch.int32, device=neg.device)).sum(-1).to(torch.uint8)


def unpack_signs(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_signs`: ``n`` float32 ±1 values."""
    bits = (packed.to(torch.int32)[:, None] >> torch.arange(8, dtype=torch.int32, device=packed.device)) & 1
    return 1.0 - 2.0 * bits.reshape(-1)[:n].to(torch.float32)


@register_format
class QuipWeight(QuantizedWeight):
    """``W = Uᵀ (scale ⊙ decode(codes)) V``, cropped to ``[out_features, in_features]``.

    ``scale`` is one value or one per stored row; ``U`` is the identity when the
    output side is not rotated (no ``signs_out``).
    """

    format_name = "quip_e8p"
    row_align: ClassVar[int] = 1  # row tiles start at multiples of this (a format decoding rows in groups)

    def __init__(
        self,
        codes: list[torch.Tensor],
        scale: torch.Tensor,
        signs_in: torch.Tensor,
        signs_out: torch.Tensor | None,
        *,
        out_features: int,
        in_features: int,
        bits: int,
    ) -> None:
        super().__init__(out_features, in_features)
        self.bits, self.stages = bits, STAGES[bits]
        self.in_padded = len(signs_in)
        self.out_padded = out_features if signs_out is None else len(signs_out)
        for i, (code, (name, _)) in enumerate(zip(codes, self.stages)):
            self.register_buffer(f"codes{i}", _to_storage(code, CODEBOOKS[name][2]).contiguous())
        self.register_buffer("scale", scale.to(SCALE_DTYPE).reshape(-1).contiguous())
        self.register_buffer("signs_in", pack_signs(signs_in))
        if signs_out is not None:
            self.register_buffer("signs_out", pack_signs(signs_out))

    @property
    def rotate_out(self) -> bool:
        return hasattr(self, "signs_out")

    @property
    def has_row_scales(self) -> bool:
        """One scale per output row, unless the output side is rotated (one scale per layer)."""
        return not self.rotate_out and len(self.scale) == self.out_features

    def scale_rows(self, gain: torch.Tensor) -> None:
        if not self.has_row_scales:
            super().scale_rows(gain)
        self.scale.copy_((self.scale.float() * gain.float().to(self.scale.device)).to(self.scale.dtype))

    def config(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "out_features": self.out_features,
            "in_features": self.in_features,
            "out_padded": self.out_padded,
            "in_padded": self.in_padded,
            "rotate_out": self.rotate_out,
            "stages": [list(stage) for stage in self.stages],
        }

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> QuipWeight:
        bits = config["bits"]
        if bits not in STAGES or [tuple(s) for s in config["stages"]] != list(STAGES[bits]):
            raise EngineError(f"quip_e8p weight: unsupported stages {config['stages']} for {bits} bits")
        obj = cls.__new__(cls)
        QuantizedWeight.__init__(obj, config["out_features"], config["in_features"])
        obj.bits, obj.stages = bits, STAGES[bits]
        obj.out_padded, obj.in_padded = config["out_padded"], config["in_padded"]
        names = [f"codes{i}" for i in range(len(obj.stages))] + ["scale", "signs_in"]
        for name in names + (["signs_out"] if config["rotate_out"] else []):
            obj.register_buffer(name, tensors[name])
        return obj

    def rotated(self, rows: slice = slice(None)) -> torch.Tensor:
        """``scale ⊙ decode(codes)`` for stored ``rows``: the weight in the rotated basis (float32)."""
        kernels = codebook_kernels(self.scale.device)
        if kernels is not None:
            r0, r1, _ = rows.indices(self.out_padded)
            return kernels.quip_rotated([getattr(self, f"codes{i}") for i in range(len(self.stages))], self.stages,
                                        self.scale, r0, r1)
        codes = [getattr(self, f"codes{i}")[rows] for i in range(len(self.stages))]
        decoded = rvq_decode(codes, self.stages).flatten(-2)
        scale = self.scale.float()
        return decoded * (scale if len(scale) == 1 else scale[rows])[:, None]

    def dequantize(
        self, dtype: torch.dtype = torch.float32, rows: Span | None = None, cols: Span | None = None
    ) -> torch.Tensor:
        r0, r1 = rows if rows else (0, self.out_features)
        if not self.rotate_out:
            q = self.rotated(slice(r0, r1))
        else:
            out_t = RandomHadamard(self.out_features, unpack_signs(self.signs_out, self.out_padded))
            if (r0, r1) == (0, self.out_features):
                q = out_t.inverse(self.rotated().T).T
            else:  # only the rows of Uᵀ this tile needs, against all decoded rows
                q = out_t.inverse_rows(r0, r1, torch.float32).to(self.scale.device) @ self.rotated()
        dense = RandomHadamard(self.in_features, unpack_signs(self.signs_in, self.in_padded)).inverse(q)
        if cols is not None:
            dense = dense[:, cols[0] : cols[1]]
        return dense.to(dtype)


    def _input_transform(self) -> RandomHadamard:
        return RandomHadamard(self.in_features, unpack_signs(self.signs_in, self.in_padded).to(self.scale.device))

    def _output_transform(self) -> RandomHadamard | None:
        if not self.rotate_out:
            return None
        return RandomHadamard(self.out_features, unpack_signs(self.signs_out, self.out_padded).to(self.scale.device))

    def _row_step(self, tile_numel: int) -> int:
        """Rows per tile: as many as ``tile_numel`` holds, a multiple of :attr:`row_align`."""
        step = max(1, tile_numel // self.in_padded)
        return max(self.row_align, step - step % self.row_align)

    def _rotated_tiles(self, dtype: torch.dtype) -> Callable[[int, int], torch.Tensor]:
        return lambda r0, r1: self.rotated(slice(r0, r1)).to(dtype)

    def matmul(self, x: torch.Tensor, tile_numel: int | None = None) -> torch.Tensor:
        """``x Wᵀ = out(in(x) Rᵀ)``: the incoherence transforms applied to the activations (``in`` pads and
        rotates them, ``out`` rotates back and crops), ``R`` decoded a block of its rows at a time, each once."""
        if tile_numel is None or tile_numel >= self.out_features * self.in_features:
            return super().matmul(x, tile_numel)
        x_rot = self._input_transform().forward(x.float()).to(x.dtype)  # transforms in float32, products in x's
        n_rows = self.out_padded if self.rotate_out else self.out_features
        y = row_tiled_matmul(x_rot, n_rows, self._rotated_tiles(x.dtype), self._row_step(tile_numel))
        out_t = self._output_transform()
        return y if out_t is None else out_t.inverse(y.float()).to(x.dtype)

    def matmul_t(self, g: torch.Tensor, tile_numel: int | None = None) -> torch.Tensor:
        """``g W = in⁻¹(out⁻¹(g) R)``, ``R`` decoded a block of its rows at a time, each once."""
        if tile_numel is None or tile_numel >= self.out_features * self.in_features:
            return super().matmul_t(g, tile_numel)
        out_t = self._output_transform()
        g_rot = g if out_t is None else out_t.forward(g.float()).to(g.dtype)
        z = row_tiled_matmul_t(g_rot, self.in_padded, self._rotated_tiles(g.dtype), self._row_step(tile_numel))
        return self._input_transform().inverse(z.float()).to(g.dtype)


def layer_seed(weight: torch.Tensor, seed: int) -> int:
    """Sign seed from the quantizer seed and the weight's bytes, so layers get independent signs in any order."""
    data = weight.detach().to(torch.float32).contiguous().cpu().numpy().tobytes()
    return (seed * 0x9E3779B1 + zlib.crc32(data)) % (1 << 63)


ROTATE_ROWS = 1024  # rows transformed at once: the temporaries stay this many rows tall (a 7B layer: 45 MB)


def rotated_hessian(stats: LayerStats, transform: RandomHadamard) -> torch.Tensor:
    """``T H Tᵀ`` for ``H = 2 XᵀX / N`` (:meth:`LayerStats.hessian_rows`) in one matrix of its size.

    ``A = H Tᵀ`` is made a slice of rows at a time in a ``[n_pad, n_pad]`` buffer, then each slice of its
    columns is replaced by its own transform: the buffer ends as ``(T A)ᵀ`` and the transposed view returned
    holds exactly what ``transform.forward(transform.forward(H).T)`` computes, with no second matrix of
    ``H``'s size alive (a 7B ``down_proj``: 485 MB, not 2.4 GB of temporaries).  Statistics handed over
    (``disposable``) are used up: the buffer is the sums themselves when no padding widens them (each slice of rows
    is read before it is overwritten), else the sums are let go once read, so they are never beside the result.
    """
    sums, n, n_pad = stats.xtx, stats.xtx.shape[0], transform.n_pad
    in_place = stats.disposable and n_pad == n
    buffer = sums if in_place else torch.zeros(n_pad, n_pad, dtype=sums.dtype, device=sums.device)
    for r0 in range(0, n, ROTATE_ROWS):
        r1 = min(r0 + ROTATE_ROWS, n)
        buffer[r0:r1] = transform.forward(stats.hessian_rows(r0, r1))
    if stats.disposable:  # the caller keeps no other reference: these are the last
        stats.give_up()
    del sums
    for c0 in range(0, n_pad, ROTATE_ROWS):
        c1 = min(c0 + ROTATE_ROWS, n_pad)
        buffer[:, c0:c1] = transform.forward(buffer[:n, c0:c1].T).T
    return buffer.T


@register_quantizer
class QuipQuantizer(Quantizer):
    """QuIP# at 2, 3 or 4 bits per weight (needs calibration statistics).

    ``incoherence="input"`` (default) rotates the input side only and keeps one
    scale per output row; ``"both"`` is QuIP# as published: both sides rotated,
    one scale per layer.
    """

    name = "quip"
    needs_calibration = True
    uses_up_statistics = True  # rotated_hessian
    randomized = True  # random Hadamard signs, drawn from the calibration seed
    options = {
        "bits": Option("int", 2, "Bits per weight.", choices=tuple(STAGES)),
        "damp": Option("float", 0.01, "Hessian dampening, a fraction of its mean diagonal.", minimum=0.0),
        "incoherence": Option("str", "input", "Sides rotated: input (one scale per row) or both (as published).",
                              choices=tuple(DEFAULT_RMS)),
        "rms": Option("float", None, "Target RMS of the scaled weight [by bits and incoherence].", minimum=0.0,
                      above=True, optional=True),
        "tune_iters": Option("int", 10, "Rounds of refining the codes after the first LDLQ pass.", minimum=0),
    }

    def validate(self) -> None:
        if self.rms is None:  # recorded resolved, so the manifest says what was used
            self.rms = self.settings["rms"] = DEFAULT_RMS[self.incoherence][self.bits]

    def quantize(self, weight: torch.Tensor, stats: LayerStats | None = None) -> QuipWeight:
        m, n = weight.shape
        if stats is None:
            raise EngineError(f"{self.name} needs calibration statistics (a Hessian per layer)")
        if stats.xtx.shape != (n, n):
            raise EngineError(f"{self.name}: Hessian of shape {tuple(stats.xtx.shape)} does not match {n} input "
                              "features")
        dt = stats.xtx.dtype  # the statistics' dtype: float64, or float32 for a 16-bit model's
        w = weight.detach().to(dt).clone()
        w[:, stats.xtx.diagonal() == 0] = 0.0  # dead inputs: their weights never matter

        gen = torch.Generator().manual_seed(layer_seed(weight, self.seed))
        in_t = RandomHadamard(n, random_signs(padded_size(n, DIM), gen).to(w))  # host-drawn: the same on any device
        w_rot = in_t.forward(w)
        del w
        h_rot = rotated_hessian(stats, in_t)
        mean_diag = torch.diagonal(h_rot).mean()
        h_rot.diagonal().add_(self.damp * mean_diag if mean_diag > 0 else 1.0)
        out_signs = None
        if self.incoherence == "both":
            out_signs = random_signs(padded_size(m), gen).to(w_rot.device)
            w_rot = RandomHadamard(m, out_signs.to(dt)).forward(w_rot.T).T
            square = w_rot.square().mean().reshape(1, 1)
        else:
            square = w_rot.square().mean(dim=1, keepdim=True)
        scale = (square.sqrt() / self.rms).to(SCALE_DTYPE).to(dt)  # the stored value
        scale = torch.where(scale > 0, scale, 1.0)
        w_rot /= scale
        try:
            return self._rounded(w_rot, h_rot, scale, in_t.signs.float(), out_signs, (m, n))
        except torch.linalg.LinAlgError:
            raise EngineError(f"{self.name}: Hessian not positive definite ({m}x{n} layer); raise --damp") from None

    def _rounded(self, w_rot: torch.Tensor, h_rot: torch.Tensor, scale: torch.Tensor, signs_in: torch.Tensor,
                 signs_out: torch.Tensor | None, shape: tuple[int, int]) -> QuipWeight:
        """The packed weight (``shape``) of the scaled, rotated ``w_rot``, rounded by block LDLQ."""
        codes, _ = ldlq(w_rot, h_rot, rvq_block_encoder(STAGES[self.bits]), self.tune_iters)
        return QuipWeight(list(codes.unbind(-1)), scale, signs_in, signs_out, out_features=shape[0],
                          in_features=shape[1], bits=self.bits)
