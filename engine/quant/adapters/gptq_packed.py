"""The packed layout of hub GPTQ checkpoints, used as it is (no re-quantization).

AutoGPTQ's layout, which transformers and most hub checkpoints use
(``checkpoint_format: gptq``), for a layer with ``in`` inputs and ``out``
outputs:

* ``qweight`` int32 ``[in * bits / 32, out]``: the codes of consecutive inputs,
  lowest bits first; with 3 bits, 32 inputs fill 3 words and two codes cross a
  word boundary (the words read as one 96-bit little-endian number);
* ``qzeros`` int32 ``[groups, out * bits / 32]``: each group's zero point minus
  one, packed the same way along the outputs;
* ``scales`` ``[groups, out]`` (float16); ``g_idx`` int32 ``[in]``: the group of
  each input (act-order checkpoints permute it).

``W[o, i] = scales[g, o] * (q[i, o] - ((z[g, o] + 1) mod 2^bits))`` with
``g = g_idx[i]``.  GPTQModel's ``gptq_v2`` stores the zero point itself
(``zero_offset`` 0).  The product is exact in float32 (an 11-bit scale times a
9-bit integer), so a float16 result is the reference's float16 arithmetic.
"""

from __future__ import annotations

from typing import Any

import torch

from engine.errors import EngineError
from engine.quant.base import QuantizedWeight, Span, register_format

BITS = (2, 3, 4, 8)
WORD = 32


def _unsigned(words: torch.Tensor) -> torch.Tensor:
    """int32 words as their unsigned values (int64), so shifts bring in zeros."""
    return words.to(torch.int64) & 0xFFFFFFFF


def unpack_rows(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Codes ``[n, m]`` packed along dim 0 of int32 ``words`` (``[n * bits / 32, m]``, rounded up)."""
    u = _unsigned(words)
    mask = (1 << bits) - 1
    if bits != 3:
        per = WORD // bits
        shifts = torch.arange(0, WORD, bits, device=words.device).view(1, per, 1)
        return ((u.unsqueeze(1) >> shifts) & mask).reshape(-1, words.shape[1])[:n]
    u = u.view(-1, 3, words.shape[1])  # 32 codes per 3 words
    bit = torch.arange(0, 3 * WORD, 3, device=words.device)
    low, shift = bit // WORD, bit % WORD
    high = torch.clamp(low + 1, max=2)  # the next word, for the two codes that cross into it
    codes = (u[:, low] >> shift.view(1, -1, 1)) | (u[:, high] << (WORD - shift).view(1, -1, 1))
    return (codes & mask).reshape(-1, words.shape[1])[:n]


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``[n, m]`` (``n`` a multiple of 32) as int32 words ``[n * bits / 32, m]``: :func:`unpack_rows`'
    inverse."""
    n, m = codes.shape
    if n % WORD:
        raise EngineError(f"GPTQ packing needs a multiple of {WORD} rows, got {n}")
    c = codes.to(torch.int64).view(n // WORD, WORD, m)  # 32 codes fill `bits` words
    words = torch.zeros(n // WORD, bits, m, dtype=torch.int64, device=codes.device)
    for k in range(WORD):
        bit = k * bits
        word, shift = bit // WORD, bit % WORD
        words[:, word] |= (c[:, k] << shift) & 0xFFFFFFFF
        if shift + bits > WORD:  # the code's high bits start the next word
            words[:, word + 1] |= c[:, k] >> (WORD - shift)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)  # as signed int32
    return words.view(-1, m).to(torch.int32)


@register_format
class GPTQPackedWeight(QuantizedWeight):
    """A hub GPTQ layer's tensors behind the QuantizedWeight interface (see the module docstring)."""

    format_name = "gptq"

    def __init__(self, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
                 bits: int, zero_offset: int = 1) -> None:
        if bits not in BITS:
            raise EngineError(f"GPTQ bits must be one of {BITS}, got {bits}")
        in_features = qweight.shape[0] * WORD // bits
        out_features = qweight.shape[1]
        if scales.shape[1] != out_features or qzeros.shape[0] != scales.shape[0]:
            raise EngineError(f"GPTQ tensors disagree: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
                              f"scales {tuple(scales.shape)}")
        super().__init__(out_features, in_features)
        self.bits, self.zero_offset = bits, zero_offset
        groups = scales.shape[0]
        if g_idx is None:
            g_idx = torch.arange(in_features, device=qweight.device) // -(-in_features // groups)
        if g_idx.shape != (in_features,) or int(g_idx.max()) >= groups or int(g_idx.min()) < 0:
            raise EngineError(f"GPTQ g_idx must give each of {in_features} inputs one of {groups} groups")
        self.register_buffer("qweight", qweight)
        self.register_buffer("qzeros", qzeros)
        self.register_buffer("scales", scales)
        self.register_buffer("g_idx", g_idx.to(torch.int32))

    @property
    def column_granule(self) -> int | None:
        return WORD  # 32 inputs fill whole words at every width

    def zero_points(self, rows: Span) -> torch.Tensor:
        """``[groups, rows]`` zero points as integers."""
        zeros = unpack_rows(self.qzeros.T, self.bits, self.out_features).T[:, rows[0] : rows[1]]
        return (zeros + self.zero_offset) & ((1 << self.bits) - 1)

    def dequantize(
        self, dtype: torch.dtype = torch.float32, rows: Span | None = None, cols: Span | None = None
    ) -> torch.Tensor:
        r0, r1 = rows or (0, self.out_features)
        c0, c1 = cols or (0, self.in_features)
        w0, w1 = c0 // WORD * self.bits, -(-c1 // WORD) * self.bits  # the words that hold inputs c0..c1
        codes = unpack_rows(self.qweight[w0:w1, r0:r1], self.bits, (w1 - w0) * WORD // self.bits)
        codes = codes[c0 - c0 // WORD * WORD :][: c1 - c0]  # [inputs, outputs]
        groups = self.g_idx[c0:c1].long()
        zeros = self.zero_points((r0, r1))[groups]
        scales = self.scales[groups, r0:r1].float()
        return (scales * (codes - zeros).float()).T.to(dtype)

    def config(self) -> dict[str, Any]:
        return {"bits": self.bits, "zero_offset": self.zero_offset}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> GPTQPackedWeight:
        return cls(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors.get("g_idx"), config["bits"],
                   config.get("zero_offset", 1))
