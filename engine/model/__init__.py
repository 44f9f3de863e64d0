"""Whole models: load float ones, quantize their linears, calibrate, attach adapters, save and load
quantized directories."""

from engine.model.adapters import (
    adapter_state,
    add_lora,
    load_adapter_state,
    lora_layers,
    lora_parameters,
    set_active_rank,
)
from engine.model.build import (
    blocks_prefix, check_context, load_block, load_outside_blocks, load_resident, materialize, meta_model, release_block,
    release_input_embeddings,
)
from engine.model.calibrate import MODES, RunnerFactory, quantize_calibrated
from engine.model.checkpoint import (
    BLOCKS, OUTSIDE, QuantizedWriter, is_quantized_dir, load_block_weights, load_model, load_quantized, read_manifest,
    release_block_weights, save_quantized,
)
from engine.model.gguf_export import quantize_gguf, write_like, writable_type
from engine.model.gguf_quantized import gguf_linears, is_quantized_gguf, load_gguf_quantized
from engine.model.loading import load_float_model
from engine.model.placing import compute_device, place
from engine.model.quantize import (
    decoder_blocks, linear_share, linear_weight, quantize_model, quantized_weight, replace_module, swap_linear, target_linear_names, vocab_table_names,
)
from engine.model.sequential import BlockLifecycle, CalibrationShard, ShardRunner, Wrap, aligned_weight, fold_into
from engine.model.source import CheckpointSource, GGUFSource, SafetensorsSource, open_source
from engine.model.state import model_size, quantized_layers, unique_state
from engine.model.stats import (
    SHARD_WINDOWS, collect_stats, load_stats, merge_stats, save_stats, shard_spans, worker_spans,
)

__all__ = [
    "BLOCKS",
    "MODES",
    "SHARD_WINDOWS",
    "OUTSIDE",
    "BlockLifecycle",
    "CheckpointSource",
    "GGUFSource",
    "QuantizedWriter",
    "SafetensorsSource",
    "blocks_prefix",
    "check_context",
    "compute_device",
    "place",
    "load_block",
    "load_block_weights",
    "load_outside_blocks",
    "load_resident",
    "materialize",
    "meta_model",
    "open_source",
    "release_block",
    "release_input_embeddings",
    "release_block_weights",
    "CalibrationShard",
    "RunnerFactory",
    "ShardRunner",
    "Wrap",
    "adapter_state",
    "aligned_weight",
    "fold_into",
    "quantized_weight",
    "add_lora",
    "collect_stats",
    "decoder_blocks",
    "linear_share",
    "linear_weight",
    "swap_linear",
    "is_quantized_dir",
    "gguf_linears",
    "is_quantized_gguf",
    "load_adapter_state",
    "load_float_model",
    "load_gguf_quantized",
    "load_model",
    "load_quantized",
    "load_stats",
    "lora_layers",
    "lora_parameters",
    "merge_stats",
    "model_size",
    "quantize_calibrated",
    "quantize_gguf",
    "write_like",
    "writable_type",
    "quantize_model",
    "quantized_layers",
    "read_manifest",
    "replace_module",
    "save_quantized",
    "save_stats",
    "set_active_rank",
    "shard_spans",
    "worker_spans",
    "target_linear_names",
    "unique_state",
    "vocab_table_names",
]
