"""A plain float model with each adapter folded into its base weight, loadable by transformers alone.

The merged model is written one decoder block at a time, one safetensors shard per block plus one for everything
outside the blocks, with the Hugging Face index (``model.safetensors.index.json``): memory holds one merged block.
A model whose blocks are streamed (its packed weights on ``meta``) has each block brought in and released around
its shard by the ``blocks`` lifecycle; tensors it left on disk (the vocabulary tables) come from ``extra``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

from engine.errors import EngineError
from engine.lora.linear import ModuLoRALinear
from engine.model import BlockLifecycle, blocks_prefix, decoder_blocks, place, replace_module, unique_state
from engine.storage import atomic_save_safetensors, atomic_write_json, staged_dir

INDEX = "model.safetensors.index.json"


@torch.no_grad()
def merged_float_model(model: PreTrainedModel, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A copy of ``model`` (resident) whose ModuLoRA layers are ``nn.Linear(W_q + s B A)`` (or the Conv1D each
    replaced)."""
    merged = copy.deepcopy(model)
    for name, layer in [(n, m) for n, m in merged.named_modules() if isinstance(m, ModuLoRALinear)]:
        replace_module(merged, name, _merged_linear(layer, dtype))
    return merged.requires_grad_(False)


def _merged_linear(layer: ModuLoRALinear, dtype: torch.dtype) -> nn.Module:
    """``nn.Linear``, or a ``Conv1D`` (weight ``[in, out]``) where the float model had one."""
    if layer.fan_in_fan_out:
        linear = Conv1D(layer.out_features, layer.in_features).to(dtype)
        linear.weight.copy_(layer.merged_weight(torch.float64).T)  # one rounding, at the end
        if layer.bias is None:
            linear.bias = None
    else:
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=dtype)
        linear.weight.copy_(layer.merged_weight(torch.float64))
    if layer.bias is not None:
        linear.bias.copy_(layer.bias)
    return linear


LayerTensors = Callable[[ModuLoRALinear], dict[str, torch.Tensor]]  # a layer's tensors in a checkpoint, by key


@torch.no_grad()
def _block_tensors(model: nn.Module, index: int, dtype: torch.dtype, layer_tensors: LayerTensors) -> dict[str, torch.Tensor]:
    """Block ``index``'s tensors by full name: each ModuLoRA layer's from ``layer_tensors``, the rest in ``dtype``."""
    prefix = f"{blocks_prefix(model)}.{index}."
    block = decoder_blocks(model)[index]
    tensors: dict[str, torch.Tensor] = {}
    layers = {name: m for name, m in block.named_modules() if isinstance(m, ModuLoRALinear)}
    for name, module in block.named_modules():
        if name in layers or any(name.startswith(f"{m}.") for m in layers):
            continue
        for key, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is not None and key not in module._non_persistent_buffers_set:
                tensors[f"{prefix}{name}.{key}" if name else f"{prefix}{key}"] = _cast(tensor, dtype)
    for name, layer in layers.items():
        tensors.update({f"{prefix}{name}.{key}": value for key, value in layer_tensors(layer).items()})
    return tensors


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """On the host (to be written), floating point in ``dtype``."""
    return tensor.detach().to("cpu", dtype) if tensor.is_floating_point() else tensor.detach().cpu()


def save_merged(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    blocks: BlockLifecycle | None = None,
    extra: Callable[[], dict[str, torch.Tensor]] | None = None,
    device: torch.device | str = "cpu",
) -> None:
    """The merged float model in ``dtype`` as sharded safetensors with an index, config and tokenizer, atomically;
    each block is dequantized and merged on ``device`` and written from the host."""
    save_checkpoint(model, tokenizer, out_dir, lambda layer: _merged_linear(layer, dtype).state_dict(), dtype, blocks,
                    extra, device)


def save_checkpoint(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    layer_tensors: LayerTensors,
    dtype: torch.dtype,
    blocks: BlockLifecycle | None = None,
    extra: Callable[[], dict[str, torch.Tensor]] | None = None,
    device: torch.device | str = "cpu",
    quantization_config: dict[str, Any] | None = None,
) -> None:
    """``model`` in the Hugging Face layout, atomically: one safetensors shard per decoder block (each ModuLoRA
    layer's tensors from ``layer_tensors``, computed on ``device``; the block brought in and released by
    ``blocks``), one of everything else in ``dtype`` (tensors a streamed model left on disk from ``extra``), the
    index, the config (with ``quantization_config`` if given) and the tokenizer."""
    blocks = blocks or BlockLifecycle()
    with staged_dir(out_dir) as staging:
        n_blocks = len(decoder_blocks(model))
        weight_map: dict[str, str] = {}
        total = 0
        for index in range(n_blocks):
            blocks.load(index)
            place(decoder_blocks(model)[index], device)
            tensors = _block_tensors(model, index, dtype, layer_tensors)
            blocks.done(index)
            total += _write_shard(staging, f"model-{index + 1:05d}-of-{n_blocks + 1:05d}.safetensors", tensors,
                                  weight_map)
        outside, _ = unique_state(model, skip=f"{blocks_prefix(model)}.")
        tensors = {k: _cast(v, dtype) for k, v in outside.items() if not v.is_meta}
        tensors.update({k: _cast(v, dtype) for k, v in (extra() if extra else {}).items()})
        missing = sorted(k for k, v in outside.items() if v.is_meta and k not in tensors)
        if missing:
            raise EngineError(f"cannot merge: no tensor for {missing[:3]}")
        total += _write_shard(staging, f"model-{n_blocks + 1:05d}-of-{n_blocks + 1:05d}.safetensors", tensors,
                              weight_map)
        atomic_write_json(staging / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
        config = copy.deepcopy(model.config)
        config.torch_dtype = str(dtype).removeprefix("torch.")
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        if quantization_config is not None:
            config.quantization_config = quantization_config
        config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)


def _write_shard(staging: Path, name: str, tensors: dict[str, torch.Tensor], weight_map: dict[str, str]) -> int:
    atomic_save_safetensors(staging / name, {k: v.contiguous() for k, v in tensors.items()},
                            metadata={"format": "pt"})
    weight_map.update({key: name for key in tensors})
    return sum(t.numel() * t.element_size() for t in tensors.values())
