"""``ModuLoRALinear``: a drop-in ``nn.Linear`` replacement over a packed weight."""

from __future__ import annotations

import math

import torch
from torch import nn

from engine.lora.function import ModuLoRAFunction
from engine.quant.base import QuantizedWeight


class ModuLoRALinear(nn.Module):
    """``y = x W_q^T + b + (alpha / r) (x A^T) B^T`` with ``W_q`` frozen and packed.

    ``rank=0`` gives a plain quantized linear layer (used for evaluation).
    ``A`` gets PEFT's Kaiming-uniform init and ``B`` zeros, so a fresh adapter
    leaves the output unchanged.
    """

    def __init__(
        self,
        qweight: QuantizedWeight,
        bias: torch.Tensor | None = None,
        *,
        rank: int = 0,
        alpha: float | None = None,
        compute_dtype: torch.dtype = torch.float32,
        adapter_dtype: torch.dtype = torch.float32,
        tile_numel: int | None = None,
    ) -> None:
        super().__init__()
        self.base = qweight
        self.in_features, self.out_features = qweight.in_features, qweight.out_features
        self.compute_dtype = compute_dtype
        self.tile_numel = tile_numel
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.rank = rank
        self.alpha = float(alpha if alpha is not None else rank)
        if rank > 0:
            self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, dtype=adapter_dtype))
            self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, dtype=adapter_dtype))
            nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        else:
            self.lora_a = self.lora_b = None

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = ModuLoRAFunction.apply(
            x, self.lora_a, self.lora_b, self.base, self.scaling, self.tile_numel, self.compute_dtype
        )
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"alpha={self.alpha}, compute_dtype={self.compute_dtype}"
        )
