"""bitsandbytes NF4 / FP4: absmax-scaled 4-bit codes in flat blocks, the QLoRA storage format.

bitsandbytes is the black box: ``quantize_4bit`` picks the codes, ``dequantize_4bit``
(CPU backend or CUDA) turns them back.  Blocks run over the *flattened* weight: when
they tile every row, a tile dequantizes only the blocks under it; for a width such
as 172 a block may straddle two rows, and a tile dequantizes the whole blocks that
cover its rows and slices.  With double quantization the per-block
absmax values are themselves 8-bit blockwise-quantized (blocks of 256) around their mean.

Stored per weight: the packed nibbles, the absmax values (and, doubly quantized,
their fp32 scales and offset).  The 16-entry NF4/FP4 table and the 256-entry
dynamic map are constants of the format, supplied by bitsandbytes on load, so
they do not count against every layer's bits per weight.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, ClassVar

import torch

from engine.errors import EngineError
from engine.options import Option
from engine.quant.base import (
    LayerStats, QuantizedWeight, Quantizer, Span, lcm_granule, register_format, register_quantizer,
)

BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


@functools.cache
def bnb_functional() -> Any:
    """``bitsandbytes.functional``, imported on first use.

    Its CPU backend logs a warning when the optional ``kernels`` package (a fused
    4-bit GEMM) is missing; the engine never uses that GEMM, so the warning is muted.
    """
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as F
    except ImportError as exc:
        raise EngineError(f"bitsandbytes is not installed ({exc}); `pip install bitsandbytes`") from None
    return F


@register_format
class BnB4BitWeight(QuantizedWeight):
    format_name = "bnb4bit"

    def __init__(self, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
        """Use :meth:`from_quant_state` or :meth:`from_state`; ``tensors``/``config`` as in :meth:`config`."""
        super().__init__(config["out_features"], config["in_features"])
        self.quant_type: str = config["quant_type"]
        self.block_size: int = config["block_size"]
        self.double_quant: bool = config["double_quant"]
        self.nested_block_size: int | None = config.get("nested_block_size")
        names = ["packed", "absmax"] + (["nested_absmax", "nested_offset"] if self.double_quant else [])
        for name in names:
            if name not in tensors:
                raise EngineError(f"bnb4bit weight: missing tensor {name!r}")
            self.register_buffer(name, tensors[name])

    @classmethod
    def from_quant_state(cls, packed: torch.Tensor, state: Any) -> BnB4BitWeight:
        """Wrap the output of ``bitsandbytes.functional.quantize_4bit``."""
        out_f, in_f = state.shape
        tensors = {"packed": packed.reshape(-1).contiguous(), "absmax": state.absmax.contiguous()}
        config = {
            "quant_type": state.quant_type,
            "block_size": state.blocksize,
            "double_quant": state.nested,
            "out_features": out_f,
            "in_features": in_f,
        }
        if state.nested:
            tensors["nested_absmax"] = state.state2.absmax.float().contiguous()
            tensors["nested_offset"] = torch.as_tensor(state.offset, dtype=torch.float32).reshape(())
            config["nested_block_size"] = state.state2.blocksize
        return cls(tensors, config)

    def config(self) -> dict[str, Any]:
        config = {
            "quant_type": self.quant_type,
            "block_size": self.block_size,
            "double_quant": self.double_quant,
            "out_features": self.out_features,
            "in_features": self.in_features,
        }
        if self.double_quant:
            config["nested_block_size"] = self.nested_block_size
        return config

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> BnB4BitWeight:
        return cls(tensors, config)

    def quant_state(self) -> Any:
        """The bitsandbytes ``QuantState`` for this weight, rebuilt from the buffers (on their device)."""
        F = bnb_functional()
        device = self.packed.device
        state2 = offset = None
        if self.double_quant:
            code = F.create_dynamic_map().to(device)  # quantize_blockwise's default map
            state2 = F.QuantState(
                absmax=self.nested_absmax, blocksize=self.nested_block_size, code=code, dtype=torch.float32
            )
            offset = self.nested_offset
        return F.QuantState(
            absmax=self.absmax,
            shape=self.shape,
            dtype=torch.float32,
            blocksize=self.block_size,
            code=F.get_4bit_type(self.quant_type, device=device),
            quant_type=self.quant_type,
            offset=offset,
            state2=state2,
        )

    def _block_absmax(self, state: Any) -> torch.Tensor:
        """Per-block fp32 absmax (undoing double quantization exactly as ``dequantize_4bit`` does)."""
        if not self.double_quant:
            return state.absmax
        F = bnb_functional()
        return (F.dequantize_blockwise(state.absmax, state.state2) + state.offset).float()

    def _dequantize_run(self, packed: torch.Tensor, absmax: torch.Tensor, n: int) -> torch.Tensor:
        """``dequantize_4bit`` on ``n`` weights: a run of whole blocks (only the last may be short)."""
        F = bnb_functional()
        state = F.QuantState(
            absmax=absmax.reshape(-1).contiguous(),
            shape=torch.Size((n,)),
            dtype=torch.float32,
            blocksize=self.block_size,
            code=F.get_4bit_type(self.quant_type, device=packed.device),
            quant_type=self.quant_type,
        )
        return F.dequantize_4bit(packed.reshape(-1).contiguous(), state).reshape(-1)

    @property
    def column_granule(self) -> int | None:
        """Whole blocks when blocks tile every row; none when they straddle rows."""
        return lcm_granule(self.block_size) if self.in_features % self.block_size == 0 else None

    def dequantize(
        self, dtype: torch.dtype = torch.float32, rows: Span | None = None, cols: Span | None = None
    ) -> torch.Tensor:
        n_out, n_in, bs = self.out_features, self.in_features, self.block_size
        r0, r1 = rows if rows else (0, n_out)
        c0, c1 = cols if cols else (0, n_in)
        state = self.quant_state()
        if (r0, r1, c0, c1) == (0, n_out, 0, n_in):
            return bnb_functional().dequantize_4bit(self.packed, state).to(dtype)
        absmax = self._block_absmax(state)
        if n_in % bs == 0:
            # Blocks tile every row: dequantize just the blocks under the tile (block sizes are even).
            b0, b1 = c0 // bs, -(-c1 // bs)
            packed = self.packed.view(n_out, -1)[r0:r1, b0 * bs // 2 : b1 * bs // 2]
            scales = absmax.view(n_out, -1)[r0:r1, b0:b1]
            dense = self._dequantize_run(packed, scales, scales.numel() * bs).view(r1 - r0, -1)
            return dense[:, c0 - b0 * bs : c1 - b0 * bs].to(dtype)
        # Blocks straddle rows: the whole blocks covering the rows' flat range.
        start, stop = r0 * n_in, r1 * n_in
        b0, b1 = start // bs, -(-stop // bs)
        lo, hi = b0 * bs, min(b1 * bs, n_out * n_in)
        flat = self._dequantize_run(self.packed[lo // 2 : (hi + 1) // 2], absmax[b0:b1], hi - lo)
        return flat[start - lo : stop - lo].view(r1 - r0, n_in)[:, c0:c1].to(dtype)


class BnB4BitQuantizer(Quantizer):
    """bitsandbytes 4-bit blockwise quantization (the group size is the block size)."""

    quant_type: ClassVar[str]
    options = {
        "bits": Option("int", 4, "Bits per weight: a 4-bit format.", choices=(4,)),
        "group_size": Option("int", 32, "Weights per absmax block.", choices=BLOCK_SIZES),
        "double_quant": Option("bool", False, "Quantize the absmax values too (QLoRA's double quantization)."),
    }

    def quantize(self, weight: torch.Tensor, stats: LayerStats | None = None) -> BnB4BitWeight:
        F = bnb_functional()
        packed, state = F.quantize_4bit(
            weight.detach().float().contiguous(),
            blocksize=self.group_size,
            compress_statistics=self.double_quant,
            quant_type=self.quant_type,
        )
        return BnB4BitWeight.from_quant_state(packed, state)


@register_quantizer
class NF4Quantizer(BnB4BitQuantizer):
    """4-bit NormalFloat (QLoRA): code points at normal quantiles, for normally distributed weights."""

    name = "nf4"
    quant_type = "nf4"


@register_quantizer
class FP4Quantizer(BnB4BitQuantizer):
    """bitsandbytes' 4-bit float (1 sign, 2 exponent, 1 mantissa bits)."""

    name = "fp4"
    quant_type = "fp4"
