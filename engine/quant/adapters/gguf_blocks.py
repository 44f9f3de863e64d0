"""GGML block formats (the tensors of a quantized GGUF file), dequantized with vectorised torch.

Each row of a ``[out, in]`` weight is a run of fixed-size blocks along the input
dimension: ``block_size`` weights (32, or 256 for the K-quants) in ``type_size``
bytes holding float16 scales and packed codes.  :class:`GGUFWeight` stores those
bytes untouched, so a model shipped as Q4_K loads without re-quantizing and its
bits per weight are exactly the file's.  The decoders below follow GGML's layouts
(ggml-quants.c, mirrored by gguf-py's ``gguf.quants``), computing in float32 with
the same operation order, so the result equals ``gguf.quants.dequantize`` bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from engine.errors import EngineError
from engine.quant.base import QuantizedWeight, Span, lcm_granule, register_format

U8 = torch.uint8


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Little-endian float16 fields ``[n, 2k]`` bytes -> ``[n, k]`` float32."""
    return b.contiguous().view(torch.float16).float()


def _shifts(values: list[int], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=U8, device=device).view(shape)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """``[n, m]`` bytes -> ``[n, 2m]`` codes: all low nibbles, then all high nibbles."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _bits(b: torch.Tensor) -> torch.Tensor:
    """``[n, k]`` bytes -> ``[n, 8k]`` bits, little-endian (bit ``i`` of a uint32 is element ``i``)."""
    return ((b.unsqueeze(-1) >> _shifts(list(range(8)), (8,), b.device)) & 1).reshape(b.shape[0], -1)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    return d * (_nibbles(b[:, 2:]).to(torch.int8) - 8).float()


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    return d * _nibbles(b[:, 4:]).float() + m


def _q5(b: torch.Tensor, with_min: bool) -> torch.Tensor:
    d = _f16(b[:, :2])
    at = 4 if with_min else 2
    q = _nibbles(b[:, at + 4 :]) | (_bits(b[:, at : at + 4]) << 4)
    if with_min:
        return d * q.float() + _f16(b[:, 2:4])
    return d * (q.to(torch.int8) - 16).float()


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b[:, :2])


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0x0F).float()).view(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).view(n, 16, 1)
    q = (qs.reshape(n, 2, 1, 32) >> _shifts([0, 2, 4, 6], (1, 1, 4, 1), b.device)) & 3
    return (dl * q.reshape(n, 16, 16).float() - ml).reshape(n, 256)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hmask, qs, scales, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    # 16 six-bit scales: low 4 bits in bytes 0-7 (two per byte), high 2 bits in bytes 8-11 (four per byte).
    low = (scales[:, :8].reshape(n, 1, 8) >> _shifts([0, 4], (1, 2, 1), b.device)).reshape(n, 16)
    high = (scales[:, 8:12].reshape(n, 1, 4) >> _shifts([0, 2, 4, 6], (1, 4, 1), b.device)).reshape(n, 16)
    sc = (((low & 0x0F) | ((high & 3) << 4)).to(torch.int8) - 32).float()
    dl = (d * sc).view(n, 16, 1)
    ql = ((qs.reshape(n, 2, 1, 32) >> _shifts([0, 2, 4, 6], (1, 1, 4, 1), b.device)) & 3).reshape(n, 16, 16)
    qh = ((hmask.reshape(n, 1, 1, 32) >> _shifts(list(range(8)), (1, 1, 8, 1), b.device)) & 1).reshape(n, 16, 16)
    q = (ql.to(torch.int8) - ((qh ^ 1) << 2).to(torch.int8)).float()  # a set hmask bit means no -4 offset
    return (dl * q).reshape(n, 256)


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: eight 6-bit scales and eight 6-bit mins packed in 12 bytes."""
    s = scales.reshape(-1, 3, 4)
    sd, sm, smd = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([sd & 0x3F, (smd & 0x0F) | ((sd >> 2) & 0x30)], dim=-1)
    mn = torch.cat([sm & 0x3F, (smd >> 4) | ((sm >> 2) & 0x30)], dim=-1)
    return sc.float(), mn.float()


