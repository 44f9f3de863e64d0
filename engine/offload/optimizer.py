"""Optimizer-state offload: float32 master weights and Adam moments in host memory.

The trainable LoRA parameters stay on the compute device (in float32 or
bfloat16) for the forward and backward passes; everything the optimizer needs
(a float32 master copy of each parameter, its gradient and both Adam moments)
lives on the host, where DeepSpeed's vectorised CPU Adam updates it.  Each
step moves only the gradients down and the updated weights back up, so the
device holds no optimizer state at all.

With bfloat16 parameters the device copy is the rounding of the master; the
master keeps the low-order bits that small updates accumulate in.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class HostOffloadedAdam:
    """AdamW over host-resident float32 masters of ``params``, written back to ``params`` after each step.

    It stands in for a ``torch.optim.Optimizer`` in the trainer: ``param_groups``,
    ``state_dict`` and the DeepSpeed handles (``ds_opt_adam``, ``opt_id``) are the
    inner ``DeepSpeedCPUAdam``'s, so checkpoints have its layout (state keyed by
    parameter index).  With float32 parameters a checkpoint is exactly a plain
    ``cpu_adam`` one; with lower-precision parameters it also holds the masters,
    which the adapter weights alone cannot restore.
    """

    def __init__(self, params: list[nn.Parameter], lr: float, weight_decay: float = 0.0) -> None:
        from engine.offload.cpu_adam import cpu_adam  # compiles DeepSpeed's C++ op on first use

        self.params = list(params)
        self.pinned = self.params[0].is_cuda  # page-locked host memory lets the copies run as DMA
        self.masters = [torch.empty(p.shape, dtype=torch.float32, pin_memory=self.pinned) for p in self.params]
        self.grads = [torch.empty(p.shape, dtype=torch.float32, pin_memory=self.pinned) for p in self.params]
        self._pull()
        self.inner = cpu_adam(self.masters, lr=lr, weight_decay=weight_decay)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    @property
    def ds_opt_adam(self) -> Any:
        return self.inner.ds_opt_adam

    @property
    def opt_id(self) -> int:
        return self.inner.opt_id

    @torch.no_grad()
    def _pull(self) -> None:
        """Masters := device params (exact: float32 holds every bfloat16 value)."""
        for param, master in zip(self.params, self.masters):
            master.copy_(param)

    @torch.no_grad()
    def _push(self) -> None:
        """Device params := masters, rounded to the params' dtype."""
        for param, master in zip(self.params, self.masters):
            param.copy_(master, non_blocking=self.pinned)

    @torch.no_grad()
    def step(self) -> None:
        """Gradients to the host, one CPU Adam step on the masters, weights back to the device."""
        for param, master, grad in zip(self.params, self.masters, self.grads):
            # A blocking copy: it also waits for the previous step's upload before the masters change again.
            master.grad = None if param.grad is None else grad.copy_(param.grad)
        self.inner.step()
        self._push()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.params:
            if set_to_none:
                param.grad = None
            elif param.grad is not None:
                param.grad.zero_()
        self.inner.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        state_dict = self.inner.state_dict()
        for index, (param, master) in enumerate(zip(self.params, self.masters)):
            if param.dtype != torch.float32:
                state_dict["state"].setdefault(index, {})["master"] = master.clone()
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the moments and the masters; the adapter weights must already be loaded into the params.

        Masters come from the saved ones where the checkpoint has them (lower-precision
        params), otherwise from the params themselves, which then hold them exactly.
        """
        state = {index: dict(entries) for index, entries in state_dict["state"].items()}
        self._pull()
        with torch.no_grad():
            for index, master in enumerate(self.masters):
                saved = state.get(index, {}).pop("master", None)
                if saved is not None:
                    master.copy_(saved)
        self.inner.load_state_dict({**state_dict, "state": state})
        self._push()
