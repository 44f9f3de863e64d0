"""The training loop's settings, with the one set of defaults every entry point (command line, recipes,
sweeps, correct and finetune alike) uses."""

from __future__ import annotations

import math
from dataclasses import dataclass

from engine.options import Spec, setting

OPTIMIZERS = ("adamw", "cpu_adam")
MAX_LR = 10.0  # a sanity bound: far above any useful rate, far below where float32 optimizer arithmetic overflows


@dataclass(frozen=True)
class TrainSpec(Spec):
    steps: int = setting(100, "int", "Optimizer steps.", minimum=1)
    batch_size: int = setting(8, "int", "Sequences per micro-batch.", minimum=1)
    grad_accum: int = setting(1, "int", "Micro-batches per optimizer step.", minimum=1)
    lr: float = setting(3e-3, "float", "Peak learning rate.", minimum=0.0, above=True, maximum=MAX_LR)
    warmup_steps: int = setting(10, "int", "Steps of linear warm-up.", minimum=0, flag="--warmup")
    min_lr_ratio: float = setting(0.1, "float", "The cosine decay ends at this fraction of lr.", minimum=0.0,
                                  maximum=1.0)
    weight_decay: float = setting(0.0, "float", "Decoupled (AdamW) weight decay.", minimum=0.0)
    max_grad_norm: float = setting(1.0, "float", "Clip the gradient norm to this.", minimum=0.0, above=True)
    optimizer: str = setting("adamw", "str", "adamw (torch) or cpu_adam (DeepSpeed, on the host).",
                             choices=OPTIMIZERS)
    grad_checkpointing: bool = setting(False, "bool", "Recompute each decoder block in backward.")
    seed: int = setting(0, "int", "Seed of the adapter's initialisation, data order and rank sampling.", minimum=0)
    eval_every: int = setting(0, "int", "Evaluate every N steps (0: never).", minimum=0)
    save_every: int = setting(10, "int", "Checkpoint every N steps and at the end (0: never), for resuming.",
                              minimum=0)
    keep_last: int = setting(2, "int", "Checkpoints kept.", minimum=1)

    def lr_at(self, step: int) -> float:
        """Linear warmup, then cosine decay to ``min_lr_ratio * lr``."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
