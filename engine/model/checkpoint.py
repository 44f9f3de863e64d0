"""Quantized model directories: safetensors + JSON, checksummed, written atomically.

Layout of ``DIR``::

    config.json            the base model's transformers config
    tokenizer*.json        the tokenizer
    model.safetensors      float tensors (embeddings, norms, lm_head) and packed layer tensors
    modulora.json          manifest: per-layer formats, quantizer settings, sha256 of every file

The whole directory is built under a temporary sibling and renamed into place,
so a crash never leaves a half-written model; on load every file's checksum is
verified before anything is read.
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
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from engine.errors import EngineError
from engine.lora.linear import ModuLoRALinear
from engine.model.gguf_quantized import is_quantized_gguf, load_gguf_quantized
from engine.model.loading import load_float_model
from engine.model.quantize import replace_module
from engine.model.state import model_size, quantized_layers, unique_state
from engine.quant.base import weight_from_state
from engine.storage import (
    atomic_save_safetensors,
    atomic_write_json,
    commit_dir,
    file_manifest,
    staging_dir,
    verify_file_manifest,
)

MANIFEST = "modulora.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1


def is_quantized_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def save_quantized(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path, info: dict[str, Any]
) -> dict[str, Any]:
    """Write ``model`` (with ModuLoRA layers) to ``out_dir``; ``info`` (source, quantizer settings) goes in the manifest."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not is_quantized_dir(out_dir):
        raise EngineError(f"{out_dir}: exists and is not a quantized model directory; refusing to overwrite it")
    staging = staging_dir(out_dir)
    try:
        model.config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        tensors, aliases = unique_state(model)
        atomic_save_safetensors(staging / WEIGHTS, {k: v.detach().cpu() for k, v in tensors.items()})
        layers = {name: {**m.base.manifest(), "bias": m.bias is not None} for name, m in quantized_layers(model).items()}
        manifest = {
            "format_version": FORMAT_VERSION,
            **info,
            "layers": layers,
            "aliases": aliases,
            "size": model_size(model),
            "files": file_manifest(staging),
        }
        atomic_write_json(staging / MANIFEST, manifest)
        commit_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a quantized directory, after checking every file against its checksum."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise EngineError(f"{path}: no such directory")
    if not manifest_path.is_file():
        raise EngineError(f"{path}: not a quantized model directory (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EngineError(f"{manifest_path}: corrupt manifest ({exc.msg if hasattr(exc, 'msg') else exc})") from None
    if manifest.get("format_version") != FORMAT_VERSION or not isinstance(manifest.get("files"), dict):
        raise EngineError(f"{manifest_path}: unsupported manifest (format_version {manifest.get('format_version')!r})")
    verify_file_manifest(path, manifest["files"], MANIFEST)
    return manifest


def load_quantized(path: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """Rebuild a model saved by :func:`save_quantized`; returns ``(model, tokenizer, manifest)``."""
    path = Path(path)
    manifest = read_manifest(path)
    try:
        tensors = load_file(str(path / WEIGHTS))
    except SafetensorError as exc:
        raise EngineError(f"{path / WEIGHTS}: unreadable ({exc})") from None
    config = AutoConfig.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for name, layer_manifest in manifest["layers"].items():
        prefix = f"{name}.base."
        parts = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        qweight = weight_from_state(parts, layer_manifest)
        bias = tensors.get(f"{name}.bias") if layer_manifest.get("bias") else None
        replace_module(model, name, ModuLoRALinear(qweight, bias))
        for key in [*parts.keys()]:
            del tensors[prefix + key]
        tensors.pop(f"{name}.bias", None)
    for alias, kept in manifest["aliases"].items():
        tensors[alias] = tensors[kept]
    _load_float_tensors(model, tensors, path)
    model.eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer, manifest


def _load_float_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    quantized = {f"{name}." for name in quantized_layers(model)}
    expected = {k for k in model.state_dict() if not any(k.startswith(q) for q in quantized)}
    missing = expected - tensors.keys()
    unexpected = tensors.keys() - expected
    if missing or unexpected:
        raise EngineError(
            f"{path / WEIGHTS}: tensors do not match config.json "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    model.load_state_dict(tensors, strict=False)


def load_model(source: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any] | None]:
    """A quantized directory or quantized GGUF file (with a manifest), or a float model (manifest ``None``)."""
    if is_quantized_dir(source):
        return load_quantized(source)
    if is_quantized_gguf(source):
        return load_gguf_quantized(source)
    model, tokenizer = load_float_model(source)
    return model, tokenizer, None
