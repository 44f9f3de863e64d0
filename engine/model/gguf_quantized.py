"""Load a GGUF model whose decoder linears are already quantized straight into ModuLoRA layers.

transformers' GGUF reader dequantizes every tensor to float; here the decoder
linear tensors keep their GGML block bytes (:class:`~engine.quant.adapters.GGUFWeight`)
and only the rest (embeddings, norms, output head) is dequantized, through the same
name mapping and tensor processor that transformers uses.  llama.cpp stores Llama's
Q and K projections with rows permuted for its rotary layout; transformers undoes
that on the float array, and since GGML blocks run along the input dimension the
same permutation applied to whole rows of block bytes undoes it exactly.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize as gguf_dequantize
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from engine.errors import EngineError
from engine.lora.linear import ModuLoRALinear
from engine.model.loading import gguf_config_and_tokenizer
from engine.model.quantize import replace_module, target_linear_names
from engine.model.state import model_size, quantized_layers, unique_state
from engine.quant.adapters.gguf_blocks import GGUFWeight

log = logging.getLogger(__name__)

FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)


def _is_block_linear(tensor: Any) -> bool:
    """A 2-D tensor of a decoder block (GGUF names them ``blk.N.*``)."""
    return tensor.name.startswith("blk.") and len(tensor.shape) == 2


def is_quantized_gguf(path: str | Path) -> bool:
    """Whether ``path`` is a GGUF file with at least one quantized decoder-block matrix."""
    path = Path(path)
    if not (path.is_file() and path.suffix == ".gguf"):
        return False
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise EngineError(f"{path}: not a readable GGUF file ({exc})") from None
    return any(_is_block_linear(t) and t.tensor_type not in FLOAT_TYPES for t in reader.tensors)


def _row_permutation(processor: Any, gguf_name: str, n_rows: int, mapping: dict[str, str]) -> np.ndarray:
    """The row order transformers' tensor processor gives ``gguf_name``, found by processing row indices."""
    rows = np.arange(n_rows, dtype=np.int64)[:, None]
    result = processor.process(weights=rows, name=gguf_name, tensor_key_mapping=mapping, parsed_parameters={"tensors": {}})
    perm = None if result.weights is None else np.asarray(result.weights)
    if perm is None or perm.shape != rows.shape or not np.array_equal(np.sort(perm[:, 0]), rows[:, 0]):
        raise EngineError(f"{gguf_name}: its loader rewrites the tensor beyond a row permutation; cannot keep it quantized")
    return perm[:, 0]


def _name_mapping(reader: GGUFReader, model: PreTrainedModel) -> tuple[Any, dict[str, str]]:
    """transformers' tensor processor for the file's architecture and its ``{GGUF name: model name}`` map."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    architecture = reader.fields["general.architecture"].contents()
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=model.config.to_dict())
    return processor, get_gguf_hf_weights_map(model, processor)


def gguf_linears(reader: GGUFReader, model: PreTrainedModel,
                 names: tuple[Any, dict[str, str]] | None = None) -> dict[str, tuple[str, np.ndarray]]:
    """Each file tensor holding a decoder linear's weight: ``{GGUF name: (linear's module name, row order)}``, the
    model's rows being the file's rows in that order (llama.cpp's rotary row layout undone).  ``model``: as
    transformers builds it (its linears not yet replaced), on ``meta`` or not; ``names``: its
    :func:`_name_mapping` if the caller has it."""
    processor, mapping = names or _name_mapping(reader, model)
    targets = {f"{name}.weight": name for name in target_linear_names(model)}
    return {
        tensor.name: (targets[mapping[tensor.name]],
                      _row_permutation(processor, tensor.name, int(tensor.shape[1]), mapping))
        for tensor in reader.tensors if mapping.get(tensor.name) in targets and len(tensor.shape) == 2
    }


def _block_bytes(tensor: Any) -> torch.Tensor:
    """A GGUF matrix's raw data as ``[rows, row_bytes]`` uint8 (float types included)."""
    data = np.ascontiguousarray(tensor.data).view(np.uint8)
    return torch.from_numpy(data.reshape(int(tensor.shape[1]), -1).copy())


def load_gguf_quantized(path: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """Model with every decoder linear a :class:`ModuLoRALinear` over the file's own blocks.

    Returns ``(model, tokenizer, manifest)``; the manifest has the same ``layers``,
    ``quantizer`` and ``size`` keys as a saved quantized directory's.
    """
    path = Path(path)
    reader = GGUFReader(path)
    config, tokenizer = gguf_config_and_tokenizer(path)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    processor, mapping = _name_mapping(reader, model)
    linears = gguf_linears(reader, model, (processor, mapping))

    weights: dict[str, GGUFWeight] = {}
    tensors: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        if tensor.name in linears:
            name, order = linears[tensor.name]
            weights[name] = GGUFWeight(_block_bytes(tensor)[torch.from_numpy(order)], tensor.tensor_type.name,
                                       int(tensor.shape[0]))
            continue
        result = processor.process(
            weights=gguf_dequantize(tensor.data, tensor.tensor_type),
            name=tensor.name,
            tensor_key_mapping=mapping,
            parsed_parameters={"tensors": tensors},
        )
        if result.name not in mapping:
            log.info("%s: skipping GGUF tensor %s (no model parameter)", path, tensor.name)
            continue
        tensors[mapping[result.name]] = torch.from_numpy(np.array(result.weights, dtype=np.float32))

    missing = sorted(set(target_linear_names(model)) - weights.keys())
    if missing:
        raise EngineError(f"{path}: no tensor for decoder linear(s) {missing[:3]}")
    for name, qweight in weights.items():
        linear = model.get_submodule(name)
        bias = tensors.pop(f"{name}.bias", None)
        if linear.bias is not None and bias is None:
            raise EngineError(f"{path}: missing bias of {name}")
        if tuple(qweight.shape) != tuple(linear.weight.shape):
            raise EngineError(f"{path}: {name} is {tuple(qweight.shape)} in the file, {tuple(linear.weight.shape)} in its config")
        replace_module(model, name, ModuLoRALinear(qweight, bias))
    _load_float_tensors(model, tensors, path)
    model.eval()
    model.requires_grad_(False)
    layers = {name: {**m.base.manifest(), "bias": m.bias is not None} for name, m in quantized_layers(model).items()}
    manifest = {
        "source_model": str(path.resolve()),
        "quantizer": {"method": "gguf", "ggml_types": dict(Counter(w.qtype.name for w in weights.values()))},
        "layers": layers,
        "size": model_size(model),
    }
    return model, tokenizer, manifest


def _load_float_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Load the non-linear parameters; tied ones (e.g. an output head tied to the embeddings) may be absent."""
    _, aliases = unique_state(model)
    quantized = tuple(f"{name}." for name in quantized_layers(model))
    expected = {k for k in model.state_dict() if not k.startswith(quantized)}
    missing = expected - tensors.keys() - aliases.keys()
    unexpected = tensors.keys() - expected
    if missing or unexpected:
        raise EngineError(
            f"{path}: tensors do not match its config (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    model.load_state_dict(tensors, strict=False)
