"""Loading what a use case starts from: a model with the adapter of a corrected directory or a finetune run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from engine.export import attach_adapter, is_adapter_dir, read_adapter
from engine.model import is_quantized_dir, load_model

ADAPTER_DIR = "adapter"


def load_with_adapter(source: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any] | None]:
    """A model with the adapter of a corrected directory or of a finetune run, else the model itself.

    A corrected directory is a quantized model with ``adapter/`` inside; a
    finetune run holds only ``adapter/``, whose config names the base model.
    """
    adapter = Path(source) / ADAPTER_DIR
    if not is_adapter_dir(adapter):
        return load_model(source)
    base = source if is_quantized_dir(source) else read_adapter(adapter)[0]["base_model_name_or_path"]
    model, tokenizer, manifest = load_model(base)
    attach_adapter(model, adapter)
    return model, tokenizer, manifest


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
    return 0
