"""A plain float model with each adapter folded into its base weight, loadable by transformers alone."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from engine.lora.linear import ModuLoRALinear
from engine.model.quantize import replace_module
from engine.storage import commit_dir, staging_dir


@torch.no_grad()
def merged_float_model(model: PreTrainedModel, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A copy of ``model`` whose ModuLoRA layers are ``nn.Linear(W_q + s B A)``."""
    merged = copy.deepcopy(model)
    for name, layer in [(n, m) for n, m in merged.named_modules() if isinstance(m, ModuLoRALinear)]:
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=dtype)
        linear.weight.copy_(layer.merged_weight(torch.float64))  # one rounding, at the end
        if layer.bias is not None:
            linear.bias.copy_(layer.bias)
        replace_module(merged, name, linear)
    return merged.requires_grad_(False)


def save_merged(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> None:
    """``save_pretrained`` (safetensors) of the merged model and its tokenizer, atomically."""
    staging = staging_dir(out_dir)
    try:
        merged_float_model(model).save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        commit_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
