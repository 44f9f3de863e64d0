"""A quantized directory's group-wise layers (RTN, OPTQ) in the hub GPTQ layout, so GPTQ kernels (transformers,
vLLM, ...) serve the model the adapter was trained on.

Group-wise weights are ``s (q - z)`` with float16 scales and integer zero points, which is the GPTQ layout's own
arithmetic, so the codes, scales and zero points are written as they are (act-order as ``g_idx``): the exported
model computes the same weights bit for bit.  A layer the layout cannot pack (inputs or outputs not a multiple of 32) is written dequantized, in float16, and listed in the config's
``modules_to_not_convert``, as hub checkpoints leave such layers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from engine.errors import EngineError
from engine.export.merge import save_checkpoint
from engine.lora.linear import ModuLoRALinear
from engine.model import BlockLifecycle, quantized_layers
from engine.quant.adapters.gptq_packed import WORD, pack_rows
from engine.quant.groupwise import GroupQuantizedWeight, unpacked_codes, zero_points

DTYPE = torch.float16  # hub GPTQ checkpoints: float16 scales and float tensors


def packable(weight: GroupQuantizedWeight) -> bool:
    """Inputs and outputs fill whole words of codes and of zero points."""
    return weight.in_features % WORD == 0 and weight.out_features % WORD == 0


def gptq_tensors(weight: GroupQuantizedWeight) -> dict[str, torch.Tensor]:
    """``qweight``, ``qzeros``, ``scales``, ``g_idx`` of a packable group-wise weight (AutoGPTQ's layout: zero
    points stored minus one)."""
    stored = unpacked_codes(weight).to(torch.int64)  # [out, in], columns in quantization order
    position = weight.inv_perm if hasattr(weight, "perm") else torch.arange(weight.in_features)  # input -> stored
    codes = stored[:, position]
    g_idx = (position // weight.group_size).to(torch.int32)
    zeros = zero_points(weight).to(torch.int64)  # [out, groups]
    mask = (1 << weight.bits) - 1
    return {"qweight": pack_rows(codes.T.contiguous(), weight.bits),
            "qzeros": pack_rows((zeros - 1) & mask, weight.bits).T.contiguous(),
            "scales": weight.scales.T.contiguous(), "g_idx": g_idx}


def _layer_tensors(layer: ModuLoRALinear) -> dict[str, torch.Tensor]:
    bias = {} if layer.bias is None else {"bias": layer.bias.detach().to("cpu", DTYPE)}
    if isinstance(layer.base, GroupQuantizedWeight) and packable(layer.base):
        return {k: v.cpu() for k, v in gptq_tensors(layer.base).items()} | bias
    weight = layer.base.dequantize(torch.float32)
    weight = weight.T if layer.fan_in_fan_out else weight
    return {"weight": weight.to("cpu", DTYPE).contiguous()} | bias


def gptq_settings(model: PreTrainedModel) -> dict[str, Any]:
    """The ``quantization_config`` of ``model``'s export: its group-wise layers must share bits and group size."""
    layers = quantized_layers(model)
    kinds = {(m.base.bits, m.base.group_size, m.base.symmetric, hasattr(m.base, "perm"))
             for m in layers.values() if isinstance(m.base, GroupQuantizedWeight)}
    if len(kinds) != 1:
        found = sorted({type(m.base).__name__ for m in layers.values()})
        raise EngineError(f"the GPTQ layout needs group-wise layers (rtn, optq) of one bits and group size; this model "
                          f"has {', '.join(found)} with {len(kinds)} settings")
    ((bits, group_size, symmetric, act_order),) = kinds
    left = sorted(n for n, m in layers.items() if not (isinstance(m.base, GroupQuantizedWeight) and packable(m.base)))
    return {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": act_order,
            "sym": symmetric, "checkpoint_format": "gptq", "modules_to_not_convert": left}


def save_gptq(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path,
              blocks: BlockLifecycle | None = None, extra: Any = None) -> dict[str, Any]:
    """Write ``model``'s base (no adapter) in the hub GPTQ layout; returns its ``quantization_config``."""
    settings = gptq_settings(model)
    save_checkpoint(model, tokenizer, out_dir, _layer_tensors, DTYPE, blocks, extra, quantization_config=settings)
    return settings
