"""Group-wise integer weights: ``W[r, c] = scale[r, g] * (code[r, c] - zero[r, g])``, ``g = c // G``.

The storage format shared by round-to-nearest and OPTQ.  Codes (row by row) and,
for the asymmetric case, zero points (one stream for the whole matrix) are
bit-packed; scales are float16.  The last group
of a row may be shorter than ``G`` (e.g. FFN inputs of width 172).  OPTQ with
act-order stores columns in a permuted order (``perm``) so that groups stay
contiguous; dequantization undoes the permutation.
"""

from __future__ import annotations

from typing import Any

import torch

from engine.options import Option, SettingError
from engine.quant.base import QuantizedWeight, Span, lcm_granule, register_format
from engine.quant.kernels import dequantize_groups
from engine.quant.packing import SUPPORTED_BITS, pack, unpack, unpack_columns

SCALE_DTYPE = torch.float16

# The settings of every group-wise method (round-to-nearest, OPTQ); defaults are the best measured (docs/quality.md).
GROUPWISE_OPTIONS = {
    "bits": Option("int", 4, "Bits per weight.", choices=SUPPORTED_BITS),
    "group_size": Option("int", 32, "Columns sharing one scale and zero point; -1: one group per row.", minimum=-1),
    "symmetric": Option("bool", False, "Symmetric grid, without zero points."),
}


def check_settings(bits: int, group_size: int, in_features: int | None = None) -> int:
    """Validate bits and group size; returns the effective group size (-1 means one group per row)."""
    if bits not in SUPPORTED_BITS:
        raise SettingError("bits", f"expected one of {', '.join(map(str, SUPPORTED_BITS))}, got {bits}")
    if group_size == 0 or group_size < -1:
        raise SettingError("group_size", f"expected a positive integer or -1 (one group per row), got {group_size}")
    if in_features is not None and group_size == -1:
        return in_features
    return group_size


