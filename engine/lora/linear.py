"""``ModuLoRALinear``: a drop-in ``nn.Linear`` replacement over a packed weight."""

from __future__ import annotations

import math

import torch
from torch import nn

from engine.lora.function import ModuLoRAFunction
from engine.quant.base import QuantizedWeight

# Dequantize at most this many weights at once.  On the CPU 4M (16 MiB in float32): layers up to 2048 x 2048
# in one piece, a 8192 x 22016 FFN weight in 43 tiles instead of one 720 MiB buffer.  On a GPU 64M (128 MiB in
# bf16): every 7B matrix in one piece and a 65B FFN weight in 3, since each tile costs a few kernel launches
# and 4M tiles left a 7B step bound by launching them (2.5 s a step on an H200, docs/gpu.md).
TILE_NUMEL = {"cpu": 1 << 22, "cuda": 1 << 26}
AUTO_TILE = -1  # ``tile_numel`` default: the tile of the device the layer computes on


def tile_numel_for(device_type: str) -> int:
    return TILE_NUMEL.get(device_type, TILE_NUMEL["cpu"])


class ModuLoRALinear(nn.Module):
    """``y = x W_q^T + b + (alpha / r) (x A^T) B^T`` with ``W_q`` frozen and packed.

    ``rank=0`` gives a plain quantized linear layer (used for evaluation).
    ``A`` gets PEFT's Kaiming-uniform init and ``B`` zeros, so a fresh adapter
    leaves the output unchanged.

    Dynamic rank (DyLoRA / QDyLoRA): with ``active_rank = b`` only the first
    ``b`` rows of ``A`` and columns of ``B`` are used, at the trained rank's
    scale ``alpha / r``, so a prefix is the same function in every step that
    samples a rank at least ``b`` and at evaluation.  (DyLoRA's ``alpha / b``
    rescales the shared components with every sampled rank: its rank-1 prefix
    ended 37% above a rank-1 run, this one 10%, docs/qdylora.md.)  With
    ``train_last_only`` the first ``b - 1`` are held fixed, so a step trains
    only the ``b``-th ("frozen" variant).
    """

    def __init__(
        self,
        qweight: QuantizedWeight,
        bias: torch.Tensor | None = None,
        *,
        rank: int = 0,
        alpha: float = 0.0,
        compute_dtype: torch.dtype = torch.float32,
        adapter_dtype: torch.dtype = torch.float32,
        tile_numel: int | None = AUTO_TILE,
    ) -> None:
        super().__init__()
        self.base = qweight
        self.in_features, self.out_features = qweight.in_features, qweight.out_features
        self.compute_dtype = compute_dtype
        self.tile_numel = tile_numel
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.fan_in_fan_out = False  # the layer it replaced stored its weight as [in, out] (a Conv1D): exports do
        self.active_rank: int | None = None
        self.train_last_only = False
        self.rank, self.alpha = 0, 0.0
        self.lora_a: nn.Parameter | None = None
        self.lora_b: nn.Parameter | None = None
        if rank > 0:
            self.add_adapter(rank, alpha, adapter_dtype)

    def add_adapter(
        self,
        rank: int,
        alpha: float,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        """Attach a fresh rank-``rank`` adapter (replacing any previous one), by default on the base's device
        (pass ``device`` when the base is a streamed placeholder)."""
        self.rank = rank
        self.alpha = float(alpha)
        device = device if device is not None else next(self.base.buffers()).device
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, dtype=dtype, device=device))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    @property
    def effective_rank(self) -> int:
        return min(self.active_rank or self.rank, self.rank)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0

    def adapter_factors(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(A, B)`` restricted to the active rank (prefix held fixed when ``train_last_only``)."""
        if not self.rank:
            return None, None
        r = self.effective_rank
        a, b = self.lora_a[:r], self.lora_b[:, :r]
        if self.train_last_only and r > 1:
            a = torch.cat([a[: r - 1].detach(), a[r - 1 :]])
            b = torch.cat([b[:, : r - 1].detach(), b[:, r - 1 :]], dim=1)
        return a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.adapter_factors()
        tile = tile_numel_for(x.device.type) if self.tile_numel == AUTO_TILE else self.tile_numel
        y = ModuLoRAFunction.apply(x, a, b, self.base, self.scaling, tile, self.compute_dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def merged_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense ``W_q + (alpha / r) B A`` at the active rank (for export)."""
        weight = self.base.dequantize(dtype)
        a, b = self.adapter_factors()
        if a is not None:
            weight = weight + self.scaling * (b.detach().to(dtype) @ a.detach().to(dtype))
        return weight

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"alpha={self.alpha}, compute_dtype={self.compute_dtype}"
        )
