"""Quantized model directories: safetensors + JSON, one file per decoder block, checksummed, written atomically.

Layout of ``DIR`` (format 2)::

    config.json, tokenizer*.json   the base model's transformers config and tokenizer
    outside.safetensors            every tensor outside the decoder blocks (embeddings, final norm, output head)
    blocks/block_00000.safetensors one decoder block each: its packed weights, biases and norms (names within it)
    blocks/blocks.json             the blocks' sizes and sha256
    modulora.json                  manifest: per-layer formats, quantizer settings, the sha256 of every file

The block files are exactly the disk tier's (:class:`~engine.offload.DiskStore`), so
a finetune or evaluation streams its blocks straight from ``DIR`` and reads the
vocabulary tables in place: no second copy.  A model is written and read one
block at a time, so memory holds one block beyond what the caller keeps.  The
directory is built under a temporary sibling and renamed into place; loading
verifies every checksum first.  Format 1 directories (one ``model.safetensors``)
still load.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from engine.errors import EngineError
from engine.lora.linear import ModuLoRALinear
from engine.model.build import blocks_prefix, check_materialised, meta_model
from engine.model.gguf_quantized import is_quantized_gguf, load_gguf_quantized
from engine.model.hub_quantized import hub_quant_settings, load_hub_quantized
from engine.model.loading import load_float_model
from engine.model.quantize import decoder_blocks, swap_linear, vocab_table_names
from engine.model.state import ADAPTER_SUFFIXES, unique_state
from engine.quant.base import QuantizedWeight, weight_from_state
from engine.storage import (
    atomic_save_safetensors,
    atomic_write_json,
    block_path,
    commit_dir,
    file_manifest,
    seal,
    SAFETENSORS_DTYPES,
    read_safetensors,
    read_tensors,
    recover_dir,
    safetensors_header,
    staging_dir,
    verify_file_manifest,
    verify_seal,
    write_block,
    write_block_index,
)

MANIFEST = "modulora.json"
OUTSIDE = "outside.safetensors"
BLOCKS = "blocks"
FORMAT_VERSION = 2
V1_WEIGHTS = "model.safetensors"  # format 1: every tensor in one file


def is_quantized_dir(path: str | Path) -> bool:
    """Is ``path`` a quantized directory?  A writer killed between its two renames left the previous one retired
    beside it: it is put back first (:func:`engine.storage.recover_dir`)."""
    path = Path(path)
    if not path.exists():
        recover_dir(path)
    return (path / MANIFEST).is_file()


class QuantizedWriter:
    """Writes a quantized directory one decoder block at a time, then everything else at :meth:`finish`."""

    def __init__(self, out_dir: str | Path, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> None:
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and any(self.out_dir.iterdir()) and not is_quantized_dir(self.out_dir):
            raise EngineError(f"{self.out_dir}: exists and is not a quantized model directory; refusing to overwrite it")
        self.staging = staging_dir(self.out_dir)
        config.save_pretrained(self.staging)
        tokenizer.save_pretrained(self.staging)
        self.layers: dict[str, dict[str, Any]] = {}
        self.blocks: dict[int, dict[str, Any]] = {}
        self.sizes = {"model_bytes": 0, "quantized_bytes": 0, "numel": 0}

    def write_block(self, model: nn.Module, index: int) -> None:
        """Block ``index`` of ``model``, its decoder linears quantized (ModuLoRA layers; adapters are not saved)."""
        prefix = f"{blocks_prefix(model)}.{index}."
        block = decoder_blocks(model)[index]
        tensors = {k: v for k, v in block.state_dict().items() if not k.endswith(ADAPTER_SUFFIXES)}
        if any(t.is_meta for t in tensors.values()):
            raise EngineError(f"decoder block {index} is not materialised; it cannot be saved")
        tensors = {k: v.cpu() for k, v in tensors.items()}  # a block quantized on a GPU is written from the host
        for name, layer in block.named_modules():
            if isinstance(layer, ModuLoRALinear):
                self.layers[prefix + name] = {**layer.base.manifest(), "bias": layer.bias is not None}
                self.sizes["quantized_bytes"] += layer.base.nbytes
                self.sizes["numel"] += layer.in_features * layer.out_features
        self.sizes["model_bytes"] += sum(t.numel() * t.element_size() for t in tensors.values())
        self.blocks[index] = write_block(self.staging / BLOCKS, index, tensors)

    def finish(self, model: nn.Module, info: dict[str, Any], outside_of: Path | None = None) -> dict[str, Any]:
        """Write what is outside the blocks and the manifest, and put the directory in place; returns the manifest.
        ``outside_of``: a quantized directory whose outside tensors (unchanged) are copied, not read."""
        try:
            n_blocks = len(decoder_blocks(model))
            if sorted(self.blocks) != list(range(n_blocks)):
                raise EngineError(f"{self.out_dir}: blocks {sorted(set(range(n_blocks)) - set(self.blocks))[:3]} "
                                  "were never written")
            write_block_index(self.staging / BLOCKS, self.blocks)
            if outside_of is not None:
                shutil.copyfile(outside_of / OUTSIDE, self.staging / OUTSIDE)
                aliases = json.loads((outside_of / MANIFEST).read_text())["aliases"]
                header, _ = safetensors_header(self.staging / OUTSIDE)
                self.sizes["model_bytes"] += sum(e["data_offsets"][1] - e["data_offsets"][0] for e in header.values())
            else:
                tensors, aliases = outside_state(model)
                atomic_save_safetensors(self.staging / OUTSIDE, tensors)
                self.sizes["model_bytes"] += sum(t.numel() * t.element_size() for t in tensors.values())
            manifest = {"format_version": FORMAT_VERSION, **info, "layers": self.layers, "aliases": aliases,
                        "size": self._size(), "files": file_manifest(self.staging)}
            manifest = seal(manifest)
            atomic_write_json(self.staging / MANIFEST, manifest)
            commit_dir(self.staging, self.out_dir)
        except BaseException:
            self.abort()
            raise
        return manifest

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def _size(self) -> dict[str, float]:
        s = self.sizes
        bits = 8.0 * s["quantized_bytes"] / max(1, s["numel"])
        return {"model_bytes": s["model_bytes"], "quantized_bytes": s["quantized_bytes"], "bits_per_weight": bits,
                "adapter_bytes": 0, "bits_per_weight_with_adapter": bits}


def outside_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The de-duplicated tensors outside the decoder blocks (CPU), and ``{alias: kept name}`` for tied ones."""
    prefix = f"{blocks_prefix(model)}."
    tensors, aliases = unique_state(model, skip=prefix)
    return {k: v.detach().cpu() for k, v in tensors.items()}, aliases


