"""Round-to-nearest: each group of ``G`` input columns gets its own min/max range."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.quant.base import LayerStats, Quantizer, register_quantizer
from engine.quant.groupwise import GROUPWISE_OPTIONS, GroupQuantizedWeight, check_settings, quantize_codes, range_params


@register_quantizer
class RTNQuantizer(Quantizer):
    """Group-wise round-to-nearest, asymmetric (default) or symmetric."""

    name = "rtn"
    options = GROUPWISE_OPTIONS

    def validate(self) -> None:
        check_settings(self.bits, self.group_size)

    def quantize(self, weight: torch.Tensor, stats: LayerStats | None = None) -> GroupQuantizedWeight:
        out_f, in_f = weight.shape
        G = check_settings(self.bits, self.group_size, in_f)
        n_groups = -(-in_f // G)
        pad = n_groups * G - in_f
        w = weight.detach().float()
        # Padding with +inf / -inf keeps the ragged last group's min / max its own.
        w_min = F.pad(w, (0, pad), value=float("inf")).view(out_f, n_groups, G).amin(-1)
        w_max = F.pad(w, (0, pad), value=float("-inf")).view(out_f, n_groups, G).amax(-1)
        scale, zero = range_params(w_min, w_max, self.bits, self.symmetric)
        scale_cols = scale.repeat_interleave(G, dim=1)[:, :in_f]
        zero_cols = zero.repeat_interleave(G, dim=1)[:, :in_f]
        codes = quantize_codes(w, scale_cols, zero_cols, self.bits)
        return GroupQuantizedWeight(
            codes.to(torch.uint8),
            scale,
            None if self.symmetric else zero.to(torch.uint8),
            bits=self.bits,
            group_size=G,
            in_features=in_f,
        )
