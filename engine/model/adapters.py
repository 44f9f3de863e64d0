"""Attach LoRA adapters to every target layer of a model and move their weights in and out.

A float model's linear layers are first wrapped as ModuLoRA layers over a
:class:`~engine.quant.dense.DenseWeight`, so plain LoRA and ModuLoRA share one
code path (trainer, checkpoints, export).
"""

from __future__ import annotations

import torch
from torch import nn

from engine.errors import EngineError
from engine.lora.linear import ModuLoRALinear
from engine.model.quantize import LINEAR_TYPES, linear_weight, swap_linear, target_linear_names
from engine.quant.dense import DenseWeight


def add_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    seed: int,
    include: str | None = None,
    device: torch.device | str | None = None,
) -> list[str]:
    """Give every decoder linear (or those matching ``include``) a fresh rank-``rank`` adapter.

    Adapters are initialised in layer order from ``seed``, so the same call gives
    the same adapter.  Returns the adapted layer names.
    """
    if rank < 1:
        raise EngineError(f"LoRA rank must be >= 1, got {rank}")
    names = target_linear_names(model, include)
    torch.manual_seed(seed)
    for name in names:
        layer = model.get_submodule(name)
        if isinstance(layer, LINEAR_TYPES):
            dense = ModuLoRALinear(DenseWeight(linear_weight(layer).contiguous()), layer.bias)
            swap_linear(model, name, dense)
            layer = dense
        layer.add_adapter(rank, alpha, device=device)
    model.requires_grad_(False)
    for param in lora_parameters(model).values():
        param.requires_grad_(True)
    return names


def lora_layers(model: nn.Module) -> dict[str, ModuLoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ModuLoRALinear) and m.rank > 0}


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Adapter parameters in a fixed order: ``{layer}.lora_a``, ``{layer}.lora_b``."""
    params: dict[str, nn.Parameter] = {}
    for name, layer in lora_layers(model).items():
        params[f"{name}.lora_a"] = layer.lora_a
        params[f"{name}.lora_b"] = layer.lora_b
    return params


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in lora_parameters(model).items()}


def load_adapter_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    params = lora_parameters(model)
    if params.keys() != tensors.keys():
        missing, extra = sorted(params.keys() - tensors.keys()), sorted(tensors.keys() - params.keys())
        raise EngineError(f"adapter does not match the model (missing {missing[:2]}, unexpected {extra[:2]})")
    with torch.no_grad():
        for key, param in params.items():
            if param.shape != tensors[key].shape:
                raise EngineError(f"adapter tensor {key}: shape {tuple(tensors[key].shape)}, model has {tuple(param.shape)}")
            param.copy_(tensors[key])


def set_active_rank(model: nn.Module, rank: int | None, train_last_only: bool = False) -> None:
    """Use only the first ``rank`` adapter components everywhere (``None``: all of them)."""
    for layer in lora_layers(model).values():
        layer.active_rank = rank
        layer.train_last_only = train_last_only