def group_params(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(scale, zero)`` for a block of columns ``w`` (``[rows, k]``).

    Min/max range widened to include 0 so that zero is exactly representable;
    the scale is rounded to its storage dtype here, so codes are chosen against
    the scale that dequantization will use.
    """
    return range_params(w.amin(dim=1), w.amax(dim=1), bits, symmetric)


def range_params(
    w_min: torch.Tensor, w_max: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` from per-group minima and maxima (any shape)."""
    maxq = (1 << bits) - 1
    lo = torch.clamp(w_min.float(), max=0.0)
    hi = torch.clamp(w_max.float(), min=0.0)
    if symmetric:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    empty = (lo == 0) & (hi == 0)
    lo = torch.where(empty, -1.0, lo)
    hi = torch.where(empty, 1.0, hi)
    scale = ((hi - lo) / maxq).to(SCALE_DTYPE).float()
    scale = torch.where(scale == 0, torch.finfo(SCALE_DTYPE).tiny, scale)
    if symmetric:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.clamp(torch.round(-lo / scale), 0, maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Round ``w`` to codes against broadcastable ``scale``/``zero``, into ``out`` when given (in place there)."""
    if out is None:
        return torch.clamp(torch.round(w.float() / scale) + zero, 0, (1 << bits) - 1)
    return torch.div(w.float(), scale, out=out).round_().add_(zero).clamp_(0, (1 << bits) - 1)


@register_format
class GroupQuantizedWeight(QuantizedWeight):
    format_name = "groupwise"

    def __init__(
        self,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None,
        *,
        bits: int,
        group_size: int,
        in_features: int,
        perm: torch.Tensor | None = None,
    ) -> None:
        """``codes`` [out, in] and ``zeros`` [out, n_groups] are integer (unpacked) tensors."""
        super().__init__(codes.shape[0], in_features)
        self.bits = bits
        self.group_size = group_size
        self.symmetric = zeros is None
        self.register_buffer("codes", pack(codes, bits))
        self.register_buffer("scales", scales.to(SCALE_DTYPE).contiguous())
        if zeros is not None:
            # one bit stream for the whole matrix: rows hold only a few zero points each
            self.register_buffer("zeros", pack(zeros.reshape(1, -1), bits))
        if perm is not None:
            self.register_buffer("perm", perm.to(torch.int32).contiguous())
            self.register_buffer("inv_perm", torch.argsort(perm).to(torch.int64), persistent=False)

    @property
    def n_groups(self) -> int:
        return self.scales.shape[1]

    @property
    def has_row_scales(self) -> bool:
        return True

    def scale_rows(self, gain: torch.Tensor) -> None:
        self.scales.copy_((self.scales.float() * gain.float().to(self.scales.device)[:, None]).to(self.scales.dtype))

    @property
    def column_granule(self) -> int | None:
        """Whole groups; none with act-order (stored columns are permuted: a span of the weight's columns is
        spread over every group) or one group per row."""
        if hasattr(self, "perm") or self.group_size >= self.in_features:
            return None
        return lcm_granule(self.group_size)

    def config(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "out_features": self.out_features,
            "in_features": self.in_features,
            "act_order": hasattr(self, "perm"),
        }

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> GroupQuantizedWeight:
        bits, n_in = config["bits"], config["in_features"]
        obj = cls.__new__(cls)
        QuantizedWeight.__init__(obj, config["out_features"], n_in)
        obj.bits, obj.group_size, obj.symmetric = bits, config["group_size"], config["symmetric"]
        obj.register_buffer("codes", tensors["codes"])
        obj.register_buffer("scales", tensors["scales"])
        if not obj.symmetric:
            obj.register_buffer("zeros", tensors["zeros"])
        if config.get("act_order"):
            obj.register_buffer("perm", tensors["perm"])
            obj.register_buffer("inv_perm", torch.argsort(tensors["perm"]).to(torch.int64), persistent=False)
        return obj

    def _zero_points(self, rows: slice, g0: int, g1: int) -> torch.Tensor | None:
        if self.symmetric:
            return None
        r0, r1, _ = rows.indices(self.out_features)  # only these rows' zero points: a tile's share, not all
        zeros = unpack_columns(self.zeros, self.bits, r0 * self.n_groups, r1 * self.n_groups)
        return zeros.view(r1 - r0, self.n_groups)[:, g0:g1]

    def _dequantize_stored(self, dtype: torch.dtype, rows: slice, c0: int, c1: int) -> torch.Tensor:
        """Columns ``[c0, c1)`` in storage order, computed one whole group at a time."""
        G = self.group_size
        g0, g1 = c0 // G, -(-c1 // G)
        lo, hi = g0 * G, min(g1 * G, self.in_features)
        dense = dequantize_groups(
            self.codes[rows], self.scales[rows, g0:g1], self._zero_points(rows, g0, g1), self.bits, G, lo, hi, dtype
        )
        return dense[:, c0 - lo : c1 - lo]

    def dequantize(
        self, dtype: torch.dtype = torch.float32, rows: Span | None = None, cols: Span | None = None
    ) -> torch.Tensor:
        row_slice = slice(*rows) if rows else slice(None)
        c0, c1 = cols if cols else (0, self.in_features)
        if not hasattr(self, "perm"):
            return self._dequantize_stored(dtype, row_slice, c0, c1)
        dense = self._dequantize_stored(dtype, row_slice, 0, self.in_features)
        return dense[:, self.inv_perm[c0:c1]]


def unpacked_codes(weight: GroupQuantizedWeight) -> torch.Tensor:
    """All codes of a weight as ``uint8`` ``[out, in]`` in storage order (for tests and tools)."""
    return unpack(weight.codes, weight.bits, weight.in_features)


def zero_points(weight: GroupQuantizedWeight) -> torch.Tensor:
    """Every group's zero point ``[out, n_groups]`` (the grid's middle where the weight is symmetric)."""
    if weight.symmetric:
        return torch.full((weight.out_features, weight.n_groups), 1 << (weight.bits - 1), dtype=torch.uint8)
    return weight._zero_points(slice(None), 0, weight.n_groups)
