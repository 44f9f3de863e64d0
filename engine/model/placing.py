"""Moving a loaded model onto its compute device, streamed parts excepted, ready to compute there."""

from __future__ import annotations

import torch
from torch import nn

from engine.lora.function import HALF_MATMUL_CHECKS, cpu_has_half_matmul, linear


def place(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Every materialised parameter and buffer of ``model`` moved to ``device``, in place; ``meta`` placeholders
    (blocks a streamer brings in, tables read from disk) stay where they are.

    Unlike ``model.to(device)`` this leaves placeholders alone, and a tensor shared by two modules (tied
    embeddings) is moved once and stays shared.  On a CPU without half-precision GEMMs the float linear layers
    multiply in float32 chunks (:class:`Float32ProductLinear`), as the ModuLoRA layers do.
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
                module.__class__ = Float32ProductLinear
    return model


class Float32ProductLinear(nn.Linear):
    """``nn.Linear`` computing through :func:`engine.lora.function.linear`: without gradients, float32 products (in
    bounded chunks) for a half-precision weight on a CPU without half GEMMs, where torch's generic kernels are
    about 8x slower (a Llama-7B-shaped bfloat16 block's calibration passes).  Weights stay in their dtype.  The
    decision is made per call, so blocks whose weights arrive later (streamed) are covered too.

    :func:`place` swaps a layer's class for this one rather than putting a bound method in the layer's ``__dict__``:
    such a method refers back to its layer, and every layer dropped (each one quantized away, each block's float
    twin) then held its weights until the cyclic garbage collector ran: a 7B-shaped calibration peaked at 3.71 GiB
    instead of 2.80 (docs/scale.md)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def compute_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first materialised parameter or buffer (CPU for a model with none)."""
    for tensor in [*model.parameters(), *model.buffers()]:
        if not tensor.is_meta:
            return tensor.device
    return torch.device("cpu")