def save_quantized(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path, info: dict[str, Any]
) -> dict[str, Any]:
    """Write a whole quantized ``model`` (ModuLoRA layers) to ``out_dir``; ``info`` goes in the manifest."""
    writer = QuantizedWriter(out_dir, model.config, tokenizer)
    try:
        for index in range(len(decoder_blocks(model))):
            writer.write_block(model, index)
    except BaseException:
        writer.abort()
        raise
    return writer.finish(model, info)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a quantized directory, after checking every file against its checksum."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not is_quantized_dir(path):
        raise EngineError(f"{path}: no such directory" if not path.is_dir() else
                          f"{path}: not a quantized model directory (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EngineError(f"{manifest_path}: corrupt manifest ({exc.msg if hasattr(exc, 'msg') else exc})") from None
    if manifest.get("format_version") not in (1, FORMAT_VERSION) or not isinstance(manifest.get("files"), dict):
        raise EngineError(f"{manifest_path}: unsupported manifest (format_version {manifest.get('format_version')!r})")
    verify_seal(manifest, manifest_path, required=False)  # directories written before the seal have none
    verify_file_manifest(path, manifest["files"], MANIFEST)
    return manifest


def load_quantized(
    path: str | Path, stream: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """Rebuild a model saved by :func:`save_quantized`; returns ``(model, tokenizer, manifest)``.

    With ``stream`` the decoder blocks' packed weights and the vocabulary tables stay on ``meta`` (shapes
    only), for the disk tier to stream from the directory (``engine.offload.stream_from_directory``);
    everything else (norms, biases) is loaded, one block read at a time.
    """
    path = Path(path)
    manifest = read_manifest(path)
    if manifest["format_version"] == 1:
        if stream:
            raise EngineError(f"{path}: a format 1 directory (one {V1_WEIGHTS}) cannot be streamed; quantize the "
                              "model again to stream it from disk")
        return _load_v1(path, manifest)
    config = AutoConfig.from_pretrained(str(path))
    model = meta_model(config)
    layers = manifest["layers"]
    leave = set(vocab_table_names(model).values()) if stream else set()
    header = safetensors_header(path / OUTSIDE)
    outside = read_tensors(path / OUTSIDE, [n for n in header[0] if n not in leave], header)
    for alias, kept in manifest["aliases"].items():
        if kept in outside:
            outside[alias] = outside[kept]
    _assign(model, {k: v for k, v in outside.items() if k not in leave}, path / OUTSIDE)
    prefix = blocks_prefix(model)
    for index, block in enumerate(decoder_blocks(model)):
        block_prefix = f"{prefix}.{index}."
        file = block_path(path / BLOCKS, index)
        tensors = _stream_load_read(file) if stream else read_safetensors(file)
        for name in [n for n in layers if n.startswith(block_prefix)]:
            local = name[len(block_prefix):]
            parts = {k[len(local) + 6:]: tensors.pop(k) for k in list(tensors) if k.startswith(f"{local}.base.")}
            qweight = weight_from_state(parts, layers[name])
            bias = tensors.pop(f"{local}.bias", None)
            swap_linear(block, local, ModuLoRALinear(qweight, bias))
            if stream:
                _to_placeholders(qweight)
        _assign(block, tensors, file)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    check_materialised(model, path, leave)
    return model, AutoTokenizer.from_pretrained(str(path)), manifest


STREAM_READ_BYTES = 1 << 20  # with ``stream``, a packed weight's buffers up to this size are read at load


def _stream_load_read(file: Path) -> dict[str, torch.Tensor]:
    """What loading a streamed model reads of a block file: everything but the packed weights' large buffers
    (codes, which the streamer reads when the block computes), those as ``meta`` tensors of their shape.  Loading
    a streamed 65B directory then reads a few MB a block instead of the whole model once more."""
    header, data_start = safetensors_header(file)
    read = [name for name, entry in header.items()
            if ".base." not in name or entry["data_offsets"][1] - entry["data_offsets"][0] <= STREAM_READ_BYTES]
    tensors = read_tensors(file, read, (header, data_start))  # each in its own buffer
    for name, entry in header.items():
        if name not in tensors:
            tensors[name] = torch.empty(entry["shape"], dtype=SAFETENSORS_DTYPES[entry["dtype"]], device="meta")
    return tensors


def load_block_weights(model: nn.Module, directory: str | Path, index: int) -> None:
    """The packed weights of block ``index`` of a model loaded with ``stream`` read from ``directory`` into it (to
    save or re-quantize that block); :func:`release_block_weights` makes them placeholders again."""
    tensors = read_safetensors(block_path(Path(directory) / BLOCKS, index))
    for name, module in decoder_blocks(model)[index].named_modules():
        if isinstance(module, QuantizedWeight):
            for key in _stored(module):
                module._buffers[key] = tensors[f"{name}.{key}"]


def release_block_weights(model: nn.Module, index: int) -> None:
    for module in decoder_blocks(model)[index].modules():
        if isinstance(module, QuantizedWeight):
            _to_placeholders(module)


def _assign(module: nn.Module, tensors: dict[str, torch.Tensor], file: Path) -> None:
    """Put ``tensors`` (names within ``module``) in place of ``module``'s meta parameters and buffers."""
    for name, value in tensors.items():
        owner_name, _, key = name.rpartition(".")
        try:
            owner = module.get_submodule(owner_name)
        except AttributeError:
            raise EngineError(f"{file}: tensor {name} does not belong to the model of config.json") from None
        if key in owner._parameters:
            owner._parameters[key] = nn.Parameter(value, requires_grad=False)
        elif key in owner._buffers:
            owner._buffers[key] = value
        else:
            raise EngineError(f"{file}: tensor {name} does not belong to the model of config.json")


def _stored(qweight: QuantizedWeight) -> list[str]:
    """The buffers a packed weight is saved with (derived ones, such as an inverse permutation, stay)."""
    return [k for k, v in qweight._buffers.items() if v is not None and k not in qweight._non_persistent_buffers_set]


def _to_placeholders(qweight: QuantizedWeight) -> None:
    for name in _stored(qweight):
        buffer = qweight._buffers[name]
        qweight._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype, device="meta")


def _load_v1(path: Path, manifest: dict[str, Any]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """A format 1 directory: one file of every tensor, read whole."""
    try:
        tensors = load_file(str(path / V1_WEIGHTS))
    except SafetensorError as exc:
        raise EngineError(f"{path / V1_WEIGHTS}: unreadable ({exc})") from None
    model = meta_model(AutoConfig.from_pretrained(str(path)))
    for name, layer_manifest in manifest["layers"].items():
        prefix = f"{name}.base."
        parts = {k[len(prefix):]: tensors.pop(k) for k in list(tensors) if k.startswith(prefix)}
        bias = tensors.pop(f"{name}.bias", None) if layer_manifest.get("bias") else None
        swap_linear(model, name, ModuLoRALinear(weight_from_state(parts, layer_manifest), bias))
    for alias, kept in manifest["aliases"].items():
        tensors[alias] = tensors[kept]
    _assign(model, tensors, path / V1_WEIGHTS)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    check_materialised(model, path, set())
    return model, AutoTokenizer.from_pretrained(str(path)), manifest


def load_model(
    source: str | Path, stream: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any] | None]:
    """A quantized directory, a quantized GGUF file or a hub GPTQ / AWQ checkpoint (with a manifest), or a float model
    (manifest ``None``).
    ``stream`` (quantized directories): the blocks' packed weights and the vocabulary tables stay on disk."""
    if is_quantized_dir(source):
        return load_quantized(source, stream)
    if is_quantized_gguf(source):
        return load_gguf_quantized(source)
    if hub_quant_settings(source) is not None:
        return load_hub_quantized(source)
    model, tokenizer = load_float_model(source)
    return model, tokenizer, None
