"""Sizes and de-duplicated tensors of a (possibly quantized) model."""

from __future__ import annotations

import torch
from torch import nn

from engine.lora.linear import ModuLoRALinear
from engine.model.quantize import target_linear_names


ADAPTER_SUFFIXES = (".lora_a", ".lora_b")


def unique_state(model: nn.Module, skip: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The base model's ``state_dict()`` (adapters excluded: they are saved on their own; names starting with
    ``skip`` too) without tied duplicates, plus ``{alias: kept_name}`` for the dropped ones."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name.endswith(ADAPTER_SUFFIXES) or (skip and name.startswith(skip)):
            continue
        if tensor.is_meta:  # shapes only (a streamed model): tied tensors are the same object
            key = ("meta", id(tensor), tuple(tensor.shape))
        else:
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            tensors[name] = tensor
    return tensors, aliases


def quantized_layers(model: nn.Module) -> dict[str, ModuLoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, ModuLoRALinear)}


def model_size(model: nn.Module) -> dict[str, float]:
    """Storage of the base model, and effective bits per weight of its decoder linears (packed or
    float) without and with their LoRA adapters."""
    tensors, _ = unique_state(model)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    layers = quantized_layers(model)
    if layers:
        stored = sum(m.base.nbytes for m in layers.values())
        numel = sum(m.in_features * m.out_features for m in layers.values())
    else:
        weights = [model.get_submodule(n).weight for n in target_linear_names(model)]
        stored = sum(w.numel() * w.element_size() for w in weights)
        numel = sum(w.numel() for w in weights)
    adapter = sum(
        t.numel() * t.element_size() for m in layers.values() for t in (m.lora_a, m.lora_b) if t is not None
    )
    return {
        "model_bytes": total,
        "quantized_bytes": stored,
        "bits_per_weight": 8.0 * stored / numel,
        "adapter_bytes": adapter,
        "bits_per_weight_with_adapter": 8.0 * (stored + adapter) / numel,
    }
