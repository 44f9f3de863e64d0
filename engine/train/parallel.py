"""Data parallelism as the trainer sees it: which worker of how many this process is, where a restarted group
resumes from, and DDP over the LoRA parameters only.

The group itself is started by a launcher (``cluster.train``: Ray Train's ``TorchTrainer``), which has set up
``torch.distributed`` before the trainer runs.  Every worker computes its slice of the same global batch the
one-process run computes; DDP averages the LoRA gradients (the packed base weights are buffers and the float
embeddings, norms and head are frozen: none of them is ever broadcast), so every worker takes the same optimizer
step and the adapters stay equal without being sent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel


class WorkerGroup(Protocol):
    """The workers one training run is spread over."""

    rank: int  # this worker, 0 .. size - 1; worker 0 writes the run's logs, checkpoints and outputs
    size: int
    # A worker of a launched group always continues the run in its folder (a restarted group's last checkpoint may
    # be newer there than the launcher's): the launching command has already refused or emptied a folder that held
    # another run.
    continues: bool

    def restored(self) -> AbstractContextManager[Path | None]:
        """The checkpoint directory a restarted group resumes from (None: a fresh start), while it is readable."""

    def report(self, metrics: dict[str, float], checkpoint: Path | None) -> None:
        """Called by every worker after each checkpoint step, ``checkpoint`` given on worker 0 only."""


@dataclass(frozen=True)
class OneProcess:
    """The run in this process alone: nothing to restore from or report to."""

    rank: int = 0
    size: int = 1
    continues: bool = False

    @contextmanager
    def restored(self) -> Iterator[Path | None]:
        yield None

    def report(self, metrics: dict[str, float], checkpoint: Path | None) -> None:
        return None


ONE_PROCESS = OneProcess()
WorkerRun = Callable[[WorkerGroup], None]  # what a launcher runs on every worker of its group


class LossModule(nn.Module):
    """The model and its loss as one module: DDP arms the gradient all-reduce in its ``forward``, and the
    trainer's losses call the decoder and the head separately (no logits), so the loss must run inside it."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


def data_parallel(module: LossModule, trained: dict[str, nn.Parameter], device: torch.device) -> DistributedDataParallel:
    """DDP over ``trained`` (the LoRA parameters, by name in ``module.model``) and nothing else: every other
    parameter and every buffer is left out of DDP's initial broadcast and of its buffer syncing.  Every trained
    parameter gets a gradient every step (QDyLoRA slices its matrices, it does not skip them)."""
    keep = {f"model.{name}" for name in trained}
    ignored = [n for n, _ in module.named_parameters() if n not in keep] + [n for n, _ in module.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, ignored)
    return DistributedDataParallel(module, device_ids=[device.index or 0] if device.type == "cuda" else None,
                                   broadcast_buffers=False)


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """``values`` summed over the group's workers (float64, for logging)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()
