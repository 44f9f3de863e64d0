"""Training: the resumable trainer, its settings and checkpoints, the vocabulary-tiled loss, LREC and LoftQ, the
distillation of a quantized model's continuous parameters, and the worker group a data-parallel run is spread over."""

from engine.train.distill import DistillResult, distill_continuous
from engine.train.losses import chunked_causal_lm_loss
from engine.train.lrec import distillation_loss, loftq_init
from engine.train.parallel import ONE_PROCESS, WorkerGroup, WorkerRun
from engine.train.rank_schedule import SCHEDULES
from engine.train.spec import OPTIMIZERS, TrainSpec
from engine.train.trainer import EvalFn, LossFn, Trainer

__all__ = ["ONE_PROCESS", "OPTIMIZERS", "SCHEDULES", "DistillResult", "EvalFn", "LossFn", "TrainSpec", "Trainer",
           "WorkerGroup", "WorkerRun", "chunked_causal_lm_loss", "distill_continuous", "distillation_loss", "loftq_init"]
