"""Ship what was trained: PEFT-format adapters, merged float models, GPTQ-layout bases and GGUF files."""

from engine.export.gguf_format import gguf_template, save_gguf
from engine.export.gptq_layout import save_gptq
from engine.export.merge import merged_float_model, save_merged
from engine.export.peft_format import attach_adapter, is_adapter_dir, read_adapter, save_adapter

__all__ = [
    "attach_adapter", "gguf_template", "is_adapter_dir", "merged_float_model", "read_adapter", "save_adapter", "save_gguf",
    "save_gptq", "save_merged",
]
