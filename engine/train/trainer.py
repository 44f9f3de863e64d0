"""The training loop: LoRA parameters only, deterministic, resumable bit for bit.

Everything a run depends on is either derived from the step number (learning
rate, data position) or saved in the checkpoint (adapter, optimizer moments,
every RNG state), so a run resumed from step ``k`` replays exactly the updates
of an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from engine.data import Example, collate
from engine.errors import EngineError
from engine.train.adapters import adapter_state, load_adapter_state, lora_parameters, set_active_rank
from engine.train.checkpoint import latest_good_checkpoint, restore_optimizer, restore_rng, save_checkpoint
from engine.train.losses import chunked_causal_lm_loss

if TYPE_CHECKING:
    from engine.offload.optimizer import HostOffloadedAdam

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
EvalFn = Callable[[nn.Module], dict[str, float]]
OPTIMIZERS = ("adamw", "cpu_adam")


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    max_grad_norm: float | None = 1.0
    seed: int = 0
    eval_every: int = 0
    save_every: int = 0
    keep_last: int = 2
    optimizer: str = "adamw"
    grad_checkpointing: bool = False
    rank_max: int | None = None
    dynamic_frozen: bool = False
    offload_optimizer: bool = False

    def validate(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise EngineError(f"unknown optimizer {self.optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise EngineError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise EngineError(f"lr must be > 0, got {self.lr}")
        if self.offload_optimizer and self.optimizer != "cpu_adam":
            raise EngineError(f"offload_optimizer needs optimizer 'cpu_adam', got {self.optimizer!r}")

    def lr_at(self, step: int) -> float:
        """Linear warmup, then cosine decay to ``min_lr_ratio * lr``."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(name: str, params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer | HostOffloadedAdam:
    if name == "cpu_adam" and config.offload_optimizer:
        from engine.offload.optimizer import HostOffloadedAdam

        return HostOffloadedAdam(params, lr=config.lr, weight_decay=config.weight_decay)
    if name == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=config.lr, weight_decay=config.weight_decay, adamw_mode=True)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, foreach=False)


class Trainer:
    """Trains the LoRA parameters of ``model`` on ``examples``, writing under ``out_dir``."""

    def __init__(
        self,
        model: nn.Module,
        examples: list[Example],
        config: TrainConfig,
        out_dir: str | Path,
        pad_id: int,
        loss_fn: LossFn = chunked_causal_lm_loss,
        eval_fn: EvalFn | None = None,
    ) -> None:
        config.validate()
        if not examples:
            raise EngineError("no training examples")
        self.model, self.examples, self.config = model, examples, config
        self.out_dir = Path(out_dir)
        self.pad_id, self.loss_fn, self.eval_fn = pad_id, loss_fn, eval_fn
        self.params = list(lora_parameters(model).values())
        if not self.params:
            raise EngineError("model has no LoRA adapters to train")
        self.optimizer = make_optimizer(config.optimizer, self.params, config)
        self.generators = {"rank": torch.Generator().manual_seed(config.seed + 1)}
        self.order: torch.Tensor | None = None
        self.epoch = -1

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

    def _batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        c = self.config
        first = (step * c.grad_accum + micro) * c.batch_size
        return collate([self._example(first + i) for i in range(c.batch_size)], self.pad_id)

    def _resume(self) -> int:
        checkpoint = latest_good_checkpoint(self.checkpoint_root)
        if checkpoint is None:
            return 0
        load_adapter_state(self.model, checkpoint.adapter)
        restore_optimizer(self.optimizer, checkpoint.optimizer, checkpoint.state["optimizer"])
        if self.config.optimizer == "cpu_adam":
            _replay_cpu_adam_bias_correction(self.optimizer, int(checkpoint.state["step"]))
        restore_rng(self.generators, checkpoint.rng, checkpoint.state["rng"])
        log.warning("resumed from %s", checkpoint.path)
        return int(checkpoint.state["step"])

    def _metrics_log(self, start_step: int) -> Any:
        """Open ``metrics.jsonl``, dropping lines past the resume point so the log matches the run."""
        path = self.out_dir / "metrics.jsonl"
        kept = []
        if start_step and path.is_file():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= start_step]
        path.write_text("".join(line + "\n" for line in kept))
        return path.open("a")

    def train(self, resume: bool = False) -> dict[str, float]:
        c = self.config
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(c.seed)
        random.seed(c.seed)
        start = self._resume() if resume else 0
        if c.grad_checkpointing and hasattr(self.model, "gradient_checkpointing_enable"):
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        writer = _tensorboard(self.out_dir / "tensorboard")
        metrics: dict[str, float] = {}
        with self._metrics_log(start) as jsonl:
            bar = tqdm(range(start, c.steps), initial=start, total=c.steps, desc="train", unit="step")
            for step in bar:
                t0 = time.perf_counter()
                metrics = self._step(step)
                metrics["seconds"] = time.perf_counter() - t0
                done = step + 1
                if c.eval_every and self.eval_fn and (done % c.eval_every == 0 or done == c.steps):
                    metrics.update({f"eval_{k}": v for k, v in self._evaluate().items()})
                record = {"step": done, **metrics}
                jsonl.write(json.dumps(record) + "\n")
                jsonl.flush()
                for key, value in metrics.items():
                    writer.add_scalar(key, value, done)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}")
                if c.save_every and (done % c.save_every == 0 or done == c.steps):
                    self._save(done)
        writer.close()
        set_active_rank(self.model, None)
        return metrics

    def _step(self, step: int) -> dict[str, float]:
        c = self.config
        self.model.train()
        rank = None
        if c.rank_max:
            rank = int(torch.randint(1, c.rank_max + 1, (1,), generator=self.generators["rank"]))
            set_active_rank(self.model, rank, c.dynamic_frozen)
        total = 0.0
        for micro in range(c.grad_accum):
            loss = self.loss_fn(self.model, self._batch(step, micro)) / c.grad_accum
            loss.backward()
            total += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, c.max_grad_norm or float("inf"))
        lr = c.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        out = {"loss": total, "lr": lr, "grad_norm": float(grad_norm)}
        if rank is not None:
            out["rank"] = rank
        return out

    def _evaluate(self) -> dict[str, float]:
        set_active_rank(self.model, None)
        self.model.eval()
        with torch.no_grad():
            return self.eval_fn(self.model)

    def _save(self, step: int) -> None:
        state = {"config": asdict(self.config), "examples_seen": step * self.config.grad_accum * self.config.batch_size}
        save_checkpoint(
            self.checkpoint_root, step, adapter_state(self.model), self.optimizer, self.generators, state, self.config.keep_last
        )


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
