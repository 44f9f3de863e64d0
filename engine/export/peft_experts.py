"""Expert LoRAs in PEFT's layout for stacked experts, so PEFT puts them on transformers' own MoE model.

The engine trains one LoRA per expert and projection (:mod:`engine.model.experts`);
transformers holds a layer's experts as ``experts.gate_up_proj`` ``[E, 2I, H]`` and
``experts.down_proj`` ``[E, H, I]``, which PEFT adapts with ``target_parameters``:
per parameter one ``lora_A`` ``[r E, in]`` (row ``e r + j``) and one ``lora_B``
``[out, r E]`` (column ``j E + e``), the first parameter's under
``experts.base_layer.`` and the second's under ``experts.``.  The gate and up
LoRAs of an expert (rank ``r`` each) are one rank-``2r`` LoRA of ``gate_up_proj``:
``A = [A_gate; A_up]``, ``B = [[B_gate, 0], [0, B_up]]``, exactly the same
update; the config gives that parameter rank ``2r`` and alpha ``2 alpha`` (the
same scale) through PEFT's ``rank_pattern`` and ``alpha_pattern``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.lora.linear import ModuLoRALinear
from engine.model.experts import routed_layers

GATE_UP, DOWN = "experts.gate_up_proj", "experts.down_proj"  # in this order: PEFT nests the second around the first
KEYS = {GATE_UP: "base_layer.", DOWN: ""}


def expert_modules(model: nn.Module, names: list[str]) -> list[str]:
    """The experts modules (``...mlp.experts``) whose projections are among the layer ``names``."""
    return list(dict.fromkeys(name.rsplit(".", 2)[0] for name in sorted(routed_layers(model, names))))


def fuse_expert_loras(model: nn.Module, layers: dict[str, ModuLoRALinear], rank: int, prefix: str) -> dict[str, torch.Tensor]:
    """PEFT's tensors (keys under ``prefix``) of every experts module with adapted projections, cut to ``rank``;
    a projection without a LoRA contributes zeros (no update)."""
    tensors = {}
    for module_name in expert_modules(model, list(layers)):
        experts = model.get_submodule(module_name)
        gate, up, down = experts[0].names

        def factors(index: int, projection: str) -> tuple[torch.Tensor, torch.Tensor]:
            layer = layers.get(f"{module_name}.{index}.{projection}")
            if layer is None:
                linear = getattr(experts[index], projection)
                return torch.zeros(rank, linear.in_features), torch.zeros(linear.out_features, rank)
            return layer.lora_a.detach()[:rank].cpu(), layer.lora_b.detach()[:, :rank].cpu()

        gate_up_a, gate_up_b, down_a, down_b = [], [], [], []
        for index in range(len(experts)):
            (a_gate, b_gate), (a_up, b_up), (a_down, b_down) = (factors(index, p) for p in (gate, up, down))
            gate_up_a.append(torch.cat([a_gate, a_up]))
            gate_up_b.append(torch.block_diag(b_gate, b_up))
            down_a.append(a_down)
            down_b.append(b_down)
        for parameter, a, b in ((GATE_UP, gate_up_a, gate_up_b), (DOWN, down_a, down_b)):
            key = f"{prefix}{module_name}.{KEYS[parameter]}"
            tensors[f"{key}lora_A.weight"] = torch.cat(a).contiguous()
            tensors[f"{key}lora_B.weight"] = torch.stack(b, dim=-1).flatten(1).contiguous()
    return tensors


def expert_config(rank: int, alpha: float) -> dict[str, Any]:
    """The adapter-config entries that let PEFT place the fused expert LoRAs."""
    return {"target_parameters": [GATE_UP, DOWN], "rank_pattern": {GATE_UP: 2 * rank},
            "alpha_pattern": {GATE_UP: 2 * alpha}}


def split_expert_loras(model: nn.Module, names: list[str], tensors: dict[str, torch.Tensor],
                       prefix: str) -> dict[str, torch.Tensor]:
    """The inverse of :func:`fuse_expert_loras`: each expert projection's ``lora_a`` and ``lora_b`` (the
    engine's state keys) for the layer ``names`` that are expert projections."""
    ours, wanted = {}, set(names)
    for module_name in expert_modules(model, names):
        experts = model.get_submodule(module_name)
        gate, up, down = experts[0].names
        n_experts = len(experts)
        for parameter, projections in ((GATE_UP, (gate, up)), (DOWN, (down,))):
            key = f"{prefix}{module_name}.{KEYS[parameter]}"
            a, b = tensors[f"{key}lora_A.weight"], tensors[f"{key}lora_B.weight"]
            a = a.reshape(n_experts, -1, a.shape[-1])
            b = b.reshape(b.shape[0], -1, n_experts)
            rank = a.shape[1] // len(projections)
            rows = b.shape[0] // len(projections)
            for index in range(n_experts):
                for part, projection in enumerate(projections):
                    name = f"{module_name}.{index}.{projection}"
                    if name not in wanted:
                        continue
                    ours[f"{name}.lora_a"] = a[index, part * rank : (part + 1) * rank]
                    ours[f"{name}.lora_b"] = b[part * rows : (part + 1) * rows, part * rank : (part + 1) * rank, index]
    return ours
