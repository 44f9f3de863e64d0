"""Models of any published shape with random packed weights, built without a float copy.

For measuring what offload does at a scale no float checkpoint here could hold
(Llama-65B: 130 GB in bfloat16): the model is built on ``meta``, each decoder
block's packed codes, scales and zero points are drawn at random straight into
a :class:`BlockStore` one block at a time, and only the small parts outside the
blocks (embeddings, norms, lm_head) are materialised.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PretrainedConfig, PreTrainedModel

from engine.errors import EngineError
from engine.lora.linear import ModuLoRALinear
from engine.model.quantize import decoder_blocks, replace_module
from engine.offload.shapes import meta_model
from engine.offload.store import BlockStore, Tensors
from engine.quant.groupwise import GroupQuantizedWeight
from engine.quant.packing import packed_length


def packed_placeholder(out_features: int, in_features: int, bits: int, group_size: int) -> GroupQuantizedWeight:
    """An asymmetric group-wise weight whose buffers are shape-only ``meta`` tensors."""
    n_groups = -(-in_features // group_size)
    tensors = {
        "codes": torch.empty(out_features, packed_length(in_features, bits), dtype=torch.uint8, device="meta"),
        "scales": torch.empty(out_features, n_groups, dtype=torch.float16, device="meta"),
        "zeros": torch.empty(1, packed_length(out_features * n_groups, bits), dtype=torch.uint8, device="meta"),
    }
    config = {"bits": bits, "group_size": group_size, "symmetric": False, "out_features": out_features,
              "in_features": in_features}
    return GroupQuantizedWeight.from_state(tensors, config)


def random_block(placeholders: Tensors, bits: int, generator: torch.Generator, weight_std: float = 0.02) -> Tensors:
    """Random codes and zero points, and scales that give weights of about ``weight_std``."""
    out = {}
    for name, meta in placeholders.items():
        if meta.dtype == torch.uint8:
            out[name] = torch.randint(0, 256, meta.shape, dtype=torch.uint8, generator=generator,
                                      device=generator.device)
        else:  # uniform codes over 2**bits levels have std ~ 2**bits / sqrt(12) steps
            step = weight_std * 12**0.5 / 2**bits
            uniform = torch.rand(meta.shape, generator=generator, device=generator.device)
            out[name] = (step * (0.75 + 0.5 * uniform)).to(meta.dtype)
    return out


def build_random_quantized(
    config: PretrainedConfig,
    store: BlockStore,
    *,
    bits: int,
    group_size: int = 64,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> PreTrainedModel:
    """``config``'s model with every decoder linear packed at ``bits`` and its blocks in ``store``.

    Blocks already in the store are reused (a disk store keeps them across runs).
    The model's decoder blocks hold placeholders: attach a
    :class:`~engine.offload.BlockStreamer` on the same store to compute with it.
    """
    model = meta_model(config)
    blocks = decoder_blocks(model)
    generator = torch.Generator().manual_seed(seed)
    for index, block in enumerate(tqdm(blocks, desc=f"random {bits}-bit blocks", unit="block")):
        tensors: Tensors = {}
        for name, linear in list(block.named_modules()):
            if isinstance(linear, nn.Linear):
                if linear.bias is not None:
                    raise EngineError(f"{name}: random packed layers with a bias are not supported")
                qweight = packed_placeholder(linear.out_features, linear.in_features, bits, group_size)
                replace_module(block, name, ModuLoRALinear(qweight, compute_dtype=dtype))
                tensors.update({f"{name}.base.{k}": v for k, v in qweight._buffers.items()})
        if index not in store:
            store.put(index, random_block(tensors, bits, generator))
    _materialise_outside_blocks(model, config, dtype, generator)
    return model


def _materialise_outside_blocks(
    model: PreTrainedModel, config: PretrainedConfig, dtype: torch.dtype, generator: torch.Generator
) -> None:
    """Real tensors for every float parameter (embeddings, norms, lm_head) and the rotary tables."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                if param.dim() == 1:  # norm gains
                    value = torch.ones(param.shape, dtype=dtype)
                else:
                    value = (0.02 * torch.randn(param.shape, generator=generator)).to(dtype)
                module._parameters[name] = nn.Parameter(value, requires_grad=False)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    for name, module in model.named_modules():
        if any(b.is_meta for b in module.buffers(recurse=False)) and not isinstance(module, GroupQuantizedWeight):
            if "rotary" not in type(module).__name__.lower():
                raise EngineError(f"{name}: cannot materialise its buffers ({type(module).__name__})")
            replace_module(model, name, type(module)(config=config))
