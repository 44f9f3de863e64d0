"""The training loop: LoRA parameters only, deterministic, resumable bit for bit.

Everything a run depends on is either derived from the step number (learning
rate, data position) or saved in the checkpoint (adapter, optimizer moments,
every RNG state), so a run resumed from step ``k`` replays exactly the updates
of an uninterrupted one.

Spread over a worker group (``engine.train.parallel``), each worker takes its
slice of the same global micro-batches, in the same order, and its loss is
weighted by its share of the micro-batch's predicted tokens, so the averaged
gradient is the one-process run's; worker 0 alone writes logs and checkpoints.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from engine.data import Example, collate
from engine.errors import EngineError
from engine.model.adapters import adapter_state, load_adapter_state, lora_parameters, set_active_rank
from engine.options import as_plain
from engine.storage import atomic_write_bytes
from engine.train.checkpoint import (
    Checkpoint, latest_good_checkpoint, read_checkpoint, restore_optimizer, restore_rng, save_checkpoint,
)
from engine.train.losses import IGNORE_INDEX, chunked_causal_lm_loss
from engine.train.parallel import ONE_PROCESS, LossModule, WorkerGroup, all_sum, data_parallel
from engine.train.rank_schedule import step_ranks
from engine.train.spec import TrainSpec

if TYPE_CHECKING:
    from engine.offload.optimizer import HostOffloadedAdam

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
EvalFn = Callable[[nn.Module], dict[str, float]]


def make_optimizer(
    name: str, params: list[nn.Parameter], spec: TrainSpec, on_host: bool = False
) -> torch.optim.Optimizer | HostOffloadedAdam:
    """The optimizer ``name`` over ``params``; ``on_host`` keeps float32 masters and moments in host memory
    (DeepSpeed CPU Adam only)."""
    if on_host and name != "cpu_adam":
        raise EngineError(f"optimizer state on the host needs optimizer 'cpu_adam', got {name!r}")
    if on_host:
        from engine.offload.optimizer import HostOffloadedAdam

        return HostOffloadedAdam(params, lr=spec.lr, weight_decay=spec.weight_decay)
    if name == "cpu_adam":
        from engine.offload.cpu_adam import cpu_adam

        return cpu_adam(params, lr=spec.lr, weight_decay=spec.weight_decay)
    # One fused kernel per step on CUDA; on the CPU the per-tensor loop (what the resume tests pin bit for bit).
    implementation = {"fused": True} if params[0].is_cuda else {"foreach": False}
    return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay, **implementation)


class Trainer:
    """Trains the LoRA parameters of ``model`` on ``examples``, writing under ``out_dir``."""

    def __init__(
        self,
        model: nn.Module,
        examples: list[Example],
        config: TrainSpec,
        out_dir: str | Path,
        pad_id: int,
        *,
        rank_max: int | None = None,
        rank_schedule: str = "uniform",
        dynamic_frozen: bool = False,
        host_optimizer: bool = False,
        loss_fn: LossFn = chunked_causal_lm_loss,
        eval_fn: EvalFn | None = None,
        device: torch.device | str = "cpu",
        group: WorkerGroup = ONE_PROCESS,
    ) -> None:
        """``rank_max`` (QDyLoRA) trains prefixes of the adapter, the ranks of each step chosen by
        ``rank_schedule`` (:mod:`engine.train.rank_schedule`); ``dynamic_frozen`` then trains only the sampled
        rank's component.  ``host_optimizer`` keeps the optimizer state in host memory.  Batches are built on the
        host and moved to ``device``, where the model computes.
        ``group``: the data-parallel workers this one belongs to (``torch.distributed`` set up)."""
        if not examples:
            raise EngineError("no training examples")
        if config.batch_size % group.size:
            raise EngineError(f"--batch-size {config.batch_size}: the global micro-batch must split evenly among "
                              f"{group.size} workers")
        self.model, self.examples, self.config = model, examples, config
        self.out_dir = Path(out_dir)
        self.pad_id, self.loss_fn, self.eval_fn = pad_id, loss_fn, eval_fn
        self.rank_max, self.rank_schedule, self.dynamic_frozen = rank_max, rank_schedule, dynamic_frozen
        self.device = torch.device(device)
        self.group = group
        self.lead = group.rank == 0  # writes the logs, checkpoints and outputs
        self.trained = lora_parameters(model)
        self.params = list(self.trained.values())
        if not self.params:
            raise EngineError("model has no LoRA adapters to train")
        if config.optimizer == "cpu_adam" and not host_optimizer and self.device.type != "cpu":
            raise EngineError(f"optimizer cpu_adam updates host tensors, but the adapters are on {self.device}: "
                              "add --offload-optimizer (state on the host) or use --optimizer adamw")
        self.optimizer = make_optimizer(config.optimizer, self.params, config, host_optimizer)
        self.generators = {"rank": torch.Generator().manual_seed(config.seed + 1)}
        self.order: torch.Tensor | None = None
        self.epoch = -1
        self.start_step = 0  # the step this process's train() began at (above 0: resumed)

    @property
    def checkpoint_root(self) -> Path:
        return self.out_dir / "checkpoints"

    def _example(self, index: int) -> Example:
        """The ``index``-th example of the run: a fresh seeded permutation every epoch."""
        epoch, offset = divmod(index, len(self.examples))
        if epoch != self.epoch:
            gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
            self.order, self.epoch = torch.randperm(len(self.examples), generator=gen), epoch
        return self.examples[int(self.order[offset])]

    def _batch(self, step: int, micro: int) -> tuple[dict[str, torch.Tensor], int, float]:
        """This worker's rows of micro-batch ``micro`` of ``step``, on the compute device; the micro-batch's count
        of real (unpadded) tokens; and this worker's share of its predicted tokens (1 in one process)."""
        c, group = self.config, self.group
        first = (step * c.grad_accum + micro) * c.batch_size
        batch = collate([self._example(first + i) for i in range(c.batch_size)], self.pad_id)
        tokens = int(batch["attention_mask"].sum())
        share = 1.0
        if group.size > 1:
            rows = slice(group.rank * c.batch_size // group.size, (group.rank + 1) * c.batch_size // group.size)
            predicted = batch["labels"][:, 1:] != IGNORE_INDEX
            share = int(predicted[rows].sum()) / max(int(predicted.sum()), 1)
            batch = {k: v[rows] for k, v in batch.items()}
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}, tokens, share

    def _resume(self, restored: Path | None) -> int:
        """Restore the newest good checkpoint of the one a restarted worker group was given and this run's own
        (a group killed just after worker 0 wrote a checkpoint has it in the run folder before its launcher does)."""
        found = [c for c in (read_checkpoint(restored) if restored is not None else None,
                             latest_good_checkpoint(self.checkpoint_root)) if c is not None]
        checkpoint: Checkpoint | None = max(found, key=lambda c: int(c.state["step"])) if found else None
        if checkpoint is None:
            return 0
        load_adapter_state(self.model, checkpoint.adapter)
        restore_optimizer(self.optimizer, checkpoint.optimizer, checkpoint.state["optimizer"])
        if self.config.optimizer == "cpu_adam":
            _replay_cpu_adam_bias_correction(self.optimizer, int(checkpoint.state["step"]))
        restore_rng(self.generators, checkpoint.rng, checkpoint.state["rng"])
        log.warning("resumed from %s", checkpoint.path)
        return int(checkpoint.state["step"])

    def _metrics_log(self, start_step: int) -> tuple[Any, dict[str, float]]:
        """Open ``metrics.jsonl`` (worker 0; the others write nowhere), dropping lines past the resume point so
        the log matches the run; and the last kept step's metrics (what a run resumed at its end reports)."""
        path = self.out_dir / "metrics.jsonl"
        kept = []
        if start_step and path.is_file():
            kept = [line for line in path.read_text().splitlines() if _logged_step(line) <= start_step]
        last = {k: v for k, v in json.loads(kept[-1]).items() if k != "step"} if kept else {}
        if not self.lead:
            return nullcontext(None), last
        atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())
        return path.open("a"), last

    def train(self, resume: bool = False) -> dict[str, float]:
        """Run the remaining steps; ``resume`` continues from this run's newest good checkpoint (a worker of a
        launched group always does, also from the checkpoint its launcher gives a restarted group)."""
        c = self.config
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(c.seed)
        random.seed(c.seed)
        with self.group.restored() as restored:
            start = self._resume(restored) if resume or self.group.continues else 0
        self.start_step = start
        if c.grad_checkpointing and hasattr(self.model, "gradient_checkpointing_enable"):
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.forward: nn.Module = LossModule(self.model, self.loss_fn)
        if self.group.size > 1:
            self.forward = data_parallel(self.forward, self.trained, self.device)
        writer = _tensorboard(self.out_dir / "tensorboard") if self.lead else None
        log, metrics = self._metrics_log(start)
        with log as jsonl:
            bar = tqdm(range(start, c.steps), initial=start, total=c.steps, desc="train", unit="step",
                       disable=not self.lead or None)
            for step in bar:
                t0 = time.perf_counter()
                metrics = self._step(step)
                metrics["seconds"] = time.perf_counter() - t0
                metrics["tokens_per_second"] = metrics["tokens"] / metrics["seconds"]
                done = step + 1
                if c.eval_every and self.eval_fn and (done % c.eval_every == 0 or done == c.steps):
                    metrics.update({f"eval_{k}": v for k, v in self._evaluate().items()})
                if self.lead:
                    jsonl.write(json.dumps({"step": done, **metrics}) + "\n")
                    jsonl.flush()
                    for key, value in metrics.items():
                        writer.add_scalar(key, value, done)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}")
                if c.save_every and (done % c.save_every == 0 or done == c.steps):
                    self.group.report({"step": done, **metrics}, self._save(done) if self.lead else None)
        if writer is not None:
            writer.close()
        set_active_rank(self.model, None)
        return metrics

    def _step(self, step: int) -> dict[str, float]:
        c = self.config
        self.model.train()
        ranks = [(None, 1.0)]
        if self.rank_max:
            ranks = step_ranks(self.rank_schedule, self.rank_max, self.generators["rank"])
        total, tokens = torch.zeros((), dtype=torch.float64, device=self.device), 0
        for micro in range(c.grad_accum):
            batch, count, share = self._batch(step, micro)
            for i, (rank, weight) in enumerate(ranks):
                if rank is not None:
                    set_active_rank(self.model, rank, self.dynamic_frozen)
                last = micro == c.grad_accum - 1 and i == len(ranks) - 1
                with nullcontext() if last or self.group.size == 1 else self.forward.no_sync():  # all-reduce once
                    loss = self.forward(batch) * (weight / c.grad_accum)
                    if self.group.size > 1:  # DDP averages over the workers: weigh each by its share of the tokens
                        loss = loss * (share * self.group.size)
                    loss.backward()
                total += loss.detach().double() / self.group.size
            tokens += count
        total = total.item()  # one host sync a step, whatever the number of passes
        if self.group.size > 1:
            (total,) = all_sum([total], self.device)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, c.max_grad_norm))
        if not (math.isfinite(total) and math.isfinite(grad_norm)):
            raise EngineError(f"step {step + 1}: non-finite loss ({total}) or gradient norm ({grad_norm}); "
                              f"training stopped before updating the adapter (its checkpoints are kept); lower the "
                              f"learning rate or check the data")
        lr = c.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        out = {"loss": total, "lr": lr, "grad_norm": grad_norm, "tokens": tokens}
        if self.rank_max:
            out["rank"] = ranks[0][0]
        return out

    def _evaluate(self) -> dict[str, float]:
        set_active_rank(self.model, None)
        self.model.eval()
        with torch.no_grad():
            return self.eval_fn(self.model)

    def _save(self, step: int) -> Path:
        state = {"config": as_plain(self.config), "examples_seen": step * self.config.grad_accum * self.config.batch_size}
        return save_checkpoint(
            self.checkpoint_root, step, adapter_state(self.model), self.optimizer, self.generators, state, self.config.keep_last
        )


def _logged_step(line: str) -> float:
    """The step of a ``metrics.jsonl`` line; infinity for a line a kill left half-written (dropped on resume)."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def _replay_cpu_adam_bias_correction(optimizer: torch.optim.Optimizer | HostOffloadedAdam, steps: int) -> None:
    """Make a resumed DeepSpeed CPU Adam bit-identical to an uninterrupted one.

    Its C++ side keeps ``beta^t`` as a running product (``IncrementStep`` in
    ``cpu_adam.h``); a fresh optimizer asked for step ``k + 1`` computes
    ``pow(beta, k + 1)`` instead, which rounds differently.  Replaying steps
    ``1..k`` on a scratch element rebuilds the same running product.
    """
    group = optimizer.param_groups[0]
    scratch = [torch.zeros(1) for _ in range(4)]
    for step in range(1, steps + 1):
        optimizer.ds_opt_adam.adam_update(
            optimizer.opt_id, step, group["lr"], *group["betas"], group["eps"], group["weight_decay"],
            group["bias_correction"], *scratch,
        )


def _tensorboard(path: Path) -> Any:
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(path))
