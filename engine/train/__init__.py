"""Training: the resumable trainer, its settings and checkpoints, the vocabulary-tiled loss, LREC and LoftQ."""

from engine.train.losses import chunked_causal_lm_loss
from engine.train.lrec import distillation_loss, loftq_init
from engine.train.spec import OPTIMIZERS, TrainSpec
from engine.train.trainer import EvalFn, LossFn, Trainer

__all__ = ["OPTIMIZERS", "EvalFn", "LossFn", "TrainSpec", "Trainer", "chunked_causal_lm_loss", "distillation_loss",
           "loftq_init"]
