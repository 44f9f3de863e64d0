"""The packed layout of hub AWQ checkpoints (AutoAWQ's ``gemm`` version, 4 bits), used as it is.

For a layer with ``in`` inputs and ``out`` outputs: ``qweight`` int32
``[in, out / 8]`` holds eight 4-bit codes of consecutive outputs per word in
AWQ's interleaved order (word nibble ``k`` is output ``ORDER[k]`` of its eight);
``qzeros`` int32 ``[groups, out / 8]`` the zero points, packed the same way;
``scales`` ``[groups, out]`` (float16); groups run over ``group_size``
consecutive inputs.  ``W[o, i] = scales[g, o] * (q[i, o] - z[g, o])``,
``g = i // group_size``: exact in float32, so a float16 result is the
reference's float16 arithmetic.
"""

from __future__ import annotations

from typing import Any

import torch

from engine.errors import EngineError
from engine.quant.base import QuantizedWeight, Span, register_format

BITS = 4
PER_WORD = 32 // BITS
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble k of a word holds output ORDER[k] of its eight


def unpack_columns(words: torch.Tensor) -> torch.Tensor:
    """``[n, m]`` int32 words -> ``[n, 8 m]`` codes, each word's eight outputs in their natural order."""
    shifts = torch.arange(0, 32, BITS, device=words.device)
    nibbles = (words.to(torch.int64).unsqueeze(-1) >> shifts) & 0xF  # [n, m, 8]: nibble k
    natural = torch.empty_like(nibbles)
    natural[..., list(ORDER)] = nibbles
    return natural.reshape(words.shape[0], -1)


@register_format
class AWQPackedWeight(QuantizedWeight):
    """A hub AWQ layer's tensors behind the QuantizedWeight interface (see the module docstring)."""

    format_name = "awq"

    def __init__(self, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> None:
        in_features, out_features = qweight.shape[0], qweight.shape[1] * PER_WORD
        if scales.shape != (-(-in_features // group_size), out_features) or qzeros.shape != (scales.shape[0], qweight.shape[1]):
            raise EngineError(f"AWQ tensors disagree with group size {group_size}: qweight {tuple(qweight.shape)}, "
                              f"qzeros {tuple(qzeros.shape)}, scales {tuple(scales.shape)}")
        super().__init__(out_features, in_features)
        self.group_size = group_size
        self.register_buffer("qweight", qweight)
        self.register_buffer("qzeros", qzeros)
        self.register_buffer("scales", scales)

    @property
    def column_granule(self) -> int | None:
        return self.group_size

    def dequantize(
        self, dtype: torch.dtype = torch.float32, rows: Span | None = None, cols: Span | None = None
    ) -> torch.Tensor:
        r0, r1 = rows or (0, self.out_features)
        c0, c1 = cols or (0, self.in_features)
        w0, w1 = r0 // PER_WORD, -(-r1 // PER_WORD)  # the words that hold outputs r0..r1
        skip = r0 - w0 * PER_WORD
        codes = unpack_columns(self.qweight[c0:c1, w0:w1])[:, skip : skip + r1 - r0]  # [inputs, outputs]
        groups = torch.arange(c0, c1, device=codes.device) // self.group_size
        zeros = unpack_columns(self.qzeros[:, w0:w1])[:, skip : skip + r1 - r0][groups]
        scales = self.scales[groups, r0:r1].float()
        return (scales * (codes - zeros).float()).T.to(dtype)

    def config(self) -> dict[str, Any]:
        return {"group_size": self.group_size}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> AWQPackedWeight:
        return cls(tensors["qweight"], tensors["qzeros"], tensors["scales"], config["group_size"])
