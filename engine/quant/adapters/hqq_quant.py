"""HQQ (half-quadratic quantization): calibration-free zero-point optimisation, via the ``hqq`` package.

``hqq.core.quantize.Quantizer`` is the black box: ``quantize`` runs HQQ's proximal
solver for the per-group zero points and picks the codes; ``dequantize`` applies
``(W_q - zero) * scale``.  Settings follow HQQ's own defaults for linear layers
(``hqq_base_quant_config``: ``axis=1``, zero rounding at 4 bits).  With ``axis=1``
HQQ groups ``group_size`` consecutive weights of the *flattened* matrix, so for a
width such as 172 a group may straddle two rows; when groups tile every row, a
tile dequantizes only the groups under it.

Storage: one row of codes per group, bit-packed with the engine's dense packing
(HQQ's own 3-bit layout spends 32 bits on 10 codes and pads the group count to a
multiple of 10, which costs up to 1.5 bits per weight on small layers), plus one
float16 scale and zero per group, the precision ``HQQLinear`` keeps them in with
a float16 compute dtype.  Dequantization unpacks the groups it needs and hands
them to HQQ's ``dequantize``, which computes in float32.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from engine.errors import EngineError
from engine.options import Option, SettingError
from engine.quant.base import (
    LayerStats, QuantizedWeight, Quantizer, Span, lcm_granule, register_format, register_quantizer,
)
from engine.quant.packing import pack, unpack

HQQ_BITS = (2, 3, 4, 8)
META_DTYPE = torch.float16


@functools.cache
def hqq_quantizer() -> Any:
    """``hqq.core.quantize.Quantizer`` (imported on first use: importing hqq takes seconds)."""
    try:
        from hqq.core.quantize import Quantizer as HQQ
    except ImportError as exc:
        raise EngineError(f"hqq is not installed ({exc}); `pip install hqq`") from None
    return HQQ


def check_hqq_shape(group_size: int, shape: tuple[int, ...]) -> None:
    if (shape[0] * shape[1]) % group_size:
        raise EngineError(
            f"hqq groups run over the flattened weight: its {shape[0] * shape[1]} elements {tuple(shape)} "
            f"are not a multiple of the group size {group_size}"
        )


@register_format
class HQQWeight(QuantizedWeight):
    format_name = "hqq"

    def __init__(self, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
        """Use :meth:`from_hqq` or :meth:`from_state`; ``codes`` are packed, one group per row."""
        super().__init__(config["out_features"], config["in_features"])
        self.bits: int = config["bits"]
        self.group_size: int = config["group_size"]
        for name in ("codes", "scale", "zero"):
            if name not in tensors:
                raise EngineError(f"hqq weight: missing tensor {name!r}")
            self.register_buffer(name, tensors[name])

    @classmethod
    def from_hqq(cls, codes: torch.Tensor, meta: dict[str, Any]) -> HQQWeight:
        """Wrap HQQ's ``Quantizer.quantize(..., axis=1, bitpack=False)`` output: codes ``[n_groups, group_size]``."""
        out_f, in_f = meta["shape"]
        bits = meta["nbits"]
        tensors = {
            "codes": pack(codes.to(torch.uint8), bits),
            "scale": meta["scale"].to(META_DTYPE).contiguous(),
            "zero": meta["zero"].to(META_DTYPE).contiguous(),
        }
        return cls(tensors, {"bits": bits, "group_size": meta["group_size"], "out_features": out_f, "in_features": in_f})

    def config(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "out_features": self.out_features,
            "in_features": self.in_features,
        }

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> HQQWeight:
        return cls(tensors, config)

    def _dequantize_groups(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """HQQ's ``dequantize`` on some groups (packed code rows with their scales and zeros), float32."""
        codes = unpack(codes.reshape(-1, codes.shape[-1]), self.bits, self.group_size)
        meta = {
            "nbits": self.bits,
            "group_size": self.group_size,
            "shape": codes.shape,
            "axis": 1,
            "packing": None,
            "view_as_float": False,
            "compute_dtype": torch.float32,
            "scale": scale.reshape(-1, 1).float(),
            "zero": zero.reshape(-1, 1).float(),
        }
        return hqq_quantizer().dequantize(codes, meta)

    @property
    def column_granule(self) -> int | None:
        """Whole groups when groups tile every row; none when they straddle rows."""
        return lcm_granule(self.group_size) if self.in_features % self.group_size == 0 else None

    def dequantize(
        self, dtype: torch.dtype = torch.float32, rows: Span | None = None, cols: Span | None = None
    ) -> torch.Tensor:
        n_out, n_in, G = self.out_features, self.in_features, self.group_size
        r0, r1 = rows if rows else (0, n_out)
        c0, c1 = cols if cols else (0, n_in)
        if n_in % G == 0:
            # Groups tile every row: dequantize just the groups under the tile.
            g0, g1 = c0 // G, -(-c1 // G)
            pick = (slice(r0, r1), slice(g0, g1))
            codes = self.codes.view(n_out, n_in // G, -1)[pick]
            scale, zero = self.scale.view(n_out, -1)[pick], self.zero.view(n_out, -1)[pick]
            dense = self._dequantize_groups(codes, scale, zero).view(r1 - r0, -1)
            return dense[:, c0 - g0 * G : c1 - g0 * G].to(dtype)
        # Groups straddle rows: the whole groups covering the rows' flat range.
        start, stop = r0 * n_in, r1 * n_in
        g0, g1 = start // G, -(-stop // G)
        flat = self._dequantize_groups(self.codes[g0:g1], self.scale[g0:g1], self.zero[g0:g1]).reshape(-1)
        offset = g0 * G
        return flat[start - offset : stop - offset].view(r1 - r0, n_in)[:, c0:c1].to(dtype)


@register_quantizer
class HQQQuantizer(Quantizer):
    """HQQ at 2/3/4/8 bits with HQQ's default linear-layer settings."""

    name = "hqq"
    options = {
        "bits": Option("int", 4, "Bits per weight.", choices=HQQ_BITS),
        "group_size": Option("int", 32, "Weights per group (of the flattened weight); a multiple of 8.", minimum=8),
    }

    def validate(self) -> None:
        if self.group_size % 8:
            raise SettingError("group_size", f"hqq takes a multiple of 8, got {self.group_size}")

    def quantize(self, weight: torch.Tensor, stats: LayerStats | None = None) -> HQQWeight:
        check_hqq_shape(self.group_size, tuple(weight.shape))
        HQQ = hqq_quantizer()
        from hqq.core.quantize import hqq_base_quant_config

        params = hqq_base_quant_config(nbits=self.bits, group_size=self.group_size, axis=1)["weight_quant_params"]
        w = weight.detach().float().contiguous()
        codes, meta = HQQ.quantize(w, device=w.device, compute_dtype=torch.float32, bitpack=False, **params)
        return HQQWeight.from_hqq(codes, meta)
