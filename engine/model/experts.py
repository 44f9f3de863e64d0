"""Mixture-of-experts experts as one linear layer per expert and projection.

transformers 5 keeps a Mixtral or Qwen-MoE layer's experts as two 3-D tensors
(``gate_up_proj`` ``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]``), stacked when it
loads a checkpoint that stores them one tensor per expert.  The engine packs
and adapts linear layers, so it builds those experts the way checkpoints store
them: ``experts.<e>.<gate>``, ``experts.<e>.<up>``, ``experts.<e>.<down>``, each
an ``nn.Linear`` named as in the checkpoint (``w1``/``w3``/``w2`` for Mixtral,
``gate_proj``/``up_proj``/``down_proj`` for Qwen-MoE).  Every expert is then
read tensor by tensor, quantized, calibrated on the tokens routed to it and
given its own LoRA like any other linear layer, and a merged export is a
checkpoint transformers loads as it loads the original.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from engine.model.source import expert_projection_names


class Expert(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))``, its three projections under the checkpoint's names."""

    def __init__(self, hidden: int, intermediate: int, names: tuple[str, str, str], act_fn: nn.Module,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.names, self.act_fn = names, act_fn
        gate, up, down = names
        for name, (n_in, n_out) in ((gate, (hidden, intermediate)), (up, (hidden, intermediate)),
                                    (down, (intermediate, hidden))):
            self.add_module(name, nn.Linear(n_in, n_out, bias=False, device="meta", dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, name) for name in self.names)
        return down(self.act_fn(gate(x)) * up(x))


class ExpertLinears(nn.ModuleList):
    """A layer's experts as a list of :class:`Expert`, called as transformers calls its experts module: with the
    tokens' hidden states ``[T, H]`` and their routing (``top_k_index``, ``top_k_weights``, both ``[T, k]``)."""

    def __init__(self, experts: nn.Module, names: tuple[str, str, str]) -> None:
        n_experts, twice_intermediate, hidden = experts.gate_up_proj.shape
        dtype = experts.gate_up_proj.dtype
        super().__init__(Expert(hidden, twice_intermediate // 2, names, experts.act_fn, dtype)
                         for _ in range(n_experts))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """Each expert on the tokens routed to it, in token order, weighted and summed into place; one host sync
        for the tokens per expert (not one per expert)."""
        out = torch.zeros_like(hidden_states)
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)  # by expert, then token, then k: transformers' order
        tokens, weights = order // top_k_index.shape[-1], top_k_weights.reshape(-1)[order]
        start = 0
        for expert, count in zip(self, torch.bincount(flat, minlength=len(self)).tolist()):
            if count:
                rows = tokens[start : start + count]
                routed = expert(hidden_states[rows]) * weights[start : start + count, None]
                out.index_add_(0, rows, routed.to(out.dtype))
            start += count
        return out


def split_experts(model: nn.Module, config: PretrainedConfig) -> None:
    """Replace every stacked experts module (3-D ``gate_up_proj`` and ``down_proj``) by :class:`ExpertLinears`,
    where the checkpoint format names the per-expert tensors; other models are left as they are."""
    names = expert_projection_names(config)
    if names is None:
        return
    stacked = [(name, module) for name, module in model.named_modules() if _is_stacked_experts(module)]
    for name, module in stacked:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, ExpertLinears(module, names))


def _is_stacked_experts(module: nn.Module) -> bool:
    params = dict(module.named_parameters(recurse=False))
    return (set(params) == {"gate_up_proj", "down_proj"} and all(p.dim() == 3 for p in params.values())
            and not getattr(module, "is_transposed", False) and hasattr(module, "act_fn"))


def routed_layers(model: nn.Module, names: list[str]) -> set[str]:
    """The names among ``names`` that are an expert's projections: they see only the tokens routed to their
    expert, so a calibration batch (or all of them) may never reach them."""
    return {name for name in names if isinstance(model.get_submodule(name.rpartition(".")[0]), Expert)}


def expert_groups(model: nn.Module, names: list[str]) -> list[list[str]]:
    """Expert projections grouped by the input they consume, in call order: ``[gate, up]`` then ``[down]`` of
    each expert (the grouping a forward pass shows, for experts no calibration token reached)."""
    groups: dict[tuple[str, bool], list[str]] = {}
    for name in names:
        parent, _, projection = name.rpartition(".")
        expert = model.get_submodule(parent)
        groups.setdefault((parent, projection == expert.names[2]), []).append(name)
    return list(groups.values())
