"""Moving a loaded model onto its compute device, streamed parts excepted."""

from __future__ import annotations

import torch
from torch import nn


def place(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Every materialised parameter and buffer of ``model`` moved to ``device``, in place; ``meta`` placeholders
    (blocks a streamer brings in, tables read from disk) stay where they are.

    Unlike ``model.to(device)`` this leaves placeholders alone, and a tensor shared by two modules (tied
    embeddings) is moved once and stays shared.
    """
    device = torch.device(device)
    moved: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is None or tensor.is_meta or tensor.device == device:
                    continue
                if id(tensor) not in moved:
                    data = tensor.detach().to(device)
                    moved[id(tensor)] = (nn.Parameter(data, requires_grad=tensor.requires_grad)
                                         if isinstance(tensor, nn.Parameter) else data)
                table[name] = moved[id(tensor)]
    return model


def compute_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first materialised parameter or buffer (CPU for a model with none)."""
    for tensor in [*model.parameters(), *model.buffers()]:
        if not tensor.is_meta:
            return tensor.device
    return torch.device("cpu")
