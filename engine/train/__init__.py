"""Training: adapters, the resumable trainer, checkpoints."""

from engine.train.adapters import add_lora, adapter_state, load_adapter_state, lora_parameters, set_active_rank
from engine.train.losses import chunked_causal_lm_loss
from engine.train.trainer import TrainConfig, Trainer

__all__ = [
    "TrainConfig",
    "Trainer",
    "adapter_state",
    "add_lora",
    "chunked_causal_lm_loss",
    "load_adapter_state",
    "lora_parameters",
    "set_active_rank",
]
