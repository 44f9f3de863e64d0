"""QTIP: QuIP#'s incoherence and block LDLQ with trellis codes in place of lattice codes (Tseng et al., 2024).

Everything but the codes is QuIP#'s (:mod:`engine.quant.quip`, input side
rotated, one float16 scale per output row): a block of 8 rotated columns is
rounded, its error fed forward by the ``L`` factor, then refined by
``tune_iters`` passes.  A block is rounded by the bitshift trellis of
:mod:`engine.quant.trellis`: its rows are cut into tiles of :data:`TILE_ROWS`
rows, and each tile's ``TILE_ROWS x 8`` values, row after row, are one
sequence, encoded jointly by Viterbi.  Stored: ``bits`` bits per weight (the
symbols, ``bits`` bytes per 8), the row scales and the sign vector.

A row tile decodes whole trellis tiles (its rows, rounded out to multiples of
:data:`TILE_ROWS`); the layer's products align their tiles to them.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from engine.errors import EngineError
from engine.options import Option
from engine.quant.base import QuantizedWeight, register_format, register_quantizer
from engine.quant.e8p import DIM
from engine.quant.kernels import codebook_kernels
from engine.quant.quip import SCALE_DTYPE, BlockEncoder, QuipQuantizer, QuipWeight, ldlq, pack_signs
from engine.quant.trellis import STATE_BITS, code_table, pack_symbols, trellis_decode, unpack_symbols, viterbi_encode

TILE_ROWS = 32  # rows of one trellis sequence
TILE_SYMBOLS = TILE_ROWS * DIM  # the sequence's length: 256 weights, QTIP's
BITS = (2, 3, 4)
# bits -> target RMS of the scaled, rotated weight against the unit-variance code: at 3 bits, unit Gaussian data
# scaled to RMS 1.11, 1.0 and 0.91 came back with mean squared errors 0.0208, 0.0190 and 0.0186 (a flat optimum)
DEFAULT_RMS: dict[int, float] = {2: 0.9, 3: 0.9, 4: 0.9}


def trellis_block_encoder(bits: int, table: torch.Tensor) -> BlockEncoder:
    """A block ``[m, 8]``: each tile of :data:`TILE_ROWS` rows one trellis sequence; symbols ``[m, 8]``."""
    def encode(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = target.reshape(-1)
        whole = flat.numel() - flat.numel() % TILE_SYMBOLS
        parts = [viterbi_encode(seqs, bits, table).reshape(-1)
                 for seqs in (flat[:whole].view(-1, TILE_SYMBOLS), flat[whole:].view(1, -1)) if seqs.numel()]
        symbols = torch.cat(parts)
        values = trellis_decode(symbols, bits, table.to(target.device), TILE_SYMBOLS)
        return symbols.view(target.shape), values.view(target.shape).to(target.dtype)

    return encode


@register_format
class TrellisWeight(QuipWeight):
    """``W = scale ⊙ decode(symbols) V`` cropped to ``[out_features, in_features]``: QuIP#'s weight with trellis
    symbols (``codes``, uint8 ``[out, in_padded / 8, bits]``) in place of lattice codes."""

    format_name = "qtip_trellis"
    row_align: ClassVar[int] = TILE_ROWS

    def __init__(self, symbols: torch.Tensor, scale: torch.Tensor, signs_in: torch.Tensor, *, out_features: int,
                 in_features: int, bits: int) -> None:
        QuantizedWeight.__init__(self, out_features, in_features)
        self.bits, self.in_padded, self.out_padded = bits, len(signs_in), out_features
        self.register_buffer("codes", pack_symbols(symbols, bits).contiguous())
        self.register_buffer("scale", scale.to(SCALE_DTYPE).reshape(-1).contiguous())
        self.register_buffer("signs_in", pack_signs(signs_in))

    def config(self) -> dict[str, Any]:
        return {"bits": self.bits, "out_features": self.out_features, "in_features": self.in_features,
                "in_padded": self.in_padded, "state_bits": STATE_BITS, "tile_rows": TILE_ROWS}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> TrellisWeight:
        layout = (config.get("bits"), config.get("state_bits"), config.get("tile_rows"))
        if layout[0] not in BITS or layout[1:] != (STATE_BITS, TILE_ROWS):
            raise EngineError(f"qtip_trellis weight: unsupported layout (bits, state bits, tile rows) {layout}; this "
                              f"version reads bits {BITS} with {STATE_BITS} state bits and tiles of {TILE_ROWS} rows")
        obj = cls.__new__(cls)
        QuantizedWeight.__init__(obj, config["out_features"], config["in_features"])
        obj.bits, obj.in_padded, obj.out_padded = config["bits"], config["in_padded"], config["out_features"]
        for name in ("codes", "scale", "signs_in"):
            obj.register_buffer(name, tensors[name])
        return obj

    def rotated(self, rows: slice = slice(None)) -> torch.Tensor:
        """``scale ⊙ decode(symbols)`` for stored ``rows`` (float32): the whole tiles they lie in are decoded."""
        r0, r1, _ = rows.indices(self.out_features)
        kernels = codebook_kernels(self.codes.device)
        if kernels is not None:
            return kernels.trellis_rotated(self.codes, self.scale, self.bits, STATE_BITS, TILE_ROWS, r0, r1)
        t0 = r0 - r0 % TILE_ROWS
        symbols = unpack_symbols(self.codes[t0:r1], self.bits)  # [r, blocks, 8]
        sequences = symbols.transpose(0, 1).reshape(symbols.shape[1], -1)  # per block: its tiles back to back
        table = code_table(STATE_BITS, self.codes.device)
        values = trellis_decode(sequences, self.bits, table, TILE_SYMBOLS)
        decoded = values.view(symbols.shape[1], -1, DIM).transpose(0, 1).reshape(r1 - t0, -1)[r0 - t0:]
        return decoded * self.scale.float()[r0:r1, None]


@register_quantizer
class QtipQuantizer(QuipQuantizer):
    """QTIP at 2, 3 or 4 bits per weight: trellis codes under QuIP#'s incoherence and LDLQ (needs calibration
    statistics)."""

    name = "qtip"
    incoherence = "input"  # one scale per output row, as QuIP#'s default
    options = {
        "bits": Option("int", 2, "Bits per weight.", choices=BITS),
        "damp": QuipQuantizer.options["damp"],
        "rms": Option("float", None, "Target RMS of the scaled weight [by bits].", minimum=0.0, above=True,
                      optional=True),
        "tune_iters": Option("int", 2, "Rounds of refining the codes after the first LDLQ pass.", minimum=0),
    }

    def validate(self) -> None:
        if self.rms is None:  # recorded resolved, so the manifest says what was used
            self.rms = self.settings["rms"] = DEFAULT_RMS[self.bits]

    def _rounded(self, w_rot: torch.Tensor, h_rot: torch.Tensor, scale: torch.Tensor, signs_in: torch.Tensor,
                 signs_out: torch.Tensor | None, shape: tuple[int, int]) -> TrellisWeight:
        table = code_table(STATE_BITS, w_rot.device).to(w_rot.dtype)
        symbols, _ = ldlq(w_rot, h_rot, trellis_block_encoder(self.bits, table), self.tune_iters)
        return TrellisWeight(symbols, scale, signs_in, out_features=shape[0], in_features=shape[1], bits=self.bits)
