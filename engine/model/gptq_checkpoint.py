"""Load a hub GPTQ checkpoint (``quantization_config.quant_method: gptq``) with its decoder linears kept packed.

The model is built on ``meta``; each decoder linear the checkpoint stores as
``qweight``/``qzeros``/``scales``/``g_idx`` becomes a ModuLoRA layer over a
:class:`~engine.quant.adapters.gptq_packed.GPTQPackedWeight` of those very
tensors, and everything else (embeddings, norms, head, linears the checkpoint
left float) is read tensor by tensor, in the checkpoint's dtype.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from engine.errors import EngineError
from engine.lora.linear import ModuLoRALinear
from engine.model.build import check_materialised, meta_model
from engine.model.quantize import in_features_of, linear_weight, swap_linear, target_linear_names
from engine.model.source import SafetensorsSource
from engine.model.state import model_size, quantized_layers
from engine.quant.adapters.gptq_packed import BITS, GPTQPackedWeight

PACKED = ("qweight", "qzeros", "scales", "g_idx")
FORMATS = {"gptq": 1, "gptq_v2": 0}  # checkpoint_format -> the zero-point offset its qzeros store


def gptq_settings(path: str | Path) -> dict[str, Any] | None:
    """The ``quantization_config`` of a GPTQ checkpoint folder, else None (checked: bits and format)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return None
    try:
        settings = json.loads(config_file.read_text()).get("quantization_config") or {}
    except (json.JSONDecodeError, AttributeError):
        return None
    if settings.get("quant_method") != "gptq":
        return None
    if settings.get("bits") not in BITS:
        raise EngineError(f"{config_file}: quantization_config.bits {settings.get('bits')!r}; allowed: {BITS}")
    form = settings.get("checkpoint_format", "gptq")
    if form not in FORMATS:
        raise EngineError(f"{config_file}: quantization_config.checkpoint_format {form!r}; allowed: {', '.join(FORMATS)}")
    return settings


def load_gptq_checkpoint(path: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """``(model, tokenizer, manifest)``; the manifest has a quantized directory's ``source_model``, ``quantizer``,
    ``layers`` and ``size`` keys."""
    path = Path(path)
    settings = gptq_settings(path)
    if settings is None:
        raise EngineError(f"{path}: not a GPTQ checkpoint (no quantization_config.quant_method: gptq)")
    source = SafetensorsSource(path)
    config = copy.deepcopy(source.config)
    del config.quantization_config  # transformers would ask for a GPTQ kernel library
    model = meta_model(config)
    offset = FORMATS[settings.get("checkpoint_format", "gptq")]
    packed = [n for n in target_linear_names(model) if f"{n}.qweight" in source]
    if not packed:
        raise EngineError(f"{path}: a GPTQ config, but no decoder linear has a qweight tensor")
    read: set[str] = set()
    for name in packed:
        tensors = {key: source.read(f"{name}.{key}") for key in PACKED if f"{name}.{key}" in source}
        qweight = GPTQPackedWeight(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors.get("g_idx"),
                                   settings["bits"], offset)
        linear = model.get_submodule(name)
        want = (linear_weight(linear).shape[0], in_features_of(linear))
        if tuple(qweight.shape) != want:
            raise EngineError(f"{path}: {name} is {tuple(qweight.shape)} in the file, {want} in its config")
        bias = source.read(f"{name}.bias") if f"{name}.bias" in source else None
        swap_linear(model, name, ModuLoRALinear(qweight, bias))
        read |= {f"{name}.{key}" for key in (*tensors, "bias")}
    state = model.state_dict(keep_vars=True)
    rest = {n: source.read(n) for n in source.names() if n not in read and n in state}
    model.load_state_dict(rest, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    check_materialised(model, path, set())
    model.eval()
    model.requires_grad_(False)
    layers = {name: {**m.base.manifest(), "bias": m.bias is not None} for name, m in quantized_layers(model).items()}
    quantizer = {"method": "gptq-checkpoint", **{k: settings.get(k) for k in ("bits", "group_size", "desc_act", "sym")}}
    manifest = {"source_model": str(path.resolve()), "quantizer": quantizer, "layers": layers, "size": model_size(model)}
    return model, source.tokenizer(), manifest