def _q45_k(b: torch.Tensor, five_bits: bool) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    dd, dm = (d * sc).view(n, 8, 1), (dmin * mn).view(n, 8, 1)
    qs = b[:, 48:] if five_bits else b[:, 16:]
    q = ((qs.reshape(n, 4, 1, 32) >> _shifts([0, 4], (1, 1, 2, 1), b.device)) & 0x0F).reshape(n, 8, 32)
    if five_bits:
        qh = (b[:, 16:48].reshape(n, 1, 1, 32) >> _shifts(list(range(8)), (1, 1, 8, 1), b.device)) & 1
        q = q | (qh.reshape(n, 8, 32) << 4)
    return (dd * q.float() - dm).reshape(n, 256)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql, qh = b[:, :128], b[:, 128:192]
    sc = b[:, 192:208].contiguous().view(torch.int8).float()
    dd = (_f16(b[:, 208:210]) * sc).view(n, 16, 1)
    low = ((ql.reshape(n, 2, 1, 64) >> _shifts([0, 4], (1, 1, 2, 1), b.device)) & 0x0F).reshape(n, 8, 32)
    high = ((qh.reshape(n, 2, 1, 32) >> _shifts([0, 2, 4, 6], (1, 1, 4, 1), b.device)) & 3).reshape(n, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    return (dd * q).reshape(n, 256)


def _bf16(b: torch.Tensor) -> torch.Tensor:
    return (b.contiguous().view(torch.int16).to(torch.int32) << 16).view(torch.float32)


T = GGMLQuantizationType
DECODERS: dict[GGMLQuantizationType, Callable[[torch.Tensor], torch.Tensor]] = {
    T.F32: lambda b: b.contiguous().view(torch.float32),
    T.F16: _f16,
    T.BF16: _bf16,
    T.Q4_0: _q4_0,
    T.Q4_1: _q4_1,
    T.Q5_0: lambda b: _q5(b, with_min=False),
    T.Q5_1: lambda b: _q5(b, with_min=True),
    T.Q8_0: _q8_0,
    T.Q2_K: _q2_k,
    T.Q3_K: _q3_k,
    T.Q4_K: lambda b: _q45_k(b, five_bits=False),
    T.Q5_K: lambda b: _q45_k(b, five_bits=True),
    T.Q6_K: _q6_k,
}
# The lookup-grid types (llama.cpp's "i-quants", ternary and MXFP4) decode through gguf-py's own dequantizer, on
# the host: each row tile's blocks go down and its weights come back.
HOST_DECODED = ("IQ4_NL", "IQ4_XS", "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S", "TQ2_0",
                "TQ1_0", "MXFP4")


def _on_host(qtype: GGMLQuantizationType) -> Callable[[torch.Tensor], torch.Tensor]:
    def decode(b: torch.Tensor) -> torch.Tensor:
        from gguf.quants import dequantize

        return torch.from_numpy(dequantize(b.cpu().numpy(), qtype)).to(b.device)

    return decode


DECODERS.update({T[name]: _on_host(T[name]) for name in HOST_DECODED if hasattr(T, name)})
SUPPORTED_TYPES = tuple(t.name for t in DECODERS)


def ggml_type(name: str) -> GGMLQuantizationType:
    """The GGML type called ``name`` (e.g. ``"Q4_K"``), if the engine can dequantize it."""
    qtype = getattr(GGMLQuantizationType, name, None)
    if qtype not in DECODERS:
        raise EngineError(f"unsupported GGML tensor type {name!r}; supported: {', '.join(SUPPORTED_TYPES)}")
    return qtype


def dequantize_blocks(blocks: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    """``[..., n * type_size]`` bytes -> ``[..., n * block_size]`` float32 weights."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    *lead, n_bytes = blocks.shape
    values = DECODERS[qtype](blocks.reshape(-1, type_size))
    return values.reshape(*lead, n_bytes // type_size * block_size)


@register_format
class GGUFWeight(QuantizedWeight):
    """A weight kept in its GGUF block encoding (``blocks``: ``[out, row_bytes]`` uint8)."""

    format_name = "gguf"

    def __init__(self, blocks: torch.Tensor, qtype: str, in_features: int) -> None:
        self.qtype = ggml_type(qtype)
        block_size, type_size = GGML_QUANT_SIZES[self.qtype]
        if blocks.dtype != U8 or blocks.dim() != 2:
            raise EngineError(f"gguf {qtype} weight: expected 2-D uint8 block bytes, got {blocks.dtype} {tuple(blocks.shape)}")
        if in_features % block_size or blocks.shape[1] != in_features // block_size * type_size:
            raise EngineError(
                f"gguf {qtype} weight: {blocks.shape[1]} bytes per row do not hold {in_features} weights "
                f"in blocks of {block_size} ({type_size} bytes each)"
            )
        super().__init__(blocks.shape[0], in_features)
        self.register_buffer("blocks", blocks.contiguous())

    def config(self) -> dict[str, Any]:
        return {"ggml_type": self.qtype.name, "out_features": self.out_features, "in_features": self.in_features}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> GGUFWeight:
        if "blocks" not in tensors:
            raise EngineError("gguf weight: missing tensor 'blocks'")
        return cls(tensors["blocks"], config["ggml_type"], config["in_features"])

    @property
    def column_granule(self) -> int:
        return lcm_granule(GGML_QUANT_SIZES[self.qtype][0])

    def dequantize(
        self, dtype: torch.dtype = torch.float32, rows: Span | None = None, cols: Span | None = None
    ) -> torch.Tensor:
        block_size, type_size = GGML_QUANT_SIZES[self.qtype]
        c0, c1 = cols if cols else (0, self.in_features)
        b0, b1 = c0 // block_size, -(-c1 // block_size)
        data = self.blocks[slice(*rows) if rows else slice(None), b0 * type_size : b1 * type_size]
        dense = dequantize_blocks(data, self.qtype)
        return dense[:, c0 - b0 * block_size : c1 - b0 * block_size].to(dtype)
