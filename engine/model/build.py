"""Models built on ``meta`` and materialised part by part from a checkpoint.

Building a transformers model on ``meta`` costs nothing at any size; a part
(one decoder block, or everything outside the blocks) then gets its tensors
from a :class:`~engine.model.source.CheckpointSource`, and goes back to
``meta`` when it is done with.  A path that holds one block at a time thus
holds one block's float weights at a time.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from engine.errors import EngineError
from engine.model.experts import split_experts
from engine.model.placing import place
from engine.model.quantize import decoder_blocks, replace_module
from engine.model.source import CheckpointSource
from engine.quant.base import QuantizedWeight


def meta_model(config: PretrainedConfig) -> PreTrainedModel:
    """The model with every tensor on ``meta``: shapes only; stacked experts one linear layer per expert."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    split_experts(model, config)
    model.eval()
    model.requires_grad_(False)
    return model


def check_context(config: PretrainedConfig, seq_len: int, flag: str) -> None:
    """Refuse windows longer than the model's context (``max_position_embeddings``): positions past it were never
    trained, and the attention's cost grows with the square of the length (``--seq-len 100000`` ran for minutes)."""
    context = getattr(config, "max_position_embeddings", None)
    if context is not None and seq_len > context:
        raise EngineError(f"{flag} {seq_len}: longer than the model's context of {context} tokens "
                          "(max_position_embeddings in its config)")


def blocks_prefix(model: nn.Module) -> str:
    """The qualified name of the decoder blocks' list (``model.layers`` for Llama)."""
    blocks = decoder_blocks(model)
    return next(name for name, module in model.named_modules() if module is blocks)


def _read(source: CheckpointSource, name: str, like: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    tensor = source.read(name)
    if tuple(tensor.shape) != tuple(like.shape):
        raise EngineError(f"{source.path}: {name} is {tuple(tensor.shape)} in the checkpoint, {tuple(like.shape)} in "
                          "its config")
    return tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype)


def materialize(module: nn.Module, prefix: str, source: CheckpointSource, dtype: torch.dtype | None = None,
                skip: tuple[str, ...] = ()) -> None:
    """Every ``meta`` parameter and persistent buffer of ``module`` read from ``source`` (named ``prefix`` + its
    name), but those under ``skip`` (qualified prefixes); ``dtype`` None keeps the checkpoint's."""
    for name, sub in module.named_modules():
        qualified = f"{prefix}{name}." if name else prefix
        if qualified.startswith(skip):
            continue
        for key, param in list(sub._parameters.items()):
            if param is not None and param.is_meta and f"{qualified}{key}" in source:
                value = _read(source, f"{qualified}{key}", param, dtype)
                sub._parameters[key] = nn.Parameter(value, requires_grad=False)
        for key, buffer in list(sub._buffers.items()):
            if buffer is not None and buffer.is_meta and f"{qualified}{key}" in source:
                sub._buffers[key] = _read(source, f"{qualified}{key}", buffer, dtype)


def load_outside_blocks(
    model: PreTrainedModel, source: CheckpointSource, dtype: torch.dtype | None = None, head: bool = True
) -> None:
    """Embeddings, final norm, output head (tied to the embeddings where the config says so) and the rotary
    tables: everything but the decoder blocks.  ``head`` False leaves an untied output head on ``meta`` (for
    calibration, whose windows start at the input embeddings); a later call reads it."""
    prefix = blocks_prefix(model)
    tied = getattr(model.config, "tie_word_embeddings", False)
    skip = (f"{prefix}.",) if head or tied else (f"{prefix}.", *_module_prefixes(model, model.get_output_embeddings()))
    materialize(model, "", source, dtype, skip=skip)
    if tied:
        model.tie_weights()
    _recompute_buffers(model, prefix)
    _check_materialised(model, source, skip=skip)


def _module_prefixes(model: nn.Module, module: nn.Module | None) -> tuple[str, ...]:
    """The qualified prefix (``name.``) of ``module`` in ``model``; none if it is absent."""
    return tuple(f"{name}." for name, sub in model.named_modules() if module is not None and sub is module)


def load_block(model: PreTrainedModel, index: int, source: CheckpointSource, dtype: torch.dtype | None = None) -> nn.Module:
    """Decoder block ``index`` with its float weights read from ``source``."""
    prefix = f"{blocks_prefix(model)}.{index}."
    block = decoder_blocks(model)[index]
    materialize(block, prefix, source, dtype)
    _check_materialised(block, source, prefix=prefix)
    return block


def release_input_embeddings(model: PreTrainedModel) -> None:
    """The input embeddings (and an output head tied to them) back to ``meta``: once the calibration windows are
    embedded only the decoder blocks compute, until :func:`load_outside_blocks` reads the table again."""
    model.get_input_embeddings().to("meta")


def release_block(model: PreTrainedModel, index: int) -> None:
    """Decoder block ``index`` back to ``meta``: its memory is free again."""
    decoder_blocks(model)[index].to("meta")


def _recompute_buffers(model: PreTrainedModel, blocks: str | None = None) -> None:
    """Buffers a checkpoint does not hold, made again (outside the decoder blocks ``blocks``): rotary frequency
    tables from the config, and a scaled embedding's scale from the number it keeps beside it (Gemma's
    ``scalar_embed_scale``)."""
    for name, module in list(model.named_modules()):
        inside = blocks is not None and name.startswith(f"{blocks}.")
        if inside or isinstance(module, QuantizedWeight) or not any(b.is_meta for b in module.buffers(recurse=False)):
            continue  # a packed weight's buffers may be placeholders of a streamed block
        if "rotary" in type(module).__name__.lower():
            replace_module(model, name, type(module)(config=model.config))
            continue
        for key, buffer in list(module._buffers.items()):
            if buffer is None or not buffer.is_meta:
                continue
            value = getattr(module, f"scalar_{key}", None)
            if value is None:
                raise EngineError(f"{name}: cannot materialise its buffer {key} ({type(module).__name__})")
            module._buffers[key] = torch.tensor(value, dtype=buffer.dtype)


def _check_materialised(module: nn.Module, source: CheckpointSource, prefix: str = "",
                        skip: tuple[str, ...] = ()) -> None:
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.is_meta and not f"{prefix}{name}".startswith(skip):
            raise source.missing(f"{prefix}{name}")


def load_resident(source: CheckpointSource, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """The whole model materialised on the CPU, ready to compute there (:func:`~engine.model.placing.place`), for
    a model that fits in memory: evaluation of a float model."""
    model = meta_model(source.config)
    load_outside_blocks(model, source, dtype)
    for index in range(len(decoder_blocks(model))):
        load_block(model, index, source, dtype)
    return place(model, "cpu")


def check_materialised(model: nn.Module, path: Path, leave: set[str]) -> None:
    """Every tensor of a model built on ``meta`` was read from ``path`` (packed weights, and the names in
    ``leave``, may stay placeholders); the buffers checkpoints do not hold are made afresh."""
    _recompute_buffers(model)
    for module_name, module in model.named_modules():
        if isinstance(module, QuantizedWeight):
            continue
        for key, tensor in [*module._parameters.items(), *module._buffers.items()]:
            name = f"{module_name}.{key}" if module_name else key
            if tensor is not None and tensor.is_meta and name not in leave:
                raise EngineError(f"{path}: no tensor {name} for the model of config.json")
