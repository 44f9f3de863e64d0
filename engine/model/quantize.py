"""Swap a model's decoder linear layers for packed ModuLoRA layers.

A linear layer is an ``nn.Linear`` or a transformers ``Conv1D`` (GPT-2 and its
kin), which stores its weight transposed, as ``[in, out]``: the packed layer
computes the same ``x W^T + b`` from the ``[out, in]`` weight and remembers
the layout (``fan_in_fan_out``) for the exports.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from engine.errors import EngineError
from engine.lora.linear import ModuLoRALinear
from engine.quant.base import LayerStats, QuantizedWeight, Quantizer


LINEAR_TYPES = (nn.Linear, Conv1D)


def linear_weight(layer: nn.Module) -> torch.Tensor:
    """A linear layer's weight as ``[out, in]`` (a view of a Conv1D's)."""
    return layer.weight.data.T if isinstance(layer, Conv1D) else layer.weight.data


def in_features_of(layer: nn.Module) -> int:
    return layer.weight.shape[0] if isinstance(layer, Conv1D) else layer.in_features


def set_linear_weight(layer: nn.Module, weight: torch.Tensor) -> None:
    """Give a linear layer the ``[out, in]`` ``weight``, in its own layout."""
    layer.weight.data = weight.T.contiguous() if isinstance(layer, Conv1D) else weight


def swap_linear(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` (a ModuLoRA layer) in place of the linear layer ``name``, noting whether it was a Conv1D."""
    old = model.get_submodule(name)
    new.fan_in_fan_out = isinstance(old, Conv1D) or getattr(old, "fan_in_fan_out", False)
    replace_module(model, name, new)


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks (``model.model.layers`` for Llama-style models)."""
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    for blocks in candidates:
        if n_layers is None or len(blocks) == n_layers:
            return blocks
    raise EngineError(f"{type(model).__name__}: cannot find its decoder blocks (no ModuleList of {n_layers} layers)")


def target_linear_names(model: nn.Module, include: str | None = None) -> list[str]:
    """Qualified names of the linear layers inside decoder blocks, optionally filtered by a regex."""
    blocks = decoder_blocks(model)
    prefix = next(name for name, module in model.named_modules() if module is blocks)
    names = [
        f"{prefix}.{name}"
        for name, module in blocks.named_modules()
        if isinstance(module, (*LINEAR_TYPES, ModuLoRALinear))
    ]
    if include is not None:
        names = [n for n in names if re.search(include, n)]
    if not names:
        raise EngineError(f"no linear layers to quantize (include pattern: {include!r})")
    return names


def linear_share(model: nn.Module) -> float:
    """The share of the first decoder block's matrix weights (2-D and up) held by its linear layers: the part the
    engine packs and adapts (below 1 for mixture-of-experts models, whose experts are 3-D tensors)."""
    block = decoder_blocks(model)[0]
    linears = {id(m.weight) for m in block.modules() if isinstance(m, LINEAR_TYPES)}
    matrices = [p for p in block.parameters() if p.dim() >= 2]
    return sum(p.numel() for p in matrices if id(p) in linears) / max(1, sum(p.numel() for p in matrices))


def vocab_table_names(model: nn.Module) -> dict[str, str]:
    """The vocabulary-sized tables that can live on disk, by role: the input embeddings' and a bias-free linear
    output head's parameter names; neither when the two are tied (one tensor, which both uses need)."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is not None and head.weight is embedding.weight:
        return {}
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    tables = {"input embeddings": names[id(embedding.weight)]}
    if isinstance(head, nn.Linear) and head.bias is None:
        tables["output head"] = names[id(head.weight)]
    return tables


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def quantize_model(
    model: nn.Module,
    quantizer: Quantizer,
    names: list[str] | None = None,
    stats: dict[str, LayerStats] | None = None,
    wrap: Callable[[QuantizedWeight, torch.Tensor | None], nn.Module] | None = None,
) -> list[str]:
    """Quantize ``names`` (default: all decoder linears) in place; returns the names replaced.

    ``wrap`` turns each quantized weight and bias into the module that replaces
    the linear layer (default: a rank-0 :class:`ModuLoRALinear`).
    """
    names = names if names is not None else target_linear_names(model)
    wrap = wrap or (lambda qweight, bias: ModuLoRALinear(qweight, bias))
    if quantizer.needs_calibration and stats is None:
        raise EngineError(f"quantizer {quantizer.name!r} needs calibration statistics (--calib FILE)")
    for name in tqdm(names, desc=f"quantize ({quantizer.name})", unit="layer", leave=False):
        linear = model.get_submodule(name)
        qweight = quantized_weight(name, linear, quantizer, None if stats is None else stats[name])
        swap_linear(model, name, wrap(qweight, linear.bias))
    return names


def quantized_weight(
    name: str, linear: nn.Module, quantizer: Quantizer, stats: LayerStats | None, weight: torch.Tensor | None = None,
) -> QuantizedWeight:
    """``quantizer``'s packing of linear layer ``name``'s weight, or of ``weight`` in its place (an aligned copy);
    a layer that saw no calibration rows gets statistics that weigh every input alike."""
    if not isinstance(linear, LINEAR_TYPES):
        raise EngineError(f"{name}: expected a linear layer, found {type(linear).__name__}")
    if stats is not None and stats.count == 0:
        stats = LayerStats.uninformative(in_features_of(linear), linear_weight(linear).device)
    return quantizer.quantize(linear_weight(linear) if weight is None else weight, stats)
