"""Load a hub GPTQ or AWQ checkpoint (``quantization_config.quant_method``) with its decoder linears kept packed.

The model is built on ``meta``; each decoder linear the checkpoint stores
packed (``qweight``, ``qzeros``, ``scales`` and, for GPTQ, ``g_idx``) becomes
a ModuLoRA layer over those very tensors
(:class:`~engine.quant.adapters.gptq_packed.GPTQPackedWeight`,
:class:`~engine.quant.adapters.awq_packed.AWQPackedWeight`), and everything
else (embeddings, norms, head, linears the checkpoint left float) is read
tensor by tensor, in the checkpoint's dtype.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from engine.errors import EngineError
from engine.lora.linear import ModuLoRALinear
from engine.model.build import check_materialised, materialize, meta_model
from engine.model.quantize import in_features_of, linear_weight, swap_linear, target_linear_names
from engine.model.source import SafetensorsSource
from engine.model.state import model_size, quantized_layers
from engine.quant.adapters.awq_packed import BITS as AWQ_BITS
from engine.quant.adapters.awq_packed import AWQPackedWeight
from engine.quant.adapters.gptq_packed import BITS as GPTQ_BITS
from engine.quant.adapters.gptq_packed import GPTQPackedWeight
from engine.quant.base import QuantizedWeight

GPTQ_FORMATS = {"gptq": 1, "gptq_v2": 0}  # checkpoint_format -> the zero-point offset its qzeros store
PACKED = ("qweight", "qzeros", "scales", "g_idx")


def _check(settings: dict[str, Any], key: str, allowed: tuple[Any, ...], where: Path) -> None:
    if settings.get(key) not in allowed:
        raise EngineError(f"{where}: quantization_config.{key} {settings.get(key)!r}; allowed: "
                          f"{', '.join(map(str, allowed))}")


def hub_quant_settings(path: str | Path) -> dict[str, Any] | None:
    """The checked ``quantization_config`` of a GPTQ or AWQ checkpoint folder, else None."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return None
    try:
        settings = json.loads(config_file.read_text()).get("quantization_config") or {}
    except (json.JSONDecodeError, AttributeError):
        return None
    method = settings.get("quant_method")
    if method == "gptq":
        _check(settings, "bits", GPTQ_BITS, config_file)
        _check({"checkpoint_format": "gptq", **settings}, "checkpoint_format", tuple(GPTQ_FORMATS), config_file)
    elif method == "awq":
        _check(settings, "bits", (AWQ_BITS,), config_file)
        _check({"version": "gemm", **settings}, "version", ("gemm",), config_file)
        _check({"zero_point": True, **settings}, "zero_point", (True,), config_file)
    else:
        return None
    return settings


def _packed_weight(settings: dict[str, Any]) -> Callable[[dict[str, torch.Tensor]], QuantizedWeight]:
    if settings["quant_method"] == "gptq":
        offset = GPTQ_FORMATS[settings.get("checkpoint_format", "gptq")]
        return lambda t: GPTQPackedWeight(t["qweight"], t["qzeros"], t["scales"], t.get("g_idx"), settings["bits"],
                                          offset)
    return lambda t: AWQPackedWeight(t["qweight"], t["qzeros"], t["scales"], settings["group_size"])


def load_hub_quantized(path: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """``(model, tokenizer, manifest)``; the manifest has a quantized directory's ``source_model``, ``quantizer``,
    ``layers`` and ``size`` keys."""
    path = Path(path)
    settings = hub_quant_settings(path)
    if settings is None:
        raise EngineError(f"{path}: not a GPTQ or AWQ checkpoint (quantization_config.quant_method)")
    source = SafetensorsSource(path)
    config = copy.deepcopy(source.config)
    del config.quantization_config  # transformers would ask for a GPTQ / AWQ kernel library
    model = meta_model(config)
    packed_weight = _packed_weight(settings)
    packed = [n for n in target_linear_names(model) if f"{n}.qweight" in source]
    if not packed:
        raise EngineError(f"{path}: a {settings['quant_method']} config, but no decoder linear has a qweight tensor")
    for name in packed:
        tensors = {key: source.read(f"{name}.{key}") for key in PACKED if f"{name}.{key}" in source}
        qweight = packed_weight(tensors)
        linear = model.get_submodule(name)
        want = (linear_weight(linear).shape[0], in_features_of(linear))
        if tuple(qweight.shape) != want:
            raise EngineError(f"{path}: {name} is {tuple(qweight.shape)} in the file, {want} in its config")
        bias = source.read(f"{name}.bias") if f"{name}.bias" in source else None
        swap_linear(model, name, ModuLoRALinear(qweight, bias))
    materialize(model, "", source)  # everything still on meta: embeddings, norms, head, the float linears
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    check_materialised(model, path, set())
    model.eval()
    model.requires_grad_(False)
    layers = {name: {**m.base.manifest(), "bias": m.bias is not None} for name, m in quantized_layers(model).items()}
    method = settings["quant_method"]
    quantizer = {"method": f"{method}-checkpoint", **{k: settings.get(k) for k in ("bits", "group_size")}}
    manifest = {"source_model": str(path.resolve()), "quantizer": quantizer, "layers": layers, "size": model_size(model)}
    return model, source.tokenizer(), manifest
