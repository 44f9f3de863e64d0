"""Adapters in PEFT's on-disk format, which is also the engine's own adapter format.

``adapter_config.json`` + ``adapter_model.safetensors`` with PEFT's key names
(``base_model.model.<module>.lora_A.weight``, ``...lora_B.weight``), so
``peft.PeftModel.from_pretrained`` loads an exported adapter on the float base,
and the engine reloads it onto a float or quantized model.  The scale
``lora_alpha / r`` is PEFT's; an adapter cut to rank ``b`` of its trained rank
``R`` is written with ``lora_alpha = alpha b / R``, so PEFT's scale is the
trained ``alpha / R`` that every prefix of a dynamic-rank adapter uses.
Mixture-of-experts experts' LoRAs are written fused, as PEFT adapts
transformers' stacked experts (:mod:`engine.export.peft_experts`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from engine.errors import EngineError
from engine.storage import (
    SEAL, atomic_save_safetensors, atomic_write_json, staged_dir, verify_file_manifest, verify_seal,
)
from engine.export.peft_experts import expert_config, fuse_expert_loras, split_expert_loras
from engine.model.adapters import add_lora, load_adapter_state, lora_layers
from engine.model.experts import routed_layers
from engine.model.checkpoint import MANIFEST

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
ADAPTER_MANIFEST = "modulora_adapter.json"  # sha256 of the two files, itself sealed (engine.storage.seal)
BASE_SEAL = "modulora_base_manifest_sha256"  # the quantized base's manifest seal when the adapter was trained
PREFIX = "base_model.model."


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG).is_file()


def save_adapter(model: nn.Module, out_dir: str | Path, base_model: str, rank: int | None = None) -> dict[str, Any]:
    """Write the model's adapters, optionally cut to their first ``rank`` components."""
    layers = lora_layers(model)
    if not layers:
        raise EngineError("model has no LoRA adapters to export")
    full_rank = next(iter(layers.values())).rank
    rank = rank or full_rank
    if not 1 <= rank <= full_rank:
        raise EngineError(f"export rank must be between 1 and {full_rank}, got {rank}")
    alphas = {layer.alpha for layer in layers.values()}
    if len(alphas) != 1:
        raise EngineError(f"layers have different LoRA alphas {sorted(alphas)}; PEFT needs one")
    alphas_rank = alphas.pop() * rank / full_rank  # PEFT's scale alpha / r is then the trained alpha / R
    routed = routed_layers(model, list(layers))  # expert projections: fused, in PEFT's layout for stacked experts
    tensors = fuse_expert_loras(model, layers, rank, PREFIX)
    for name, layer in [(n, m) for n, m in layers.items() if n not in routed]:
        tensors[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_a.detach()[:rank].contiguous().cpu()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_b.detach()[:, :rank].contiguous().cpu()
    base_seal = None
    if Path(base_model).exists():  # a local base is recorded absolute, so the adapter loads from any directory
        base_model = str(Path(base_model).resolve())
        base_seal = _manifest_seal(Path(base_model))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alphas_rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),  # GPT-2's Conv1D layers
        "inference_mode": True,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in layers if name not in routed}),
        **(expert_config(rank, alphas_rank) if routed else {}),
        "modulora_layers": sorted(layers),
        "modulora_trained_rank": full_rank,
        **({BASE_SEAL: base_seal} if base_seal else {}),
    }
    with staged_dir(out_dir, ADAPTER_MANIFEST) as staging:  # replaced whole: weights and config belong together
        atomic_save_safetensors(staging / WEIGHTS, tensors)
        atomic_write_json(staging / CONFIG, config)
    return config


def _manifest_seal(base: Path) -> str | None:
    """The seal of a quantized base's manifest (None for float bases and unsealed directories)."""
    try:
        return json.loads((base / MANIFEST).read_text()).get(SEAL)
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def check_base(config: dict[str, Any], manifest: dict[str, Any] | None, adapter: str | Path) -> None:
    """Refuse to put an adapter on a quantized base other than the one it was trained on (same path, but
    re-quantized or replaced since): its weights would silently mean something else."""
    trained_on = config.get(BASE_SEAL)
    if trained_on and manifest is not None and manifest.get(SEAL) != trained_on:
        raise EngineError(f"{adapter}: trained on another model than the one now at "
                          f"{config['base_model_name_or_path']} (its manifest changed since: re-quantized or replaced)")


def read_adapter(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    path = Path(path)
    if not is_adapter_dir(path):
        raise EngineError(f"{path}: not an adapter directory (no {CONFIG})")
    try:
        if (path / ADAPTER_MANIFEST).is_file():  # written here; adapters from elsewhere (PEFT) have none
            manifest = json.loads((path / ADAPTER_MANIFEST).read_text())
            verify_seal(manifest, path / ADAPTER_MANIFEST)
            verify_file_manifest(path, manifest["files"], ADAPTER_MANIFEST)
        config = json.loads((path / CONFIG).read_text())
        tensors = load_file(str(path / WEIGHTS))
    except (json.JSONDecodeError, OSError, SafetensorError, KeyError) as exc:
        raise EngineError(f"{path}: unreadable adapter ({exc})") from None
    return config, tensors


def attach_adapter(model: nn.Module, path: str | Path, device: torch.device | str | None = None,
                   base_manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """Give ``model`` the adapter saved at ``path`` (its layers, rank and alpha), on ``device`` (default: the
    device of each layer's packed weight; name one when those are streamed placeholders).  ``base_manifest``:
    the manifest ``model`` was loaded with, checked against the one the adapter was trained on."""
    config, tensors = read_adapter(path)
    check_base(config, base_manifest, path)
    names = config.get("modulora_layers") or sorted(
        {k[len(PREFIX) :].rsplit(".lora_", 1)[0] for k in tensors if k.startswith(PREFIX)}
    )
    include = "^(" + "|".join(map(re.escape, names)) + ")$"
    add_lora(model, config["r"], config["lora_alpha"], seed=0, include=include, device=device)  # weights loaded next
    routed = routed_layers(model, names)
    ours = split_expert_loras(model, names, tensors, PREFIX)
    for name in [n for n in names if n not in routed]:
        ours[f"{name}.lora_a"] = tensors[f"{PREFIX}{name}.lora_A.weight"]
        ours[f"{name}.lora_b"] = tensors[f"{PREFIX}{name}.lora_B.weight"]
    load_adapter_state(model, ours)
    return config

