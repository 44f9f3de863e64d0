"""Moving a loaded model onto its compute device, streamed parts excepted, ready to compute there."""

from __future__ import annotations

from types import MethodType

import torch
from torch import nn

from engine.lora.function import HALF_MATMUL_CHECKS, cpu_has_half_matmul, linear


def place(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Every materialised parameter and buffer of ``model`` moved to ``device``, in place; ``meta`` placeholders
    (blocks a streamer brings in, tables read from disk) stay where they are.

    Unlike ``model.to(device)`` this leaves placeholders alone, and a tensor shared by two modules (tied
    embeddings) is moved once and stays shared.  On a CPU without half-precision GEMMs the float linear layers
    multiply in float32 chunks (:func:`float32_product_linear`), as the ModuLoRA layers do.
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
    if device.type == "cpu" and not all(map(cpu_has_half_matmul, HALF_MATMUL_CHECKS)):
        for module in model.modules():
            if type(module) is nn.Linear:
                module.forward = MethodType(float32_product_linear, module)
    return model


def float32_product_linear(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``nn.Linear.forward`` through :func:`engine.lora.function.linear`: without gradients, float32 products (in
    bounded chunks) for a half-precision weight on a CPU without half GEMMs, where torch's generic kernels are
    about 8x slower (a Llama-7B-shaped bfloat16 block's calibration passes).  Weights stay in their dtype.  The
    decision is made per call, so blocks whose weights arrive later (streamed) are covered too."""
    return linear(x, self.weight, self.bias)


def compute_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first materialised parameter or buffer (CPU for a model with none)."""
    for tensor in [*model.parameters(), *model.buffers()]:
        if not tensor.is_meta:
            return tensor.device
    return torch.device("cpu")
