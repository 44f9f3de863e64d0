"""Model shapes without weights: built-in names, config files or hub ids, built on the ``meta`` device.

Building the transformers model on ``meta`` costs no memory even at 65B, and
enumerating its modules gives every layer's exact shape for any architecture
transformers knows (Llama, Falcon's fused QKV, grouped-query attention, ...).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn
from transformers import AutoConfig, PretrainedConfig

from engine.errors import EngineError
from engine.model import decoder_blocks, meta_model
from engine.offload.vocab import disk_vocab_tables

# Published shapes of models users finetune on one GPU or a few.
BUILTIN_CONFIGS: dict[str, dict[str, object]] = {
    "llama-7b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000},
    "llama-13b": {"model_type": "llama", "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                  "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": 32000},
    "llama-30b": {"model_type": "llama", "hidden_size": 6656, "intermediate_size": 17920, "num_hidden_layers": 60,
                  "num_attention_heads": 52, "num_key_value_heads": 52, "vocab_size": 32000},
    "llama-65b": {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 22016, "num_hidden_layers": 80,
                  "num_attention_heads": 64, "num_key_value_heads": 64, "vocab_size": 32000},
    "llama-2-70b": {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000},
    "falcon-40b": {"model_type": "falcon", "hidden_size": 8192, "num_hidden_layers": 60, "num_attention_heads": 128,
                   "num_kv_heads": 8, "new_decoder_architecture": True, "parallel_attn": True, "bias": False,
                   "vocab_size": 65024},
}


def load_config(name_or_path: str, **overrides: object) -> PretrainedConfig:
    """A built-in name, a ``config.json`` (or a directory holding one), or a hub id."""
    if name_or_path in BUILTIN_CONFIGS:
        settings = {**BUILTIN_CONFIGS[name_or_path], **overrides}
        return AutoConfig.for_model(settings.pop("model_type"), **settings)
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            settings = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise EngineError(f"{path}: not a JSON model config ({exc.msg})") from None
        if "model_type" not in settings:
            raise EngineError(f"{path}: model config has no 'model_type'")
        return AutoConfig.for_model(settings.pop("model_type"), **{**settings, **overrides})
    if path.suffix or "/" not in name_or_path:
        raise EngineError(f"unknown model {name_or_path!r}: not a file, and built-in names are "
                          f"{', '.join(BUILTIN_CONFIGS)}")
    return AutoConfig.from_pretrained(name_or_path, **overrides)  # a hub id (needs network or a local cache)


@dataclass(frozen=True)
class ModelShapes:
    """What the planner needs: the decoder linears of one block, and everything outside the blocks."""

    block_linears: tuple[tuple[str, int, int], ...]  # (name within the block, out_features, in_features)
    n_blocks: int
    block_other_params: int  # norms, biases: kept in float
    outside_params: int  # embeddings, final norm, lm_head (counted once when tied)
    disk_vocab_params: int  # what the disk tier keeps on disk of those (engine.offload.vocab.disk_vocab_tables)
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    num_attention_heads: int

    @property
    def linear_params_per_block(self) -> int:
        return sum(out * inp for _, out, inp in self.block_linears)

    @property
    def total_params(self) -> int:
        return self.n_blocks * (self.linear_params_per_block + self.block_other_params) + self.outside_params


def model_shapes(config: PretrainedConfig) -> ModelShapes:
    model = meta_model(config)
    blocks = decoder_blocks(model)
    first = blocks[0]
    linears = tuple((name, m.out_features, m.in_features) for name, m in first.named_modules() if isinstance(m, nn.Linear))
    linear_weights = {id(m.weight) for m in first.modules() if isinstance(m, nn.Linear)}
    block_other = sum(p.numel() for p in first.parameters() if id(p) not in linear_weights)
    in_blocks = {id(p) for p in blocks.parameters()}
    outside = sum(p.numel() for p in model.parameters() if id(p) not in in_blocks)  # parameters() dedups tied
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "ffn_hidden_size", None)
    return ModelShapes(
        block_linears=linears,
        n_blocks=len(blocks),
        block_other_params=block_other,
        outside_params=outside,
        disk_vocab_params=sum(table.weight.numel() for table in disk_vocab_tables(model).values()),
        hidden_size=config.hidden_size,
        intermediate_size=int(intermediate or 4 * config.hidden_size),
        vocab_size=config.vocab_size,
        num_attention_heads=config.num_attention_heads,
    )
