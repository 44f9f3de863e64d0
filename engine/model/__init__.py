"""Whole models: load float ones, quantize their linears, save and load quantized directories."""

from engine.model.calibrate import calibration_windows, quantize_calibrated, quantize_with_calibration
from engine.model.checkpoint import is_quantized_dir, load_model, load_quantized, read_manifest, save_quantized
from engine.model.gguf_export import quantize_gguf
from engine.model.gguf_quantized import is_quantized_gguf, load_gguf_quantized
from engine.model.loading import load_float_model
from engine.model.quantize import decoder_blocks, quantize_model, target_linear_names
from engine.model.state import model_size, quantized_layers
from engine.model.stats import collect_stats, load_stats, merge_stats, save_stats

__all__ = [
    "calibration_windows",
    "collect_stats",
    "decoder_blocks",
    "is_quantized_dir",
    "is_quantized_gguf",
    "load_float_model",
    "load_gguf_quantized",
    "load_model",
    "load_quantized",
    "load_stats",
    "merge_stats",
    "model_size",
    "quantize_calibrated",
    "quantize_gguf",
    "quantize_model",
    "quantize_with_calibration",
    "quantized_layers",
    "read_manifest",
    "save_quantized",
    "save_stats",
    "target_linear_names",
]
