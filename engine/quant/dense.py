"""A float weight behind the QuantizedWeight interface, so plain LoRA on a float model
runs through the same ModuLoRA layer, trainer and exporter as the quantized case."""

from __future__ import annotations

from typing import Any

import torch

from engine.quant.base import QuantizedWeight, Span, register_format


@register_format
class DenseWeight(QuantizedWeight):
    format_name = "dense"

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__(*weight.shape)
        self.register_buffer("weight", weight.detach())

    def dequantize(
        self, dtype: torch.dtype = torch.float32, rows: Span | None = None, cols: Span | None = None
    ) -> torch.Tensor:
        r0, r1 = rows or (0, self.out_features)
        c0, c1 = cols or (0, self.in_features)
        return self.weight[r0:r1, c0:c1].to(dtype)

    def config(self) -> dict[str, Any]:
        return {"dtype": str(self.weight.dtype).removeprefix("torch.")}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> DenseWeight:
        return cls(tensors["weight"])
